"""Shared by the step benchmarks: compile effjax's train step for a config on random
data, and time several compiled steps side by side in interleaved repeats."""

import time

import jax
import numpy as np

from effjax import trainer


def compiled_step(config) -> list:
  """``[fn, state, batch, times]`` for effjax's full train step under ``config``, compiled
  and run once, on a random batch of the dataset's shapes (no data needed)."""
  setup = trainer.build(config, with_data=False)
  r = setup.runner
  rng = np.random.RandomState(0)
  b = config.batch_size
  batch = r.shard_batch({"input": rng.rand(b, *setup.spec.input_shape).astype(np.float32),
                         "label": rng.randint(0, setup.spec.num_classes, b).astype(np.int32)})
  fn = r.compile(trainer.make_train_step(config))
  state = setup.state.replace(**r.replicate(setup.state.items()))
  state, m = fn(state, batch)
  jax.block_until_ready(m)
  return [fn, state, batch, []]


def time_interleaved(runs: dict, steps: int, repeats: int) -> dict:
  """Runs each compiled step ``steps`` times per repeat, the runs interleaved so that
  machine noise hits them alike; returns the median seconds per step of each."""
  for _ in range(repeats):
    for run in runs.values():
      fn, state, batch, times = run
      t = time.perf_counter()
      for _ in range(steps):
        state, m = fn(state, batch)
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t) / steps)
      run[1] = state
  return {k: float(np.median(r[3])) for k, r in runs.items()}
