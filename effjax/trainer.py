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
from effjax import fsdp as fsdp_lib
from effjax import metrics as metrics_lib
from effjax import models
from effjax import optim
from effjax import preemption as preemption_lib
from effjax import steps
from effjax import tasks
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


def _refuse_file_workdir(path: epath.Path) -> None:
  if path.exists() and not path.is_dir():
    raise config_lib.ConfigError(f"workdir {os.fspath(path)!r} is a file; it must be a "
                                 "directory")


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
  _refuse_file_workdir(path)
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
  task: tasks.Task = tasks.CLASSIFICATION
  compiled: dict = dataclasses.field(default_factory=dict)  # Eval functions, compiled once.


def _dtype(config) -> Any:
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def _sync(name: str) -> None:
  """All processes meet here (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _check_sources(config, spec, builder, train, train_split: str) -> None:
  if spec.kind == "text":  # num_train_examples is the budget of one schedule "epoch".
    if len(train) < 1:
      raise data_lib.DatasetError(f"dataset {config.dataset.name!r} split {train_split!r} "
                                  f"holds no full sequence of {config.dataset.seq_len} tokens")
    return
  if len(train) != config.dataset.num_train_examples:
    raise config_lib.ConfigError(
        f"dataset.num_train_examples={config.dataset.num_train_examples} but split "
        f"{train_split!r} of {config.dataset.name!r} has {len(train)} examples")
  num_classes = builder.info.features[spec.label_key].num_classes
  if num_classes != spec.num_classes:
    raise data_lib.DatasetError(f"dataset {config.dataset.name!r} in {builder.data_dir!r} has "
                                f"{num_classes} classes; effjax expects {spec.num_classes}")


def load_data(config, runner: Runner):
  """Builds (embedded) or finds the dataset; returns its spec and train and eval sources."""
  del runner
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
  seq_len = config.dataset.seq_len
  train = data_lib.load_split(builder, train_split, spec, seq_len, train=True)
  evals = data_lib.load_split(builder, eval_split, spec, seq_len, train=False)
  _check_sources(config, spec, builder, train, train_split)
  return spec, train, evals


def preprocess_fns(config, spec: data_lib.DatasetSpec, task: Optional[tasks.Task] = None):
  """The train and eval host preprocessing: the dataset's, then the task's
  (``Task.preprocess``, e.g. a contrastive task's two views)."""
  augment = spec.augment if config.input.augment == "default" else config.input.augment
  image_size = spec.input_shape[0] if spec.input_shape else 0
  kw = dict(augment=augment, image_size=image_size, mean=spec.mean, std=spec.std)
  train = data_lib.make_preprocess_fn(spec.kind, train=True, **kw)
  evals = data_lib.make_preprocess_fn(spec.kind, train=False, **kw)
  if task is None:
    return train, evals
  return (lambda b, r: task.preprocess(train(b, r), r, True),
          lambda b, r: task.preprocess(evals(b, r), r, False))


def build(config, with_data: bool = True, runner: Optional[Runner] = None,
          num_devices: Optional[int] = None, task: Optional[tasks.Task] = None,
          model: Any = None, abstract: bool = False) -> Setup:
  """Validates ``config`` and builds the runner, data sources, task, model and initial
  state.

  ``num_devices`` is the device count to validate and size for (default: the runner's);
  ``dry_run`` sizes a pod config while compiling for one device. ``task`` and ``model``
  replace the config's (``config.task``, ``config.model``): a user's own. ``abstract``:
  the state's arrays are ``ShapeDtypeStruct``s (nothing is allocated)."""
  runner = runner or Runner.from_config(config)
  num_devices = num_devices or runner.num_devices
  config_lib.validate(config, num_devices)
  if with_data:
    spec, train, evals = load_data(config, runner)
  else:
    spec, train, evals = data_lib.get_spec(config.dataset.name), None, None
  task = task or tasks.create_task(config)
  if model is None:
    model = models.create_model(
        config.model, spec.num_classes, _dtype(config), seq_len=config.dataset.seq_len,
        logit_params=config.task == "contrastive" and config.contrastive.loss == "sigmoid")
  input_shape = data_lib.input_shape(spec, config.dataset.seq_len)
  tx, schedule = optim.create_optimizer(config, config.num_train_steps, inject_lr=True,
                                        sharded=_sharded_mask(runner, model, task, input_shape))
  noise_scale = config.noise_scale.enabled
  if noise_scale and num_devices == 1 and config.accum_steps == 1:
    logging.warning("noise_scale.enabled is ignored: estimating it needs two batch sizes, "
                    "i.e. more than one device or accum_steps > 1")
    noise_scale = False
  make_state = functools.partial(
      steps.create_train_state, jax.random.key(config.seed), model, tx, schedule,
      input_shape, ema=config.ema.enabled, noise_scale=noise_scale,
      adaptive_batch=config.batch_schedule != "fixed", task=task)
  state = jax.eval_shape(make_state) if abstract else make_state()
  return Setup(config, runner, spec, model, state, train, evals, task)


def _sharded_mask(runner: Runner, model, task, input_shape):
  """``effjax.fsdp.sharded_mask`` of the model's parameters on the runner's mesh (None
  without FSDP)."""
  if runner.fsdp == 1:
    return None
  params = jax.eval_shape(lambda r: task.init_variables(model, r, tuple(input_shape)),
                          jax.random.key(0))["params"]
  return fsdp_lib.sharded_mask(params, runner.fsdp, runner.fsdp_min_size)


def compile_eval(setup: Setup):
  """The task's eval step, compiled for the setup's runner."""
  return setup.runner.compile(functools.partial(steps.eval_step, task=setup.task),
                              donate_state=False)


def evaluate(setup: Setup, device_state, eval_fn=None, prefix: str = "eval") -> dict:
  """The task's eval metrics over the whole eval split (the last batch padded and masked):
  ``<prefix>/loss``, ``<prefix>/count`` and the task's (classification: ``accuracy``;
  LM: ``accuracy``, ``bits_per_byte``)."""
  runner, config = setup.runner, setup.config
  eval_fn = eval_fn or compile_eval(setup)
  totals = None
  for batch in _eval_batches(setup, setup.eval_source):
    sums = eval_fn(device_state, runner.shard_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: np.asarray(x, np.float64), runner.to_host(totals))
  out = setup.task.eval_metrics(totals)
  if setup.task.probe_examples:
    out.update(_probe_metrics(setup, device_state))
  return {f"{prefix}/{k}": v for k, v in out.items()}


def _eval_batches(setup: Setup, source):
  """This process's shares of the global eval batches covering ``source``."""
  _, pre = preprocess_fns(setup.config, setup.spec, setup.task)
  return data_lib.eval_batches(source, pre, global_batch_size=setup.config.eval_batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


def _probe_metrics(setup: Setup, device_state) -> dict:
  """``Task.rows_metrics`` of the task's per-row eval outputs on its first
  ``probe_examples`` train rows and on the eval split (padding rows dropped)."""
  if "rows" not in setup.compiled:
    setup.compiled["rows"] = setup.runner.compile_rows(functools.partial(
        steps.eval_rows_step, task=setup.task))
  rows_fn, runner = setup.compiled["rows"], setup.runner

  def collect(source):
    parts = [runner.rows_to_host(rows_fn(device_state, runner.shard_batch(batch)))
             for batch in _eval_batches(setup, source)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = rows.pop("mask") > 0
    return {k: v[keep] for k, v in rows.items()}

  head = data_lib.Head(setup.train_source, setup.task.probe_examples)  # In stored order.
  return setup.task.rows_metrics(collect(head), collect(setup.eval_source))


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
  if config.batch_schedule == "warmup":
    return config.batch_warmup.final_batch_size
  return config.adaptive.max_batch_size or 16 * config.batch_size


def tokens_per_example(config) -> int:
  """Tokens in one example: the sequence length for text, else 1 (an example)."""
  return int(config.dataset.seq_len) if data_lib.get_spec(
      config.dataset.name).kind == "text" else 1


def warmup_multiplier(config, base_step: int) -> int:
  """The batch multiplier of ``batch_schedule='warmup'`` after ``base_step`` base batches."""
  return adaptive_lib.warmup_multiplier(
      base_step, config.batch_size, config.batch_warmup.final_batch_size,
      config.batch_warmup.tokens // tokens_per_example(config))


def make_train_step(config, multiplier: int = 1, task: Optional[tasks.Task] = None):
  """``train_step`` with the config's task and step hyperparameters bound (EMA,
  accumulation, noise-scale averaging, the dropout seed) for a step over ``multiplier``
  base batches (adaptive batch size, batch warmup): accumulation or per-device batch
  grows by it (``adaptive.grow``), the LR by the scaling rule, and the parameter EMA's
  momentum follows the EMA scaling rule (``decay ** multiplier``)."""
  accum = config.accum_steps
  task = task or tasks.create_task(config)
  if multiplier > 1 and config.adaptive.grow == "accumulate":
    accum *= multiplier
  return functools.partial(
      steps.train_step, task=task,
      ema_decay=config.ema.scaled_decay ** multiplier if config.ema.enabled else 0.0,
      accum_steps=accum, noise_scale_decay=config.noise_scale.decay,
      batch_multiplier=multiplier,
      accum_unroll=(config.accum_loop == "unroll" or
                    (config.accum_loop == "auto" and jax.default_backend() == "cpu")),
      lr_factor=adaptive_lib.lr_factor(multiplier, config.optimizer.scaling_rule),
      max_learning_rate=config.adaptive.max_learning_rate,
      nonfinite=config.nonfinite, max_consecutive_skips=config.max_consecutive_skips,
      noise_small_batch=("microbatch" if (task.cross_replica or config.mesh.fsdp > 1 or
                                          models.cross_replica_statistics(
                                              config.model.norm, config.model.bcn_estimated))
                         else "replica"),
      seed=config.seed,
      recompute_opt_state=config.optimizer.name in optim.ELEMENTWISE_OPTIMIZERS)


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
  if not (_target(config) and config.restore == "auto" and summary_path.exists()
          and config_path.exists()):
    return None
  if config_path.read_text(encoding="utf-8") != _config_json(config):
    return None
  done = json.loads(summary_path.read_text(encoding="utf-8"))
  return done if done.get("target_step") is not None else None


def _target(config) -> Optional[tuple[str, float, bool]]:
  """``(eval metric, value, higher is better)`` of a steps-to-target run, or None."""
  if config.target.accuracy:
    return "eval/accuracy", float(config.target.accuracy), True
  if config.target.loss:
    return "eval/loss", float(config.target.loss), False
  return None


def _reached(target, metrics: dict) -> bool:
  if target is None or not metrics:
    return False
  name, value, higher = target
  return metrics[name] >= value if higher else metrics[name] <= value


@dataclasses.dataclass
class _Loop:
  """What the loop carries from one step to the next (all on the host)."""
  step: int                 # Base batches consumed (progress, schedule, eval, checkpoints).
  opt_step: int             # Optimizer steps taken.
  multiplier: int           # Base batches per step (adaptive batch, batch warmup).
  data_state: Any = None    # The input pipeline's position after the last batch.
  pending: list = dataclasses.field(default_factory=list)  # Metrics not yet fetched.
  last_eval: dict = dataclasses.field(default_factory=dict)
  last_train: dict = dataclasses.field(default_factory=dict)
  last_noise: dict = dataclasses.field(default_factory=dict)
  target_step: Optional[int] = None
  last_save_time: float = dataclasses.field(default_factory=time.monotonic)


class _Run:
  """The resources of one ``train_and_evaluate`` call: restored state, compiled steps,
  input, checkpointer, writer and progress line. ``close`` releases them."""

  def __init__(self, setup: Setup, workdir: str, verbose: bool):
    config, runner = setup.config, setup.runner
    self.setup, self.config, self.runner, self.workdir = setup, config, runner, workdir
    self.primary = jax.process_index() == 0
    self.checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir) / "checkpoints",
                                              config.checkpoint.max_to_keep, sync=_sync,
                                              agree=_agree_int)
    try:
      restored = self._restore()
    except ckpt_lib.CheckpointMismatchError as e:
      self.checkpointer.close()
      raise config_lib.ConfigError(str(e)) from None
    host_items = restored.state if restored.step is not None else setup.state.items()
    start = restored.step or 0
    if self.primary:  # Rows a killed run logged after its last checkpoint are logged again.
      _truncate_metrics(workdir, start)
    # Decisions that must replay after a resume come from values in the checkpoint.
    first = lambda x: (np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array)
                       else x)
    size = host_items["batch_size_state"]
    self.loop = _Loop(step=start, opt_step=int(first(host_items["step"])),
                      multiplier=int(first(size.multiplier)) if size else 1,
                      data_state=restored.data if restored.step is not None else None)
    self.state = runner.place_state(setup.state.replace(**host_items))
    if self.primary:
      _save_config(workdir, config)
    self._train_fns: dict = {}
    self.eval_fn = compile_eval(setup)
    self.prefetcher = self._input_stream(self.loop.data_state)
    self.writer = metrics_lib.MetricWriter(workdir, self.primary)
    self.progress = metrics_lib.Progress(config.num_train_steps, config.batch_size, start,
                                         enabled=verbose and self.primary)
    for step_, problem in restored.invalid:
      self.progress.message(f"checkpoint step {step_} is damaged ({problem}); moved it to "
                            f"{self.checkpointer.directory}.invalid/")
    if start:
      self.progress.message(f"resumed from step {start} in {workdir}")

  def _restore(self) -> ckpt_lib.Restored:
    if self.config.restore == "ignore":
      moved = self.checkpointer.set_aside()
      if moved and self.primary:
        logging.warning("restore='ignore': moved the existing checkpoints to %s", moved)
      return ckpt_lib.Restored(None)
    return self.checkpointer.restore_latest(
        ckpt_lib.abstract_like(self.setup.state.items(),
                               self.runner.state_shardings(self.setup.state.items())))

  def _input_stream(self, data_state):
    config = self.config
    train_pre, _ = preprocess_fns(config, self.setup.spec, self.setup.task)
    ds = data_lib.train_dataset(
        self.setup.train_source, train_pre, global_batch_size=config.batch_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=config.input.num_threads,
        prefetch_buffer_size=config.input.host_prefetch,
        num_workers=config.input.num_workers)
    return data_lib.Prefetcher(data_lib.make_train_iterator(ds, data_state),
                               self.runner.shard_batch, config.input.device_prefetch)

  def train_fn(self, m: int):
    if m not in self._train_fns:
      self._train_fns[m] = self.runner.compile(make_train_step(self.config, m,
                                                               self.setup.task))
    return self._train_fns[m]

  def save(self, step: int) -> None:
    # Never checkpoint past a non-finite step: the newest checkpoint stays the last good one.
    _raise_if_nonfinite(self.runner, self.state, self.config)
    items = self.runner.unreplicate(self.state).items()
    if items["batch_size_state"]:
      # The multiplier the *next* step uses (the adapt phase may have just changed it), not
      # the last step's: a run resumed from here continues with the batch it would have had.
      items["batch_size_state"] = items["batch_size_state"]._replace(
          multiplier=jax.make_array_from_callback(
              (), self.runner.replicated, lambda _: np.int32(self.loop.multiplier)))
    self.checkpointer.save(step, items, self.loop.data_state)
    self.loop.last_save_time = time.monotonic()

  def close(self) -> None:
    self.prefetcher.close()
    self.checkpointer.close()
    self.writer.close()


def _crossed(prev: int, new: int, every: int) -> bool:
  return bool(every) and new // every > prev // every


def _input(run: _Run):
  """Phase *input*: the next step's batch, ``multiplier`` base batches concatenated on
  the devices. Never past the end of training; a ``stop_after`` point may fall inside a
  step, which then finishes (so a stopped and resumed run takes the same steps)."""
  loop = run.loop
  m = min(loop.multiplier, adaptive_lib.max_multiplier(1, run.config.num_train_steps - loop.step))
  items = [next(run.prefetcher) for _ in range(m)]
  loop.data_state = items[-1][1]
  return run.runner.concat_batches([b for b, _ in items]), m


def _train_step(run: _Run, batch, m: int) -> int:
  """Phase *step*: one optimizer step; returns the previous base step. Everything the
  step reads is on the devices already; an implicit transfer (a host array or Python
  scalar slipping in) is an error, as in big_vision."""
  loop = run.loop
  with jax.transfer_guard(run.config.transfer_guard):
    run.state, metrics = run.train_fn(m)(run.state, batch)
  loop.pending.append(metrics)
  prev = loop.step
  loop.step, loop.opt_step = loop.step + m, loop.opt_step + 1
  return prev


def _log(run: _Run, m: int) -> dict:
  """Phase *log*: fetches the pending metrics (the only host sync between log points),
  stops on NaN/Inf, and returns the means with rates and counters."""
  loop, config = run.loop, run.config
  host = run.runner.to_host(loop.pending)
  loop.pending = []
  scalars = {k: _mean_of_finite([m_[k] for m_ in host]) for k in host[0]}
  loop.last_train = {k: v for k, v in scalars.items() if k.startswith("train/")}
  loop.last_noise = {k: host[-1][k] for k in host[-1] if k.startswith("noise_scale/")}
  _raise_if_nonfinite(run.runner, run.state, config)
  steps_per_sec, examples_per_sec = run.progress.rates(loop.step)
  scalars.update(steps_per_sec=steps_per_sec, examples_per_sec=examples_per_sec,
                 epoch=loop.step / config.steps_per_epoch, batch_size=m * config.batch_size,
                 optimizer_step=loop.opt_step)
  per = tokens_per_example(config)
  if per > 1:
    scalars.update(tokens_per_sec=examples_per_sec * per,
                   tokens=loop.step * config.batch_size * per)
  if "noise_scale/b_simple" in host[-1]:
    # The latest average, not the window's mean: a resume restarts the window.
    scalars["adaptive/b_simple"] = float(host[-1]["noise_scale/b_simple"])
  return scalars


def _adapt(run: _Run, scalars: Optional[dict]) -> None:
  """Phase *adapt*: the batch multiplier for the next steps: the batch warmup's (a
  function of the data consumed), or the adaptive batch's (from the noise scale, at log
  points once its average has a horizon of data behind it)."""
  loop, config = run.loop, run.config
  if config.batch_schedule == "warmup":
    new = warmup_multiplier(config, loop.step)
  elif (config.batch_schedule == "adaptive" and scalars is not None and
        loop.step >= 1.0 / (1.0 - config.noise_scale.decay)):
    new = adaptive_lib.next_multiplier(loop.multiplier, scalars["adaptive/b_simple"],
                                       config.batch_size, config.adaptive.multiple,
                                       _max_batch(config))
  else:
    return
  if new != loop.multiplier:
    note = (f" (B_simple {scalars['adaptive/b_simple']:.0f})"
            if config.batch_schedule == "adaptive" else " (batch warmup)")
    run.progress.message(f"step {loop.step}: batch size {loop.multiplier * config.batch_size}"
                         f" -> {new * config.batch_size}{note}")
    loop.multiplier = new


def _eval(run: _Run, scalars: dict) -> None:
  """Phase *eval*: the eval metrics (and the EMA's), and whether the target is reached."""
  loop = run.loop
  loop.last_eval = evaluate_all(run.setup, run.state, run.eval_fn)
  scalars.update({k: v for k, v in loop.last_eval.items() if not k.endswith("/count")})
  if _reached(_target(run.config), loop.last_eval):
    loop.target_step = loop.step


def _headline(run: _Run) -> str:
  name = run.setup.task.headline
  ev = run.loop.last_eval
  return f" | {name} {ev[name]:.4f}" if name in ev else ""


def _save_due(run: _Run, prev: int, end: int, log_now: bool, stop_now: bool) -> bool:
  """Phase *save*, the decision. Time-based saves are checked every step on one process;
  with several, at log points, where process 0's clock decides for all (their clocks
  differ)."""
  config, loop = run.config, run.loop
  every_secs = config.checkpoint.every_secs
  time_due = bool(every_secs) and (log_now or jax.process_count() == 1) and _agree(
      time.monotonic() - loop.last_save_time >= every_secs)
  return (_crossed(prev, loop.step, config.checkpoint.every_steps) or loop.step >= end or
          loop.target_step is not None or time_due or stop_now)


def _run_loop(run: _Run, end: int, guard) -> Optional[preemption_lib.Preempted]:
  """The loop's skeleton: input, step, log (+ eval, adapt), save, until ``end``, the
  target, or a stop signal. Returns the ``Preempted`` to raise, if a signal came."""
  config, loop = run.config, run.loop
  target_evals = (target_eval_steps(config.target.first_eval_step, config.target.eval_growth,
                                    config.num_train_steps) if _target(config) else [])
  _adapt(run, None)
  while loop.step < end:
    batch, m = _input(run)
    prev = _train_step(run, batch, m)
    eval_now = (loop.step == config.num_train_steps or
                _crossed(prev, loop.step, config.eval_every_steps) or
                bisect.bisect_right(target_evals, loop.step) >
                bisect.bisect_right(target_evals, prev))
    log_now = loop.opt_step % config.log_every == 0 or eval_now
    if log_now:
      scalars = _log(run, m)
      if eval_now:
        t_eval = time.perf_counter()
        _eval(run, scalars)
        run.progress.exclude(time.perf_counter() - t_eval)
      run.writer.write(loop.step, scalars)
      run.progress.update(loop.step, scalars["steps_per_sec"], scalars, _headline(run))
    _adapt(run, scalars if log_now else None)
    stop_now = guard.should_stop(loop.step, log_now)
    if _save_due(run, prev, end, log_now, stop_now):
      t_save = time.perf_counter()
      run.save(loop.step)
      run.progress.exclude(time.perf_counter() - t_save)
    if stop_now and loop.step < end and loop.target_step is None:
      run.checkpointer.wait()
      preempted = preemption_lib.Preempted(loop.step, guard.signal_name, run.workdir)
      run.progress.message(str(preempted))
      return preempted
    if loop.target_step is not None:
      name, value, _ = _target(config)
      run.progress.message(f"reached {name} {loop.last_eval[name]:.4f} (target {value}) at "
                           f"step {loop.step}")
      return None
  return None


def _summary(run: _Run, t_start: float) -> dict:
  """The final eval metrics, counters and (task) baselines, as written to summary.json."""
  config, loop, runner = run.config, run.loop, run.runner
  if not loop.last_eval:  # Resumed a finished run: evaluate what is there.
    loop.last_eval = evaluate_all(run.setup, run.state, run.eval_fn)
  target = _target(config)
  reached = loop.target_step is not None
  per = tokens_per_example(config)
  return {
      "final_step": int(loop.step),
      **loop.last_eval,
      **loop.last_train,  # Means over the last log_every steps (absent after a bare resume).
      **run.setup.task.reference_metrics(run.setup.train_source, run.setup.eval_source),
      # From the call to the end: data loading or generation and compilation included.
      "wall_time_sec": time.perf_counter() - t_start,
      "batch_size": config.batch_size,
      "optimizer_steps": loop.opt_step,
      "examples": loop.step * config.batch_size,
      **({"tokens": loop.step * config.batch_size * per} if per > 1 else {}),
      "final_batch_size": loop.multiplier * config.batch_size,
      **({f"target_{target[0].split('/')[1]}": target[1], "target_metric": target[0],
          "target_step": loop.target_step,
          "target_examples": loop.target_step * config.batch_size if reached else None,
          "target_optimizer_step": loop.opt_step if reached else None,
          **{f"target/{k}": float(v) for k, v in loop.last_noise.items()}} if target else {}),
      "num_devices": runner.num_devices,
      "num_processes": jax.process_count(),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       verbose: bool = True, stop_after: Optional[int] = None,
                       task: Optional[tasks.Task] = None, model: Any = None) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

  Writes ``metrics.jsonl``, TensorBoard events, checkpoints under ``checkpoints/`` and
  ``summary.json``. The loop's phases are ``_input``, ``_train_step``, ``_log``,
  ``_eval``, ``_adapt`` and the save in ``_run_loop``. Progress, evaluation and
  checkpoints count base batches (``config.batch_size`` each); an adaptive-batch or
  batch-warmup step consumes ``multiplier`` of them.

  Args:
    config: an experiment config (see ``effjax.config.base_config``).
    workdir: the run's directory; re-running with the same one resumes.
    verbose: print the progress line.
    stop_after: if set, checkpoint and return after this step even though training is
      not finished (time-sliced jobs); calling again resumes from there.
    task, model: a user's own ``effjax.tasks.Task`` and flax module, in place of the
      config's (the README shows one).

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
  runner = Runner.from_config(config)
  config_lib.validate(config, runner.num_devices)
  path = ckpt_lib.resolve_path(workdir)
  _refuse_file_workdir(path)  # Before seconds of data and model.
  done = _finished_target_run(os.fspath(path), config)
  if done is not None:  # Stopped at its target with this very config: nothing left to do.
    return done
  # Data (present, or generated into the data dir) and the model before the workdir: a
  # run that fails there leaves no workdir behind.
  setup = build(config, runner=runner, task=task, model=model)
  setup_seconds = time.perf_counter() - t_start
  workdir = prepare_workdir(workdir)
  run = _Run(setup, workdir, verbose)
  total = config.num_train_steps
  end = total if stop_after is None else min(total, max(stop_after, run.loop.step))
  guard = preemption_lib.PreemptionGuard()
  try:
    guard.__enter__()
    preempted = _run_loop(run, end, guard)
  finally:
    guard.__exit__(None, None, None)
    run.close()
  if preempted is not None:
    raise preempted
  loop = run.loop
  if loop.step < total and loop.target_step is None:
    run.progress.message(f"stopped after step {loop.step} of {total}; re-run to resume")
    return {"final_step": int(loop.step), "stopped": True}
  summary = _summary(run, t_start)
  summary["setup_time_sec"] = setup_seconds
  if run.primary:
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2),
                                                      encoding="utf-8")
    shown = (run.setup.task.headline, "eval/loss", *[k for k in summary if k.startswith(
        "baseline/")])
    run.progress.message(f"done: step {loop.step}, " + ", ".join(
        f"{k} {summary[k]:.4f}" for k in dict.fromkeys(shown) if k in summary)
        + f", wall time {summary['wall_time_sec']:.1f}s")
    if config.curves:
      _write_curves(run)
  return summary


def _write_curves(run: _Run) -> None:
  """``curves.png`` in the workdir, from its ``metrics.jsonl`` (``effjax.plot``)."""
  from effjax import plot  # pylint: disable=g-import-not-at-top
  path = epath.Path(run.workdir) / "curves.png"
  try:
    plot.plot_curves([run.workdir], os.fspath(path))
  except (ValueError, OSError) as e:  # Nothing logged yet, or an unwritable file.
    logging.warning("curves.png not written: %s", e)
    return
  run.progress.message(f"curves: {path}")


def example_batch(spec: data_lib.DatasetSpec, config, rows: int,
                  task: Optional[tasks.Task] = None) -> dict:
  """A model-ready train batch of ``rows`` rows with the shapes and dtypes the pipeline
  gives (zeros; text: rows of one packed sequence; after ``task.preprocess``)."""
  if spec.kind == "text":
    seq_len = config.dataset.seq_len
    stream = data_lib.encode([b"x" * seq_len])
    return data_lib.PackedSource(stream, seq_len).gather(np.zeros(rows, np.int64))
  batch = {"input": np.zeros((rows,) + tuple(spec.input_shape), np.float32),
           "label": np.zeros((rows,), np.int32)}
  return task.preprocess(batch, np.random.default_rng(0), True) if task else batch


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


def _bytes_split(tree: Any, k: int, min_size: int) -> int:
  """Bytes one device holds of ``tree`` (global shapes) when ``effjax.fsdp``'s rule splits
  it over ``k`` devices."""
  total = 0
  for x, d in zip(jax.tree.leaves(tree), jax.tree.leaves(fsdp_lib.shard_dims(tree, k,
                                                                             min_size))):
    total += x.size * jnp.dtype(x.dtype).itemsize // (k if d != fsdp_lib.REPLICATED else 1)
  return total


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Builds everything and compiles one train step, without data, training or allocating
  the state.

  With ``config.dry_run_devices = N`` the step is sized for N devices (per-device batch
  ``batch_size / N``) on the mesh ``(N / mesh.fsdp, mesh.fsdp)`` and compiled for one of
  them, so a pod config can be checked on a laptop.

  Returns:
    ``num_params``, ``per_device_batch``, ``num_devices``, ``mesh`` ``(data, fsdp)``,
    ``flops_per_step`` (XLA cost analysis, all devices), ``memory_per_device_bytes``
    (the sum of the parts) and ``memory`` by part, per device: ``params``,
    ``optimizer`` and ``ema`` (their shards under ``effjax.fsdp``'s rule, from the
    global shapes), ``gathered_params`` (the full parameters the step all-gathers for
    the forward pass; 0 without FSDP) and ``activations`` (the temporaries of the step
    compiled for one device at the per-device batch: activations, full-size gradients
    before their reduce-scatter, and the update's buffers).
  """
  n = int(config.dry_run_devices) or len(jax.devices())
  config_lib.validate(config, n)
  k, min_size = int(config.mesh.fsdp), int(config.mesh.fsdp_min_size)
  config = _sizing_config(config)
  runner = Runner("shard_map", make_mesh(jax.devices()[:1]))
  setup = build(config, with_data=False, runner=runner, num_devices=n, abstract=True)
  per_device = config.batch_size // n
  state = setup.state.replace(**jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=runner.replicated),
      setup.state.items()))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=runner.sharded),
                       example_batch(setup.spec, config, per_device, setup.task))
  fn = runner.compile(make_train_step(config), check_replicated=False)
  compiled = fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  parts = {"params": _bytes_split(state.params, k, min_size),
           "optimizer": _bytes_split(state.opt_state, k, min_size),
           "ema": _bytes_split(state.ema_params, k, min_size),
           "gathered_params": _bytes_split(state.params, 1, min_size) if k > 1 else 0,
           "activations": int(mem.temp_size_in_bytes) if mem is not None else None}
  total = None if parts["activations"] is None else int(sum(parts.values()))
  return {
      "num_params": int(sum(x.size for x in jax.tree.leaves(setup.state.params))),
      "per_device_batch": per_device,
      "num_devices": n,
      "mesh": (n // k, k),
      "flops_per_step": float(cost.get("flops", float("nan"))) * n,
      "memory_per_device_bytes": total,
      "memory": parts,
  }
