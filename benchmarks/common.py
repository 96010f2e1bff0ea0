"""Shared by the step benchmarks: compile effjax's train step for a config on random
data, and time several compiled steps side by side in interleaved repeats."""

import time

import jax
import numpy as np

from effjax import trainer


def random_batch(runner, spec, batch_size: int, seq_len: int = 0) -> dict:
  """A global batch of uniform inputs and labels of ``spec``'s shapes, on the devices;
  for text, ``batch_size`` packed sequences of ``seq_len`` random bytes in documents of
  random lengths."""
  rng = np.random.RandomState(0)
  if spec.kind == "text":
    from effjax.data import text  # pylint: disable=g-import-not-at-top
    n = batch_size * seq_len + 1
    cuts = np.sort(rng.choice(np.arange(1, n), size=n // 200, replace=False))
    docs = [d.tobytes() for d in np.split(rng.randint(32, 127, n).astype(np.uint8), cuts)]
    return runner.shard_batch(text.PackedSource(text.encode(docs), seq_len).gather(
        np.arange(batch_size)))
  return runner.shard_batch({
      "input": rng.rand(batch_size, *spec.input_shape).astype(np.float32),
      "label": rng.randint(0, spec.num_classes, batch_size).astype(np.int32)})


def compiled_step(config, runner=None) -> list:
  """``[fn, state, batch, times]`` for effjax's full train step under ``config`` (on
  ``runner``'s devices, default all), compiled and run once, on a random batch of the
  dataset's shapes (no data needed)."""
  setup = trainer.build(config, with_data=False, runner=runner)
  r = setup.runner
  batch = random_batch(r, setup.spec, config.batch_size, config.dataset.seq_len)
  fn = r.compile(trainer.make_train_step(config), check_replicated=False)
  state = r.place_state(setup.state)
  state, m = fn(state, batch)
  jax.block_until_ready(m)
  return [fn, state, batch, []]


def time_interleaved(runs: dict, steps: int, repeats: int) -> dict:
  """Runs each compiled step ``steps`` times per repeat, the runs interleaved so that
  machine noise hits them alike, and their order rotated from one repeat to the next so
  that no run always follows the same one; returns the median seconds per step of each."""
  order = list(runs.values())
  for r in range(repeats):
    for run in order[r % len(order):] + order[:r % len(order)]:
      fn, state, batch, times = run
      t = time.perf_counter()
      for _ in range(steps):
        state, m = fn(state, batch)
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t) / steps)
      run[1] = state
  return {k: float(np.median(r[3])) for k, r in runs.items()}


def paired_ratio(runs: dict, p: str, q: str) -> float:
  """The median over repeats of ``p``'s time over ``q``'s in the same repeat, after
  ``time_interleaved``. The two runs of a repeat are a second or so apart, so a drift of
  the machine's speed, slower than that, divides out: on the 2-core machine, the LM's
  ratio of two medians was 0.993-1.082 over runs of the same code, where this one was
  1.018-1.030 (BENCHMARKS.md, twelfth pass)."""
  return float(np.median(np.asarray(runs[p][3]) / np.asarray(runs[q][3])))
