"""Reliability: exact resume after SIGKILL, preemption, damaged checkpoints, non-finite
steps, bad input and determinism.

The steps at which subprocesses are killed are drawn from ``random.Random(SEED)``; the
seed is in every assertion message, and ``EFFJAX_TEST_SEED=<seed>`` replays a run.
"""

import functools
import glob
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effjax
from effjax import checkpoint as ckpt_lib
from effjax import steps as steps_lib
from effjax.metrics import read_jsonl
from tests.helpers import (REPO, assert_trees_close, run_cli, snapshot, tiny_config,
                           xla_flags)

SEED = int(os.environ.get("EFFJAX_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
RNG = random.Random(SEED)
TIMING = ("steps_per_sec", "examples_per_sec")

# 62 steps of 128 (2 epochs of the 4000-example canonical split), sync BN, parameter EMA,
# noise scale (over 2 microbatches of the global batch, as sync BN needs), a checkpoint
# every 3 steps and a metrics row every step.
# (curves.png is off in these CLI runs: a plot per run adds seconds and tests nothing here.)
BASE = ["--config=configs/mnist1d_sgd.py:canonical", "--config.num_epochs=2", "--config.curves=False",
        "--config.log_every=1", "--config.model.widths=(16,32)",
        "--config.model.norm=sync_batch", "--config.eval_every_epochs=1",
        "--config.checkpoint.every_steps=3", "--config.ema.enabled=True",
        "--config.noise_scale.enabled=True", "--config.accum_steps=2"]
TOTAL = 62
# The adaptive batch size grows the batch from 128 toward 512 along the noise scale.
ADAPTIVE = BASE + ["--config.num_epochs=3", "--config.batch_schedule=adaptive",
                   "--config.noise_scale.decay=0.9", "--config.adaptive.multiple=10",
                   "--config.adaptive.max_batch_size=512",
                   "--config.adaptive.max_learning_rate=0.3"]
ADAPTIVE_TOTAL = 93
# SimCLR: two views per example drawn in the input pipeline, global negatives, sync BN,
# LARS; 31 steps of 128, a checkpoint every 3 steps and a metrics row every step.
CONTRASTIVE = ["--config=configs/simclr_mnist1d.py:small", "--config.curves=False",
               "--config.dataset.num_examples=5000",
               "--config.num_epochs=1", "--config.log_every=1", "--config.batch_size=128",
               "--config.eval_batch_size=256", "--config.model.widths=(8,16)",
               "--config.model.projection_widths=(32,16)", "--config.eval_every_epochs=1",
               "--config.contrastive.probe_examples=500", "--config.schedule.warmup_epochs=0.2",
               "--config.checkpoint.every_steps=3"]
CONTRASTIVE_TOTAL = 31


def _cli(args, workdir, data_dir, env=None, devices=8):
  full_env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
                  JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train"] + args +
      [f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"],
      cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = [l for l in f.read().splitlines() if l.endswith("}")]
  except FileNotFoundError:
    return -1
  return int(lines[-1].split('"step": ')[1].split(",")[0]) if lines else -1


def _signal_at(procs, workdir, step, sig, target=None, timeout=300):
  """Sends ``sig`` to ``target`` (default: all of ``procs``) once ``step`` is logged."""
  end = time.monotonic() + timeout
  while _last_logged_step(workdir) < step:
    if any(p.poll() is not None for p in procs) or time.monotonic() > end:
      outs = [p.communicate() for p in procs]
      raise AssertionError(f"seed {SEED}: run ended before step {step}: "
                           f"{[o[1][-2000:] for o in outs]}")
    time.sleep(0.01)
  for p in (procs if target is None else [target]):
    p.send_signal(sig)
  return [p.communicate(timeout=timeout) for p in procs]


def _final_checkpoint(workdir):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  ck.close()
  return step, ckpt_lib.read_arrays(os.path.join(workdir, "checkpoints", str(step)))


def _assert_same_run(a, b, msg=""):
  """Bitwise-equal final checkpoints (every array, the data position) and metrics."""
  step_a, (state_a, data_a) = _final_checkpoint(a)
  step_b, (state_b, data_b) = _final_checkpoint(b)
  assert step_a == step_b, msg
  assert data_a == data_b, msg
  flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(state_b)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b], msg
  for (k, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=f"{msg} {jax.tree_util.keystr(k)}")
  strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
  rows_a = strip(read_jsonl(os.path.join(a, "metrics.jsonl")))
  rows_b = strip(read_jsonl(os.path.join(b, "metrics.jsonl")))
  assert rows_a == rows_b, msg


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """Uninterrupted CLI runs of BASE, ADAPTIVE and CONTRASTIVE, with no periodic saves
  (only the final one): the interrupted runs save every 3 steps, so their equality with
  these also shows that the save cadence changes nothing in the run."""
  out = {}
  for name, args in (("base", BASE), ("adaptive", ADAPTIVE), ("contrastive", CONTRASTIVE)):
    workdir = str(tmp_path_factory.mktemp(f"ref_{name}"))
    proc = _cli(args + ["--config.checkpoint.every_steps=0"], workdir, data_dir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    out[name] = workdir
  return out


# --- 1. exact resume after SIGKILL and preemption -----------------------------------------

def _interrupt(args, workdir, data_dir, k, sig, msg, resumes_from=None):
  """One run, interrupted by ``sig`` once step ``k`` is logged. SIGKILL dies at once;
  SIGTERM/SIGINT finish the step in flight, save it, say so on stderr and exit 4 (the
  step saved is returned). ``resumes_from``: the step the run must say it resumed from."""
  proc = _cli(args, workdir, data_dir)
  (out, err), = _signal_at([proc], workdir, k, sig)
  msg = f"{msg}: {sig.name} after step {k}"
  if sig == signal.SIGKILL:  # Its stdout may be lost in the pipe's buffer.
    assert proc.returncode == -signal.SIGKILL, msg
    assert resumes_from is None, "a killed run's stdout cannot show where it resumed"
    return
  if resumes_from is not None:
    assert f"resumed from step {resumes_from} " in out, msg
  assert proc.returncode == effjax.EXIT_PREEMPTED, f"{msg}: {err[-3000:]}"
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"preempted by {sig.name}: saved a checkpoint at step "), last
  saved = int(last.split("at step ")[1].split()[0])
  # The step in flight when the signal came finishes; at most the prefetched ones follow.
  assert k <= saved <= k + 3, msg
  assert _final_checkpoint(workdir)[0] == saved, msg
  assert _last_logged_step(workdir) == saved, msg
  return saved


def _spaced_steps(n, total, gap=5):
  """``n`` sorted random steps in ``[2, total - 4)``, each ``gap`` after the last: a run
  resumed after an interruption logs past the previous one's last rows before the next
  signal is due (a preempted run saves at most 3 steps past its signal)."""
  while True:
    steps = sorted(RNG.sample(range(2, total - 4), n))
    if all(b - a >= gap for a, b in zip(steps, steps[1:])):
      return steps


@pytest.mark.parametrize("name, args, total, signals", [
    ("base", BASE, TOTAL, (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)),
    ("adaptive", ADAPTIVE, ADAPTIVE_TOTAL, (signal.SIGKILL, signal.SIGKILL)),
    ("contrastive", CONTRASTIVE, CONTRASTIVE_TOTAL, (signal.SIGKILL, signal.SIGKILL))])
def test_interrupted_at_random_steps_resumes_bitwise(reference, data_dir, tmp_path, name,
                                                     args, total, signals):
  """Killed twice at random steps (mid-step, mid-save or mid-log), and for the base run
  then preempted by SIGTERM and by SIGINT (each saves the step in flight and exits 4),
  re-run each time: the final parameters, optimizer, BN, EMA, noise-scale and batch-size
  state, the data position and every logged metric equal the uninterrupted run's, bit
  for bit (for the contrastive run, that needs both augmented views replayed exactly).
  The preempted runs are resumed from the step they saved."""
  ks = _spaced_steps(len(signals), total)
  msg = f"seed {SEED}, {name}, {[(s.name, k) for s, k in zip(signals, ks)]}"
  workdir = str(tmp_path / "run")
  saved = None  # The step the last run was preempted at, where the next one resumes.
  for k, sig in zip(ks, signals):
    saved = _interrupt(args, workdir, data_dir, k, sig, msg, resumes_from=saved)
  proc = _cli(args, workdir, data_dir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, f"{msg}: {err[-3000:]}"
  if saved is not None:
    assert f"resumed from step {saved} " in out, msg
  _assert_same_run(reference[name], workdir, msg)


# --- 2. the save interval (preemption of several processes: test_multihost.py, with these
# helpers) -----------------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(args, workdir, data_dir):
  port = _free_port()
  return [_cli(args + [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                       "--config.distributed.num_processes=2",
                       f"--config.distributed.process_id={i}"], workdir, data_dir, devices=4)
          for i in range(2)]


def test_every_secs_bounds_the_work_lost(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"checkpoint.every_secs": 1e-9,
                                    "checkpoint.max_to_keep": 100})
  effjax.train_and_evaluate(config, str(tmp_path / "a"), verbose=False)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "a" / "checkpoints"), 100)
  assert ck.valid_steps() == list(range(1, 32))  # A save after every step.
  ck.close()
  config = tiny_config(data_dir, **{"checkpoint.every_secs": 3600.0})
  effjax.train_and_evaluate(config, str(tmp_path / "b"), verbose=False)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "b" / "checkpoints"))
  assert ck.valid_steps() == [31]  # Only the final one within the hour.
  ck.close()


# --- 3. damaged checkpoints ----------------------------------------------------------------

def _truncate_largest(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/state/**", recursive=True) if os.path.isfile(f)]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def _remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _unfinished(step_dir):  # A save killed before its manifest was written.
  os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))


def _flip_bytes(step_dir):  # Same size, different bytes: only the CRC sees it.
  files = [f for f in glob.glob(f"{step_dir}/state/d/*") if os.path.getsize(f) > 64]
  with open(files[0], "r+b") as f:
    f.seek(32)
    byte = f.read(1)
    f.seek(32)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def inprocess_reference(data_dir, tmp_path_factory):
  # A metrics row every step: a resumed run's rows then equal the uninterrupted ones
  # (with longer windows, the first window after a resume is shorter).
  config = tiny_config(data_dir, num_epochs=2.0, log_every=1,
                       **{"checkpoint.every_steps": 7, "ema.enabled": True})
  workdir = str(tmp_path_factory.mktemp("inproc_ref"))
  effjax.train_and_evaluate(config, workdir, verbose=False)
  return config, workdir


@pytest.mark.parametrize("damage, damaged", [
    (_truncate_largest, (21, 23)), (_remove_metadata, (23,)), (_unfinished, (23,)),
    (_flip_bytes, (23,))])
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(inprocess_reference,
                                                                  tmp_path, capsys, damage,
                                                                  damaged):
  config, ref = inprocess_reference
  workdir = str(tmp_path / "run")
  effjax.train_and_evaluate(config, workdir, verbose=False, stop_after=23)
  ck_dir = os.path.join(workdir, "checkpoints")
  assert ckpt_lib.Checkpointer(ck_dir).valid_steps() == [14, 21, 23]
  for step in damaged:
    damage(os.path.join(ck_dir, str(step)))
  fallback = 21 if damaged == (23,) else 14
  effjax.train_and_evaluate(config, workdir, verbose=True)
  out = capsys.readouterr().out
  for step in damaged:
    assert f"checkpoint step {step} is damaged (" in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints.invalid", str(step)))
  assert f"resumed from step {fallback}" in out
  _assert_same_run(ref, workdir)


def _tiny_state():
  return {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(1)}


def test_valid_checkpoint_is_kept_while_newer_ones_are_invalid(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), max_to_keep=1)
  ck.save(1, _tiny_state(), {"pos": 1})
  ck.wait()
  for newer, damage in ((2, _flip_bytes), (3, _unfinished), (4, _truncate_largest)):
    shutil.copytree(ck.step_dir(1), ck.step_dir(newer))
    damage(ck.step_dir(newer))
  ck._prune()  # pylint: disable=protected-access
  assert ck.all_steps() == [1, 2, 3, 4] and ck.valid_steps(checksums=True) == [1]
  # A verified newer save lets 1 go; the damaged ones are never deleted by pruning.
  ck.save(5, _tiny_state(), {"pos": 5})
  ck.wait()
  assert ck.all_steps() == [2, 3, 4, 5] and ck.valid_steps(checksums=True) == [5]
  ck.close()


def test_no_valid_checkpoint_at_all_starts_afresh_without_deleting(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"checkpoint.every_steps": 10})
  workdir = str(tmp_path / "run")
  effjax.train_and_evaluate(config, workdir, verbose=False, stop_after=10)
  _unfinished(os.path.join(workdir, "checkpoints", "10"))
  summary = effjax.train_and_evaluate(config, workdir, verbose=False)
  assert summary["final_step"] == 31
  assert os.path.isdir(os.path.join(workdir, "checkpoints.invalid", "10"))


def test_checkpoint_restore_never_unpickles(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "run")
  effjax.train_and_evaluate(config, workdir, verbose=False, stop_after=5)

  def refuse(*a, **k):
    raise AssertionError("pickle used")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  setup = effjax.trainer.build(config, with_data=False)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  got = ck.restore_latest(ckpt_lib.abstract_like(setup.state.items(), setup.runner.replicated))
  ck.close()
  assert got.step == 5 and got.data and not got.invalid


def test_model_that_does_not_match_the_checkpoint_is_refused(reference, data_dir, tmp_path):
  """A copy of the uninterrupted base run's workdir (final checkpoint at step 62),
  re-run with a wider model: refused in one line naming the first mismatching parameter,
  nothing changed; with ``restore=ignore`` the checkpoints are moved aside and it trains."""
  workdir = tmp_path / "run"
  shutil.copytree(reference["base"], workdir)
  before = snapshot(workdir)
  wider = [a.replace("widths=(16,32)", "widths=(16,48)") for a in BASE] + [
      "--config.num_epochs=0.2", f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"]
  proc = run_cli(wider)
  assert proc.returncode == 2
  line, = proc.stderr.strip().splitlines()
  assert line.startswith(f"error: checkpoint step {TOTAL} in ")
  # The first mismatching parameter, by path.
  assert (": params/BatchNorm_1/bias has shape (32,) in the checkpoint and (48,) in the "
          "config;") in line, line
  assert line.endswith("use a new workdir or --config.restore=ignore")
  assert snapshot(workdir) == before
  proc = run_cli(wider + ["--config.restore=ignore"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.isdir(workdir / "checkpoints.replaced" / str(TOTAL))


# --- 4. non-finite values ------------------------------------------------------------------

def test_skip_drops_nonfinite_updates_counts_them_and_stops_after_n(data_dir):
  """With batches finite, NaN, NaN, finite, NaN, NaN, NaN, finite: the finite steps equal
  steps on the finite batches alone (bitwise), each NaN step changes nothing but the
  counters, and the third NaN in a row marks the stop step; nothing changes after it."""
  del data_dir
  model = effjax.models.create_model(_mlp_config(), 3, jnp.float32)
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps_lib.create_train_state(jax.random.key(0), model, tx, optax.constant_schedule(0.1),
                                       (4,))
  runner = effjax.Runner("shard_map")
  skip = runner.compile(functools.partial(steps_lib.train_step, nonfinite="skip",
                                          max_consecutive_skips=3))
  plain = runner.compile(steps_lib.train_step)
  rng = np.random.default_rng(0)
  nan = [False, True, True, False, True, True, True, False]
  batches = []
  for bad in nan:
    x = rng.normal(size=(16, 4)).astype(np.float32)
    if bad:
      x[3, 1] = np.nan
    batches.append({"input": x, "label": rng.integers(0, 3, 16).astype(np.int32)})
  s = state.replace(**runner.replicate(state.items()))
  ref = state.replace(**runner.replicate(state.items()))
  host = lambda t: jax.tree.map(np.asarray, runner.unreplicate(t))
  for i, (batch, bad) in enumerate(zip(batches, nan)):
    before = host(s.items())
    s, metrics = skip(s, runner.shard_batch(batch))
    after = host(s.items())
    if i < 6 and not bad:
      ref, _ = plain(ref, runner.shard_batch(batch))
      assert_trees_close(host(ref.params), after["params"], rtol=0, atol=0)
    if bad or i >= 6:
      assert_trees_close((before["params"], before["opt_state"]),
                         (after["params"], after["opt_state"]), rtol=0, atol=0)
    assert int(after["step"]) == i + 1
    assert int(after["skips"].total) == sum(nan[:i + 1])
    assert float(host(metrics)["nonfinite/skipped"]) == sum(nan[:i + 1])
  assert int(after["nonfinite_step"]) == 6  # The third consecutive NaN step.
  assert int(after["skips"].consecutive) == 0


def test_nonfinite_update_from_finite_inputs_is_kept_out(data_dir):
  """An update that the optimizer itself makes non-finite (finite loss and gradient) is
  dropped under 'skip' like a NaN batch: parameters and optimizer state (its momentum
  included) stay bitwise as they were, and the next step equals a run without it. The
  same with the new optimizer state recomputed for the guard (``recompute_opt_state``,
  the trainer's choice for SGD/momentum/AdamW), whose steps equal the stored state's up
  to float32 rounding (the two computations of the momentum may differ by an ulp, where
  XLA contracts its multiply-add into an FMA in one and not the other)."""
  del data_dir
  model = effjax.models.create_model(_mlp_config(), 3, jnp.float32)
  blow_up = optax.stateless(lambda u, _: jax.tree.map(
      lambda x: x * jnp.where(optax.tree.norm(u) > 1e3, jnp.nan, 1.0), u))
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), blow_up)
  state = steps_lib.create_train_state(jax.random.key(0), model, tx,
                                       optax.constant_schedule(0.1), (4,))
  runner = effjax.Runner("shard_map")
  rng = np.random.default_rng(1)
  batch = lambda scale: {"input": (scale * rng.normal(size=(16, 4))).astype(np.float32),
                         "label": rng.integers(0, 3, 16).astype(np.int32)}
  big_host = batch(1e7)
  b0, big, b2 = (runner.shard_batch(b) for b in (batch(1.0), big_host, batch(1.0)))
  host = lambda t: jax.tree.map(np.asarray, t)
  runs = {}
  for recompute in (False, True):
    step = runner.compile(functools.partial(steps_lib.train_step, nonfinite="skip",
                                            recompute_opt_state=recompute))
    s, _ = step(state.replace(**runner.replicate(state.items())), b0)
    before = host(s.items())
    s, metrics = step(s, big)
    m = runner.to_host(metrics)
    assert np.isfinite(m["train/loss"]) and np.isfinite(m["grad_norm"])
    assert np.isnan(m["update_norm"]) and int(m["nonfinite/skipped"]) == 1
    after = host(s.items())
    assert_trees_close((before["params"], before["opt_state"]),
                       (after["params"], after["opt_state"]), rtol=0, atol=0)
    ref, _ = step(state.replace(**runner.replicate(state.items())), b0)
    ref, _ = step(ref, b2)
    s, _ = step(s, b2)
    assert_trees_close(host(ref.params), host(s.params), rtol=0, atol=0)
    runs[recompute] = host(s.items())
  assert_trees_close((runs[False]["params"], runs[False]["opt_state"]),
                     (runs[True]["params"], runs[True]["opt_state"]), rtol=1e-6, atol=1e-8)
  # Not vacuous: the momentum the kept-out step would have written differs from the
  # one kept.
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, big_host["input"]), big_host["label"]).mean())(
          before["params"])
  _, would_be = tx.update(grads, before["opt_state"], before["params"])
  assert not np.allclose(jax.tree.leaves(would_be)[0], jax.tree.leaves(before["opt_state"])[0])


def _mlp_config():
  c = effjax.config.base_config().model
  c.name = "mlp"
  c.widths = (8,)
  c.norm = "none"
  return c


def test_skip_mode_stops_after_n_consecutive_with_the_step(data_dir, tmp_path):
  config = tiny_config(data_dir, nonfinite="skip", max_consecutive_skips=4,
                       **{"optimizer.name": "sgd", "optimizer.base_learning_rate": 1e30,
                          "checkpoint.every_steps": 1, "schedule.warmup_epochs": 0.0,
                          "log_every": 10})
  with pytest.raises(effjax.NonFiniteError) as e:
    effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert str(e.value).startswith(f"4 consecutive non-finite steps, the last at step "
                                 f"{e.value.step} (nonfinite='skip')")
  assert e.value.step >= 3
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.latest_step() <= e.value.step
  ck.close()


# --- 5. bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--config.checkpoint.every_minutes=3"], "unknown config key"),
    (["--config.accum_steps=3"], "accum_steps=3 does not divide the per-device batch of 16"),
    (["--config.batch_size=-8"], "batch_size=-8 must be a positive integer"),
    (["--config.optimizer.base_learning_rate=0"],
     "optimizer.base_learning_rate=0.0 must be a positive number"),
    (["--config.nonfinite=ignore"], "nonfinite='ignore' is not one of ('stop', 'skip')"),
    (["--config.restore=latest"], "restore='latest' is not one of ('auto', 'ignore')"),
    (["--config.checkpoint.every_secs=-1"], "checkpoint.every_secs=-1.0 must be >= 0"),
    (["--config.dataset.name=imagenet2012", "--config.model.name=resnet50",
      "--config.dataset.num_train_examples=1281167"], "dataset 'imagenet2012' not found"),
])
def test_more_bad_input_is_one_line_and_leaves_the_workdir(data_dir, tmp_path, args, expected):
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = snapshot(workdir)
  proc = run_cli(BASE + [f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"] + args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line, = proc.stderr.strip().splitlines()
  assert line.startswith("error: ") and expected in line, line
  assert snapshot(workdir) == before


def test_workdir_that_is_not_writable_is_refused(data_dir, tmp_path):
  if os.geteuid() == 0:  # Root writes through permissions; sysfs refuses even root.
    target = "/sys/effjax-workdir"
  else:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = str(locked / "work")
  proc = run_cli(BASE + [f"--workdir={target}", f"--config.dataset.data_dir={data_dir}"])
  assert proc.returncode == 2
  line, = proc.stderr.strip().splitlines()
  assert line.startswith(f"error: workdir '{target}' is not writable ("), line
  assert not os.path.exists(target)


# --- 6. determinism ------------------------------------------------------------------------

def test_same_seed_same_metrics_and_another_seed_differs(data_dir, tmp_path):
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    effjax.train_and_evaluate(tiny_config(data_dir, seed=seed), str(tmp_path / name),
                              verbose=False)
    rows = read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    runs[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
  assert runs["a"] == runs["b"] and len(runs["a"]) == 7
  assert runs["a"][0]["train/loss"] != runs["c"][0]["train/loss"]
