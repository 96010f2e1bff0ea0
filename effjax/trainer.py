"""The training loop: config -> data -> state -> compiled steps -> metrics and checkpoints.

``train_and_evaluate`` is what ``experiments/train.py`` runs; notebooks and tests call it
directly. The loop does no host syncs between logging points: metrics stay on the
devices until ``log_every`` steps have run.
"""

import bisect
import dataclasses
import functools
import json
import math
import os
import time
import uuid
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effjax import adaptive as adaptive_lib
from effjax import checkpoint as ckpt_lib
from effjax import config as config_lib
from effjax import data as data_lib
from effjax import metrics as metrics_lib
from effjax import models
from effjax import optim
from effjax import preemption as preemption_lib
from effjax import steps
from effjax.parallel import Runner, make_mesh

EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
  """Raised when training meets a NaN/Inf loss or gradient (``nonfinite='stop'``) or too many
  consecutive ones (``'skip'``); ``step`` is the step that stopped it."""

  def __init__(self, step: int, skips: int = 0):
    if skips:
      msg = (f"{skips} consecutive non-finite steps, the last at step {step} "
             "(nonfinite='skip'); stopped, the last checkpoint holds the last finite state")
    else:
      msg = (f"non-finite loss or gradient at step {step}; stopped, the last checkpoint "
             "holds the last finite state")
    super().__init__(msg)
    self.step = step


def prepare_workdir(workdir: str) -> str:
  """Checks that ``workdir`` is (or can be made) a writable directory, and creates it.

  Writes and removes a probe file, so read-only filesystems and permissions (also for
  root) are caught before anything else is written. ``workdir`` may be any path
  ``etils.epath`` (and so orbax) accepts: a local one is made absolute, a URL-style one
  (``gs://bucket/run``) is kept as it is, never turned into a local directory.

  Returns:
    The workdir as a string (``gs://...`` or an absolute local path).
  """
  path = ckpt_lib.resolve_path(workdir)
  workdir = os.fspath(path)
  if path.exists() and not path.is_dir():
    raise config_lib.ConfigError(f"workdir {workdir!r} is a file; it must be a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".effjax-write-probe-{os.getpid()}-{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise config_lib.ConfigError(f"workdir {workdir!r} is not writable "
                                 f"({e.strerror or type(e).__name__})") from None
  return workdir


@dataclasses.dataclass
class Setup:
  """What a run is built from; ``build`` makes it from a config (no training yet)."""
  config: ml_collections.ConfigDict
  runner: Runner
  spec: data_lib.DatasetSpec
  model: Any
  state: steps.TrainState      # On the host, freshly initialised.
  train_source: Any = None
  eval_source: Any = None


def _dtype(config) -> Any:
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def _sync(name: str) -> None:
  """All processes meet here (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load_data(config, runner: Runner):
  """Builds (embedded) or finds the dataset; returns its spec and train and eval sources."""
  spec = data_lib.get_spec(config.dataset.name)
  kwargs = dict(data_dir=config.dataset.data_dir or None,
                num_examples=config.dataset.num_examples)
  # Process 0 generates embedded datasets first, so that processes sharing a filesystem
  # never write the same files at once.
  if jax.process_index() == 0:
    builder = data_lib.get_builder(config.dataset.name, **kwargs)
  _sync("effjax_dataset_ready")
  if jax.process_index() != 0:
    builder = data_lib.get_builder(config.dataset.name, **kwargs)
  train_split = config.dataset.train_split or spec.train_split
  eval_split = config.dataset.eval_split or spec.eval_split
  train = data_lib.load_split(builder, train_split, spec)
  evals = data_lib.load_split(builder, eval_split, spec)
  if len(train) != config.dataset.num_train_examples:
    raise config_lib.ConfigError(
        f"dataset.num_train_examples={config.dataset.num_train_examples} but split "
        f"{train_split!r} of {config.dataset.name!r} has {len(train)} examples")
  num_classes = builder.info.features[spec.label_key].num_classes
  if num_classes != spec.num_classes:
    raise data_lib.DatasetError(f"dataset {config.dataset.name!r} in {builder.data_dir!r} has "
                                f"{num_classes} classes; effjax expects {spec.num_classes}")
  return spec, train, evals


def preprocess_fns(config, spec: data_lib.DatasetSpec):
  augment = spec.augment if config.input.augment == "default" else config.input.augment
  kw = dict(augment=augment, image_size=spec.input_shape[0], mean=spec.mean, std=spec.std)
  return (data_lib.make_preprocess_fn(spec.kind, train=True, **kw),
          data_lib.make_preprocess_fn(spec.kind, train=False, **kw))


def build(config, with_data: bool = True, runner: Optional[Runner] = None,
          num_devices: Optional[int] = None) -> Setup:
  """Validates ``config`` and builds the runner, data sources, model and initial state.

  ``num_devices`` is the device count to validate and size for (default: the runner's);
  ``dry_run`` sizes a pod config while compiling for one device."""
  runner = runner or Runner(config.parallel)
  num_devices = num_devices or runner.num_devices
  config_lib.validate(config, num_devices)
  if with_data:
    spec, train, evals = load_data(config, runner)
  else:
    spec, train, evals = data_lib.get_spec(config.dataset.name), None, None
  model = models.create_model(config.model, spec.num_classes, _dtype(config))
  adaptive = config.batch_schedule == "adaptive"
  tx, schedule = optim.create_optimizer(config, config.num_train_steps, inject_lr=True)
  noise_scale = config.noise_scale.enabled
  if noise_scale and num_devices == 1 and config.accum_steps == 1:
    logging.warning("noise_scale.enabled is ignored: estimating it needs two batch sizes, "
                    "i.e. more than one device or accum_steps > 1")
    noise_scale = False
  state = steps.create_train_state(jax.random.key(config.seed), model, tx, schedule,
                                   spec.input_shape, ema=config.ema.enabled,
                                   noise_scale=noise_scale, adaptive_batch=adaptive)
  return Setup(config, runner, spec, model, state, train, evals)


def evaluate(setup: Setup, device_state, eval_fn=None, prefix: str = "eval") -> dict:
  """Loss and accuracy over the whole eval split (the last batch padded and masked)."""
  runner, config = setup.runner, setup.config
  eval_fn = eval_fn or runner.compile(steps.eval_step, donate_state=False)
  _, pre = preprocess_fns(config, setup.spec)
  totals = None
  for batch in data_lib.eval_batches(setup.eval_source, pre,
                                     global_batch_size=config.eval_batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    sums = eval_fn(device_state, runner.shard_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = runner.to_host(totals)
  return {f"{prefix}/loss": float(totals["loss"] / totals["count"]),
          f"{prefix}/accuracy": float(totals["correct"] / totals["count"]),
          f"{prefix}/count": int(totals["count"])}


def evaluate_all(setup: Setup, device_state, eval_fn=None) -> dict:
  """``evaluate`` on the parameters and, when the state keeps one, on their EMA."""
  out = evaluate(setup, device_state, eval_fn)
  if device_state.ema_params:
    out.update(evaluate(setup, device_state.replace(params=device_state.ema_params), eval_fn,
                        prefix="eval_ema"))
  return out


def target_eval_steps(first: int, growth: float, total: int) -> list[int]:
  """Steps at which a run with a target accuracy evaluates: ``first``, then each
  ``ceil(previous * growth)`` (at least one more), up to ``total``. Geometric spacing
  measures steps-to-target to within a factor ``growth`` at any batch size, with a number
  of evaluations that grows only with ``log(total)``."""
  steps, e = [], max(1, int(first))
  while e <= total:
    steps.append(e)
    e = max(e + 1, math.ceil(e * growth))
  return steps


def _max_batch(config) -> int:
  return config.adaptive.max_batch_size or 16 * config.batch_size


def make_train_step(config, multiplier: int = 1):
  """``train_step`` with the config's step hyperparameters bound (label smoothing, EMA,
  accumulation, noise-scale averaging) for a step over ``multiplier`` base batches
  (adaptive batch size): accumulation or per-device batch grows by it
  (``adaptive.grow``), the LR by the scaling rule, and the parameter EMA's momentum
  follows the EMA scaling rule (``decay ** multiplier``)."""
  accum = config.accum_steps
  if multiplier > 1 and config.adaptive.grow == "accumulate":
    accum *= multiplier
  return functools.partial(
      steps.train_step, label_smoothing=config.label_smoothing,
      ema_decay=config.ema.scaled_decay ** multiplier if config.ema.enabled else 0.0,
      accum_steps=accum, noise_scale_decay=config.noise_scale.decay,
      batch_multiplier=multiplier,
      accum_unroll=(config.accum_loop == "unroll" or
                    (config.accum_loop == "auto" and jax.default_backend() == "cpu")),
      lr_factor=adaptive_lib.lr_factor(multiplier, config.optimizer.scaling_rule),
      max_learning_rate=config.adaptive.max_learning_rate,
      nonfinite=config.nonfinite, max_consecutive_skips=config.max_consecutive_skips,
      noise_small_batch=("microbatch" if models.cross_replica_statistics(
          config.model.norm, config.model.bcn_estimated) else "replica"))


def _raise_if_nonfinite(runner: Runner, state, config) -> None:
  bad = int(runner.to_host(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteError(bad, config.max_consecutive_skips if config.nonfinite == "skip" else 0)


def _agree_int(value: int) -> int:
  """Process 0's integer on every process (a collective; call on all at once)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _agree(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (a collective; call at the same step on all)."""
  return bool(_agree_int(int(flag)))


def _mean_of_finite(values) -> float:
  """The mean of the non-NaN values (under nonfinite='skip' a skipped step's loss is NaN),
  or NaN if there are none."""
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _truncate_metrics(workdir: str, step: int) -> None:
  """Drops ``metrics.jsonl`` rows past ``step`` (logged by a run killed after its last
  checkpoint; the resumed run logs those steps again)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return
  lines = path.read_text(encoding="utf-8").splitlines(True)
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError):  # A line cut short by the kill.
      pass
  if len(keep) != len(lines):
    _write_atomic(path, "".join(keep))


def _write_atomic(path: epath.Path, text: str) -> None:
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)


def _config_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def _save_config(workdir: str, config) -> None:
  _write_atomic(epath.Path(workdir) / "config.json", _config_json(config))


def _finished_target_run(workdir: str, config) -> Optional[dict]:
  """The summary of a run in ``workdir`` that already stopped at its target, when this
  config is the same one (``restore='auto'``); else None and the run proceeds, through
  the usual checks (a config that does not match the checkpoints is an error, and
  ``restore='ignore'`` starts afresh)."""
  summary_path = epath.Path(workdir) / "summary.json"
  config_path = epath.Path(workdir) / "config.json"
  if not (config.target.accuracy and config.restore == "auto" and summary_path.exists()
          and config_path.exists()):
    return None
  if config_path.read_text(encoding="utf-8") != _config_json(config):
    return None
  done = json.loads(summary_path.read_text(encoding="utf-8"))
  return done if done.get("target_step") is not None else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       verbose: bool = True, stop_after: Optional[int] = None) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

  Writes ``metrics.jsonl``, TensorBoard events, checkpoints under ``checkpoints/`` and
  ``summary.json``.

  Args:
    config: an experiment config (see ``effjax.config.base_config``).
    workdir: the run's directory; re-running with the same one resumes.
    verbose: print the progress line.
    stop_after: if set, checkpoint and return after this step even though training is
      not finished (time-sliced jobs); calling again resumes from there.

  Returns:
    The summary dict (final eval metrics, steps, wall time); after ``stop_after``, only
    ``final_step`` and ``stopped: True``.

  Raises:
    ConfigError: a bad config value or workdir, or checkpoints in the workdir that do not
      match the config (nothing is written then).
    NonFiniteError: the loss or gradients became NaN/Inf (see ``config.nonfinite``).
    Preempted: SIGTERM/SIGINT arrived; a checkpoint of the step all processes agreed on
      was written first (see ``effjax.preemption``).
  """
  t_start = time.perf_counter()
  runner = Runner(config.parallel)
  config_lib.validate(config, runner.num_devices)
  workdir = prepare_workdir(workdir)
  done = _finished_target_run(workdir, config)
  if done is not None:  # Stopped at its target with this very config: nothing left to do.
    return done
  setup = build(config, runner=runner)
  primary = jax.process_index() == 0
  total = config.num_train_steps

  checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir) / "checkpoints",
                                       config.checkpoint.max_to_keep, sync=_sync,
                                       agree=_agree_int)
  host_items = setup.state.items()
  data_state = None
  try:
    if config.restore == "ignore":
      restored = ckpt_lib.Restored(None)
      moved = checkpointer.set_aside()
      if moved and primary:
        logging.warning("restore='ignore': moved the existing checkpoints to %s", moved)
    else:
      restored = checkpointer.restore_latest(
          ckpt_lib.abstract_like(host_items, runner.replicated))
  except ckpt_lib.CheckpointMismatchError as e:
    checkpointer.close()
    raise config_lib.ConfigError(str(e)) from None
  start = restored.step
  if start is not None:
    host_items, data_state = restored.state, restored.data
  start = start or 0
  if primary:  # Rows a killed run logged after its last checkpoint are logged again.
    _truncate_metrics(workdir, start)
  # Progress, evaluation and checkpoints count base batches (config.batch_size each); an
  # adaptive-batch step consumes `multiplier` of them. Decisions that must replay after a
  # resume are taken from values in the checkpoint (the optimizer step, the multiplier).
  adaptive = config.batch_schedule == "adaptive"
  first = lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x
  opt_step = int(first(host_items["step"]))
  multiplier = int(first(host_items["batch_size_state"].multiplier)) if adaptive else 1
  horizon = 1.0 / (1.0 - config.noise_scale.decay)  # Base steps before the first resize.
  state = setup.state.replace(**runner.replicate(host_items))
  if primary:
    _save_config(workdir, config)

  train_fns: dict = {}

  def train_fn_for(m):
    if m not in train_fns:
      train_fns[m] = runner.compile(make_train_step(config, m))
    return train_fns[m]
  eval_fn = runner.compile(steps.eval_step, donate_state=False)
  train_pre, _ = preprocess_fns(config, setup.spec)
  ds = data_lib.train_dataset(
      setup.train_source, train_pre, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.input.num_threads, prefetch_buffer_size=config.input.host_prefetch,
      num_workers=config.input.num_workers)
  prefetcher = data_lib.Prefetcher(data_lib.make_train_iterator(ds, data_state),
                                   runner.shard_batch, config.input.device_prefetch)
  writer = metrics_lib.MetricWriter(workdir, primary)
  progress = metrics_lib.Progress(total, config.batch_size, start, enabled=verbose and primary)
  for step_, problem in restored.invalid:
    progress.message(f"checkpoint step {step_} is damaged ({problem}); moved it to "
                     f"{checkpointer.directory}.invalid/")
  if start:
    progress.message(f"resumed from step {start} in {workdir}")

  last_save_time = time.monotonic()

  def save(step):
    nonlocal last_save_time
    # Never checkpoint past a non-finite step: the newest checkpoint stays the last good one.
    _raise_if_nonfinite(runner, state, config)
    checkpointer.save(step, runner.unreplicate(state).items(), data_state)
    last_save_time = time.monotonic()

  every_secs = config.checkpoint.every_secs
  multi = jax.process_count() > 1
  guard = preemption_lib.PreemptionGuard()

  pending: list = []
  last_eval: dict = {}
  last_train: dict = {}
  last_noise: dict = {}
  step = start
  end = total if stop_after is None else min(total, max(stop_after, start))
  crossed = lambda prev, new, every: bool(every) and new // every > prev // every
  target = config.target.accuracy
  target_evals = target_eval_steps(config.target.first_eval_step, config.target.eval_growth,
                                   total) if target else []
  target_step = None
  preempted = None
  try:
    guard.__enter__()
    while step < end:
      # Never past the end of training; a stop_after point may fall inside a step, which
      # then finishes (so a stopped and resumed run takes the same steps).
      m = min(multiplier, adaptive_lib.max_multiplier(1, total - step))
      items = [next(prefetcher) for _ in range(m)]
      data_state = items[-1][1]
      batch = runner.concat_batches([b for b, _ in items])
      # Everything the step reads is on the devices already; an implicit transfer (a host
      # array or Python scalar slipping in) is an error, as in big_vision.
      with jax.transfer_guard(config.transfer_guard):
        state, metrics = train_fn_for(m)(state, batch)
      pending.append(metrics)
      prev, step, opt_step = step, step + m, opt_step + 1
      last = step == total
      eval_now = (last or crossed(prev, step, config.eval_every_steps) or
                  bisect.bisect_right(target_evals, step) >
                  bisect.bisect_right(target_evals, prev))
      log_now = opt_step % config.log_every == 0 or eval_now
      if log_now:
        host = runner.to_host(pending)
        scalars = {k: _mean_of_finite([m_[k] for m_ in host]) for k in host[0]}
        last_train = {k: scalars[k] for k in ("train/loss", "train/accuracy")}
        last_noise = {k: host[-1][k] for k in host[-1] if k.startswith("noise_scale/")}
        _raise_if_nonfinite(runner, state, config)
        steps_per_sec, examples_per_sec = progress.rates(step)
        scalars.update(steps_per_sec=steps_per_sec, examples_per_sec=examples_per_sec,
                       epoch=step / config.steps_per_epoch, batch_size=m * config.batch_size,
                       optimizer_step=opt_step)
        if adaptive and step >= horizon:
          # The latest average, not the window's mean: a resume restarts the window.
          b_simple = float(host[-1]["noise_scale/b_simple"])
          new = adaptive_lib.next_multiplier(multiplier, b_simple,
                                             config.batch_size, config.adaptive.multiple,
                                             _max_batch(config))
          scalars["adaptive/b_simple"] = b_simple
          if new != multiplier:
            progress.message(f"step {step}: batch size {multiplier * config.batch_size} -> "
                             f"{new * config.batch_size} (B_simple {b_simple:.0f})")
            multiplier = new
        if eval_now:
          last_eval = evaluate_all(setup, state, eval_fn)
          scalars.update({k: v for k, v in last_eval.items() if not k.endswith("/count")})
          if target and last_eval["eval/accuracy"] >= target:
            target_step = step
        writer.write(step, scalars)
        progress.update(step, steps_per_sec, scalars,
                        f" | eval acc {last_eval['eval/accuracy']:.4f}" if last_eval else "")
        pending = []
      # Time-based saves: checked every step on one process; with several, at log points,
      # where process 0's clock decides for all (their clocks differ).
      time_due = bool(every_secs) and (log_now or not multi) and _agree(
          time.monotonic() - last_save_time >= every_secs)
      stop_now = guard.should_stop(step, log_now)
      if (crossed(prev, step, config.checkpoint.every_steps) or step >= end or
          target_step is not None or time_due or stop_now):
        save(step)
      if stop_now and step < end and target_step is None:
        checkpointer.wait()
        preempted = preemption_lib.Preempted(step, guard.signal_name, workdir)
        progress.message(str(preempted))
        break
      if target_step is not None:
        progress.message(f"reached eval accuracy {last_eval['eval/accuracy']:.4f} >= "
                         f"target {target} at step {step}")
        break
  finally:
    guard.__exit__(None, None, None)
    prefetcher.close()
    checkpointer.close()
    writer.close()
  if preempted is not None:
    raise preempted

  if step < total and target_step is None:
    progress.message(f"stopped after step {step} of {total}; re-run to resume")
    return {"final_step": int(step), "stopped": True}
  if not last_eval:  # Resumed a finished run: evaluate what is there.
    last_eval = evaluate_all(setup, state, eval_fn)
  summary = {
      "final_step": int(step),
      "eval/accuracy": last_eval["eval/accuracy"],
      "eval/loss": last_eval["eval/loss"],
      "eval/count": last_eval["eval/count"],
      **{k: v for k, v in last_eval.items() if k.startswith("eval_ema/")},
      **last_train,  # Means over the last log_every steps (absent after a bare resume).
      "wall_time_sec": time.perf_counter() - t_start,
      "batch_size": config.batch_size,
      "optimizer_steps": opt_step,
      "examples": step * config.batch_size,
      "final_batch_size": multiplier * config.batch_size,
      **({"target_accuracy": target, "target_step": target_step,
          "target_examples": None if target_step is None else target_step * config.batch_size,
          "target_optimizer_step": None if target_step is None else opt_step,
          **{f"target/{k}": float(v) for k, v in last_noise.items()}} if target else {}),
      "num_devices": runner.num_devices,
      "num_processes": jax.process_count(),
  }
  if primary:
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2),
                                                      encoding="utf-8")
    progress.message(
        f"done: step {step}, eval accuracy {summary['eval/accuracy']:.4f}, eval loss "
        f"{summary['eval/loss']:.4f}, wall time {summary['wall_time_sec']:.1f}s")
  return summary


def _sizing_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config ``dry_run`` compiles on one device, once the real one has validated for
  N: grouped BN as sync BN (same memory; groups need N replicas), the adaptive batch at its
  first (base) size, and the noise scale only where one device has two batch sizes
  (microbatches). None of these changes the parameter, optimizer or activation sizes."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.model.norm == "group_batch":
    c.model.norm = "sync_batch"
  c.batch_schedule = "fixed"
  c.noise_scale.enabled = c.noise_scale.enabled and c.accum_steps > 1
  return c


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Builds everything and compiles one train step, without data or training.

  With ``config.dry_run_devices = N`` the step is sized for N devices (per-device batch
  ``batch_size / N``) and compiled for one of them, so a pod config can be checked on a
  laptop.

  Returns:
    ``num_params``, ``per_device_batch``, ``num_devices``, ``flops_per_step`` (XLA cost
    analysis, all devices) and ``memory_per_device_bytes`` (arguments + outputs + temporaries
    of the compiled step, less donated buffers).
  """
  n = int(config.dry_run_devices) or len(jax.devices())
  config_lib.validate(config, n)
  config = _sizing_config(config)
  runner = Runner("shard_map", make_mesh(jax.devices()[:1]))
  setup = build(config, with_data=False, runner=runner, num_devices=n)
  per_device = config.batch_size // n
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  batch = {"input": jax.ShapeDtypeStruct((per_device,) + tuple(setup.spec.input_shape),
                                         jnp.float32, sharding=runner.sharded),
           "label": jax.ShapeDtypeStruct((per_device,), jnp.int32, sharding=runner.sharded)}
  fn = runner.compile(make_train_step(config), check_replicated=False)
  compiled = fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  memory = None
  if mem is not None:
    memory = int(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                 mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return {
      "num_params": int(sum(x.size for x in jax.tree.leaves(setup.state.params))),
      "per_device_batch": per_device,
      "num_devices": n,
      "flops_per_step": float(cost.get("flops", float("nan"))) * n,
      "memory_per_device_bytes": memory,
  }
