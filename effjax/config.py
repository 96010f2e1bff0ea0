"""The config schema, its derived values, and up-front validation.

Every experiment config starts from ``base_config()`` so that all keys are known; the
config files set values and derive the rest (scaled LR, step counts) with
``ml_collections.FieldReference``s, which stay consistent under command-line overrides.
"""

import math
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from effjax.adaptive import BATCH_SCHEDULES, GROW_MODES
from effjax.data import AUGMENTATIONS, SPECS
from effjax.distributed import INITIALIZE_MODES
from effjax.models import CONVS, MODELS, NORMS, cross_replica_statistics
from effjax.optim import (DECAYS, OPTIMIZERS, SCALING_RULES, WEIGHT_DECAY_MASKS,
                          ema_decay_for_batch, scale_learning_rate)
from effjax.losses import SIGMOID_IMPLS
from effjax.moe import BALANCE_SCOPES
from effjax.parallel import PARALLEL_MODES
from effjax.steps import NONFINITE_MODES
from effjax.tasks import CONTRASTIVE_LOSSES, NEGATIVES, TASKS

RESTORE_MODES = ("auto", "ignore")
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")

COMPUTE_DTYPES = ("float32", "bfloat16")
CONTRASTIVE_MODEL = "cnn1d_contrastive"


class ConfigError(ValueError):
  """An invalid config value; the message is one line naming the value and what is allowed."""


def _data_schema(c: ml_collections.ConfigDict) -> None:
  """Dataset and input pipeline."""
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "mnist1d"
  c.dataset.data_dir = ""     # '' means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.dataset.num_examples = 5000  # mnist1d only: examples generated in all (80/20 split).
  c.dataset.num_train_examples = 4000  # Must match the train split; drives step counts.
  # Text: the sequences of one "epoch" of the schedule (the budget; the stream wraps).
  c.dataset.seq_len = 0       # Text only: tokens per packed sequence.
  c.dataset.train_split = ""  # '' means the dataset's default.
  c.dataset.eval_split = ""

  c.input = ml_collections.ConfigDict()
  c.input.augment = "default"  # 'default' means the dataset's; or one of AUGMENTATIONS.
  c.input.num_threads = 2
  c.input.num_workers = 0     # > 0: preprocessing in worker processes.
  c.input.host_prefetch = 4   # Batches grain prepares ahead.
  c.input.device_prefetch = 2  # Batches placed on the devices ahead of the step.


def _model_schema(c: ml_collections.ConfigDict) -> None:
  """The model and its normalization."""
  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn1d"
  c.model.norm = "batch"            # One of effjax.models.NORMS.
  c.model.norm_momentum = 0.9       # Running averages (BCN: 1 - estimate update rate).
  c.model.norm_groups = 32          # group / batch_channel: channel groups (at most).
  c.model.bn_group_size = 2         # group_batch: replicas per BN group.
  c.model.virtual_batch_size = 32   # ghost_batch: examples per ghost batch.
  c.model.bcn_estimated = True      # batch_channel: micro-batch (estimated statistics).
  c.model.bn_shift = True           # BN variance around the running mean; False: flax's.
  c.model.conv = "auto"             # One of effjax.models.CONVS; auto: ws for batch_channel.
  c.model.widths = (64, 128, 128)
  c.model.kernel_size = 5
  c.model.num_layers = 2   # transformer only.
  c.model.num_heads = 4    # transformer only.
  c.model.dropout = 0.0           # decoder_lm: attention and residual dropout.
  c.model.tie_embeddings = True   # decoder_lm: output projection = token embedding.
  c.model.scan_layers = False     # decoder_lm: blocks under one nn.scan (stacked params).
  c.model.projection_widths = (256, 128)  # cnn1d_contrastive: the projection head's MLP.
  c.model.moe = ml_collections.ConfigDict()  # decoder_lm: mixture-of-experts MLPs.
  c.model.moe.num_experts = 0        # 0: dense MLPs.
  c.model.moe.top_k = 1
  c.model.moe.capacity_factor = 1.25
  c.model.moe.balance = "global"     # f_i over the global batch, or 'micro' (each replica's).
  c.model.moe.balance_coef = 0.01    # alpha of the load-balancing loss.

  c.contrastive = ml_collections.ConfigDict()  # task='contrastive' only.
  c.contrastive.loss = "nt_xent"      # SimCLR's NT-Xent, or SigLIP's 'sigmoid'.
  c.contrastive.temperature = 0.1     # nt_xent's tau.
  c.contrastive.negatives = "global"  # All replicas' examples, or 'local' (the bug).
  c.contrastive.sigmoid_impl = "ring"  # 'ring' (ppermute, b x b memory) or 'all_gather'.
  c.contrastive.probe_examples = 4000  # Labelled train rows the linear probe / kNN fit on.
  c.contrastive.knn_k = 20


def _optimizer_schema(c: ml_collections.ConfigDict) -> None:
  """Optimizer, LR schedule and parameter EMA."""
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "momentum"
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "linear"
  c.optimizer.learning_rate = 0.05  # Derived in configs with scale_learning_rate.
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.weight_decay_mask = "ndim>1"  # 'ndim>1': weights only; 'all'.
  c.optimizer.trust_ratio_mask = "ndim>1"   # lars/lamb/tvlars: which params get the ratio.
  c.optimizer.trust_coefficient = 1e-3      # lars/tvlars eta.
  c.optimizer.max_trust_ratio = 0.0         # lars/lamb: clip the ratio above; 0 = no clip.
  c.optimizer.grad_prenorm = False          # lamb: NVLAMB global-norm pre-normalisation.
  c.optimizer.nesterov = False              # lars/tvlars.
  c.optimizer.tvlars = ml_collections.ConfigDict()
  c.optimizer.tvlars.decay_rate = 0.01      # lambda, per step.
  c.optimizer.tvlars.delay_epochs = 5.0     # d_e.
  c.optimizer.tvlars.alpha = 1.0
  c.optimizer.tvlars.min_factor = 0.0       # gamma_min.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  # None: the optimizer's own default (adamw 1e-8, lamb 1e-6, as in the LAMB paper's code).
  c.optimizer.eps = config_dict.placeholder(float)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.decay = "cosine"
  c.schedule.warmup_epochs = 0.0
  c.schedule.init_value = 0.0
  c.schedule.end_value = 0.0
  c.schedule.power = 2.0
  c.schedule.decay_fraction = 0.1

  c.ema = ml_collections.ConfigDict()
  c.ema.enabled = False        # Keep an EMA of the parameters and also evaluate it.
  c.ema.decay = 0.999          # Momentum tuned at ema.base_batch_size.
  c.ema.base_batch_size = 256  # ema.scaled_decay = decay ** (batch_size / base_batch_size).

  c.batch_schedule = "fixed"    # 'adaptive': grow the batch with the noise scale;
                                # 'warmup': ramp it up over batch_warmup.tokens.


def _batch_schema(c: ml_collections.ConfigDict) -> None:
  """Batch schedules, targets, sweeps and the noise scale."""
  c.batch_warmup = ml_collections.ConfigDict()
  c.batch_warmup.final_batch_size = 0  # The batch after the ramp (power-of-2 x batch_size).
  c.batch_warmup.tokens = 0            # Tokens (examples x seq_len; else examples) of ramp.
  c.adaptive = ml_collections.ConfigDict()
  c.adaptive.multiple = 1.0      # Target global batch = multiple * B_simple ...
  c.adaptive.max_batch_size = 0  # ... up to this (0: 16 * batch_size); powers of 2 of batch_size.
  c.adaptive.grow = "accumulate"  # Larger batches as more microbatches, or 'batch'.
  c.adaptive.max_learning_rate = 0.0  # Cap on the rescaled LR (0: none).

  c.target = ml_collections.ConfigDict()
  c.target.loss = 0.0          # > 0: stop once the eval loss is at most this, or
  c.target.accuracy = 0.0      # > 0: stop once the eval accuracy reaches it (steps-to-target),
  c.target.first_eval_step = 8  # evaluating also at steps first_eval_step * eval_growth^k.
  c.target.eval_growth = 1.1

  c.sweep = ml_collections.ConfigDict()  # experiments/batch_size_sweep.py only.
  c.sweep.batch_sizes = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)  # Times the scaling rule's LR at each batch.
  c.sweep.max_learning_rate = 0.0  # Cap on each run's LR (0: none).
  c.sweep.max_steps = 0           # Cap on each run's steps (0: num_epochs only).
  c.sweep.noise_accum_steps = 4   # Runs at batches >= noise_min_batch estimate the noise
  c.sweep.noise_min_batch = 64    # scale with this many microbatches (0 or 1: off).
  c.sweep.workers = 2             # Runs trained at once, each in its own process.
  c.sweep.devices_per_worker = 1  # Simulated CPU devices per worker (0: leave XLA_FLAGS).

  c.noise_scale = ml_collections.ConfigDict()
  c.noise_scale.enabled = False  # Estimate the gradient noise scale every step.
  c.noise_scale.decay = 0.99     # Momentum of its two moving averages.


def _run_schema(c: ml_collections.ConfigDict) -> None:
  """Checkpoints, multi-host and dry runs."""
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0   # 0: only at the end.
  c.checkpoint.max_to_keep = 3
  c.checkpoint.every_secs = 0.0  # > 0: also save when this long has passed since a save.

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.cpu_collectives = "gloo"

  c.dry_run_devices = 0  # --dry_run only: size the step for this many devices (0: actual).


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults. Experiment configs modify a copy of it."""
  c = ml_collections.ConfigDict()
  c.task = "classification"  # 'lm': next-token prediction on packed text; 'contrastive'.
  c.seed = 0                 # Parameters, data order, augmentation and dropout.
  c.batch_size = 128          # The global batch, over all devices and processes.
  c.accum_steps = 1           # Microbatches per step (gradient accumulation).
  c.accum_loop = "auto"       # 'scan' (lax.scan), 'unroll', or 'auto': unroll on CPU only.
  c.eval_batch_size = 1024    # Global; the last batch is padded and masked.
  c.num_epochs = 10.0
  c.label_smoothing = 0.0
  c.compute_dtype = "float32"
  c.parallel = "shard_map"
  # The (data, fsdp) mesh: fsdp devices split the parameters, their EMA and the optimizer
  # state (effjax.fsdp; leaves under fsdp_min_size elements stay replicated); all
  # devices hold different examples. fsdp=1: plain data parallelism.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 1024
  c.transfer_guard = "disallow"  # jax.transfer_guard around the step: implicit transfers fail.
  c.log_every = 50
  c.curves = True             # Write curves.png (effjax.plot) into the workdir at the end.
  c.eval_every_epochs = 1.0
  c.nonfinite = "stop"        # NaN/Inf loss or gradient: 'stop', or 'skip' the update.
  c.max_consecutive_skips = 10  # 'skip': stop after this many skipped steps in a row.
  c.restore = "auto"          # 'auto': resume from the workdir's checkpoints; 'ignore':
                              # start afresh, moving them to checkpoints.replaced/.

  _data_schema(c)
  _model_schema(c)
  _optimizer_schema(c)
  _batch_schema(c)
  _run_schema(c)
  derive(c)
  return c


def derive(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """(Re)links the derived fields to the values they depend on.

  ``steps_per_epoch``, ``num_train_steps``, ``schedule.warmup_steps``,
  ``eval_every_steps``, ``optimizer.learning_rate`` (from ``scale_learning_rate``) and
  ``ema.scaled_decay`` (from ``ema_decay_for_batch``) become FieldReferences, so
  ``--config.batch_size=...`` rescales them all.
  """
  o = c.optimizer
  rule = o.scaling_rule
  if rule not in SCALING_RULES:
    raise ConfigError(f"optimizer.scaling_rule={rule!r} is not one of {SCALING_RULES}")
  c.steps_per_epoch = (c.dataset.get_ref("num_train_examples") // c.get_ref("batch_size"))
  c.num_train_steps = (c.get_ref("num_epochs") * c.get_ref("steps_per_epoch")).to_int()
  c.schedule.warmup_steps = (c.schedule.get_ref("warmup_epochs")
                             * c.get_ref("steps_per_epoch")).to_int()
  c.eval_every_steps = (c.get_ref("eval_every_epochs") * c.get_ref("steps_per_epoch")).to_int()
  c.optimizer.tvlars.delay_steps = (c.optimizer.tvlars.get_ref("delay_epochs")
                                    * c.get_ref("steps_per_epoch")).to_int()
  c.ema.scaled_decay = ema_decay_for_batch(c.ema.get_ref("decay"), c.get_ref("batch_size"),
                                           c.ema.get_ref("base_batch_size"))
  o.learning_rate = scale_learning_rate(o.get_ref("base_learning_rate"), c.get_ref("batch_size"),
                                        o.get_ref("base_batch_size"), rule)
  return c


def _check_choice(name: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{name}={value!r} is not one of {tuple(allowed)}")


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
  ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
  if not ok:
    raise ConfigError(f"{name}={value!r} must be a positive {'integer' if integer else 'number'}")


def _get(c, dotted: str) -> Any:
  for part in dotted.split("."):
    c = c[part]
  return c


def _flat_keys(c, prefix=""):
  for k, v in c.items(preserve_field_references=True):
    if isinstance(v, (ml_collections.ConfigDict, config_dict.FrozenConfigDict)):
      yield from _flat_keys(v, prefix + k + ".")
    else:
      yield prefix + k


def _check_task(c) -> None:
  """The task, the dataset's kind and the model must fit together."""
  text = SPECS[c.dataset.name].kind == "text"
  lm_model = c.model.name == "decoder_lm"
  if c.task == "lm" and not (text and lm_model):
    raise ConfigError(f"task='lm' needs a text dataset and model.name='decoder_lm' (got "
                      f"dataset.name={c.dataset.name!r}, model.name={c.model.name!r})")
  if c.task == "classification" and (text or lm_model or c.model.name == CONTRASTIVE_MODEL):
    raise ConfigError(f"task='classification' cannot use dataset.name={c.dataset.name!r} / "
                      f"model.name={c.model.name!r}; use task='lm' or 'contrastive'")
  if c.task == "contrastive":
    _check_contrastive(c)
  if text and not (isinstance(c.dataset.seq_len, int) and c.dataset.seq_len > 0):
    raise ConfigError(f"dataset.seq_len={c.dataset.seq_len!r} must be a positive integer "
                      f"for the text dataset {c.dataset.name!r}")
  if not 0.0 <= c.model.dropout < 1.0:
    raise ConfigError(f"model.dropout={c.model.dropout!r} must be in [0, 1)")
  _check_moe(c.model.moe, lm_model)


def _check_moe(moe, lm_model: bool) -> None:
  if not (isinstance(moe.num_experts, int) and moe.num_experts >= 0):
    raise ConfigError(f"model.moe.num_experts={moe.num_experts!r} must be an integer >= 0 "
                      "(0: dense)")
  if not moe.num_experts:
    return
  if not lm_model:
    raise ConfigError("model.moe.num_experts > 0 needs model.name='decoder_lm'")
  if not (isinstance(moe.top_k, int) and 1 <= moe.top_k <= moe.num_experts):
    raise ConfigError(f"model.moe.top_k={moe.top_k!r} must be in [1, num_experts="
                      f"{moe.num_experts}]")
  _check_positive("model.moe.capacity_factor", moe.capacity_factor)
  _check_choice("model.moe.balance", moe.balance, BALANCE_SCOPES)
  if moe.balance_coef < 0:
    raise ConfigError(f"model.moe.balance_coef={moe.balance_coef!r} must be >= 0")


def _check_contrastive(c) -> None:
  if not (c.dataset.name == "mnist1d" and c.model.name == CONTRASTIVE_MODEL):
    raise ConfigError(f"task='contrastive' needs dataset.name='mnist1d' (its views use "
                      f"mnist1d's transforms) and model.name={CONTRASTIVE_MODEL!r} (got "
                      f"{c.dataset.name!r}, {c.model.name!r})")
  _check_choice("contrastive.loss", c.contrastive.loss, CONTRASTIVE_LOSSES)
  _check_choice("contrastive.negatives", c.contrastive.negatives, NEGATIVES)
  _check_choice("contrastive.sigmoid_impl", c.contrastive.sigmoid_impl, SIGMOID_IMPLS)
  _check_positive("contrastive.temperature", c.contrastive.temperature)
  _check_positive("contrastive.knn_k", c.contrastive.knn_k, integer=True)
  if not 0 < c.contrastive.probe_examples <= c.dataset.num_train_examples:
    raise ConfigError(f"contrastive.probe_examples={c.contrastive.probe_examples!r} must be "
                      f"in [1, dataset.num_train_examples={c.dataset.num_train_examples}]")
  if c.target.accuracy or c.target.loss:
    raise ConfigError("task='contrastive' has no steps-to-target (target.accuracy, "
                      "target.loss); set both to 0")


def _cross_replica_loss(c) -> bool:
  """Whether a replica's gradient reads other replicas' examples: cross-replica BN
  statistics, or global negatives."""
  return (cross_replica_statistics(c.model.norm, c.model.bcn_estimated) or
          (c.task == "contrastive" and c.contrastive.negatives == "global"))


def _check_values(c) -> None:
  """Keys, choices and the basic sizes and rates."""
  unknown = sorted(set(_flat_keys(c)) - set(_flat_keys(base_config())))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r}; see effjax.config.base_config() "
                      "for the allowed keys")
  # Values that derived fields divide by come first, so that they fail with their own name.
  _check_positive("batch_size", c.batch_size, integer=True)
  _check_positive("optimizer.base_batch_size", c.optimizer.base_batch_size)
  _check_choice("task", c.task, TASKS)
  _check_choice("dataset.name", c.dataset.name, SPECS)
  _check_choice("model.name", c.model.name, MODELS)
  _check_task(c)
  _check_choice("model.norm", c.model.norm, NORMS)
  _check_choice("model.conv", c.model.conv, CONVS)
  for name in ("model.norm_groups", "model.bn_group_size", "model.virtual_batch_size"):
    _check_positive(name, _get(c, name), integer=True)
  if not 0.0 <= c.model.norm_momentum < 1.0:
    raise ConfigError(f"model.norm_momentum={c.model.norm_momentum!r} must be in [0, 1)")
  _check_choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
  _check_choice("optimizer.scaling_rule", c.optimizer.scaling_rule, SCALING_RULES)
  _check_choice("optimizer.weight_decay_mask", c.optimizer.weight_decay_mask, WEIGHT_DECAY_MASKS)
  _check_choice("optimizer.trust_ratio_mask", c.optimizer.trust_ratio_mask, WEIGHT_DECAY_MASKS)
  _check_positive("optimizer.trust_coefficient", c.optimizer.trust_coefficient)
  if c.optimizer.max_trust_ratio < 0:
    raise ConfigError(f"optimizer.max_trust_ratio={c.optimizer.max_trust_ratio!r} must be "
                      ">= 0 (0 means no clipping)")
  _check_choice("schedule.decay", c.schedule.decay, DECAYS)
  _check_choice("parallel", c.parallel, PARALLEL_MODES)
  _check_positive("mesh.fsdp", c.mesh.fsdp, integer=True)
  _check_positive("mesh.fsdp_min_size", c.mesh.fsdp_min_size, integer=True)
  if c.mesh.fsdp > 1 and c.parallel != "shard_map":
    raise ConfigError(f"mesh.fsdp={c.mesh.fsdp} needs parallel='shard_map' (pmap has one "
                      f"axis), not {c.parallel!r}")
  _check_choice("compute_dtype", c.compute_dtype, COMPUTE_DTYPES)
  _check_choice("input.augment", c.input.augment, ("default",) + AUGMENTATIONS)
  _check_choice("distributed.initialize", c.distributed.initialize, INITIALIZE_MODES)
  for name in ("batch_size", "eval_batch_size", "log_every", "dataset.num_examples",
               "dataset.num_train_examples", "checkpoint.max_to_keep", "input.num_threads",
               "input.device_prefetch", "input.host_prefetch"):
    _check_positive(name, _get(c, name), integer=True)
  for name in ("num_epochs", "eval_every_epochs", "optimizer.base_learning_rate",
               "optimizer.learning_rate", "optimizer.base_batch_size"):
    _check_positive(name, _get(c, name))
  expected = scale_learning_rate(c.optimizer.base_learning_rate, c.batch_size,
                                 c.optimizer.base_batch_size, c.optimizer.scaling_rule)
  if not math.isclose(c.optimizer.learning_rate, expected, rel_tol=1e-6):
    raise ConfigError(
        f"optimizer.learning_rate={c.optimizer.learning_rate!r} does not follow "
        f"scaling_rule={c.optimizer.scaling_rule!r} (expected {expected:g} for batch_size="
        f"{c.batch_size}); set optimizer.base_learning_rate instead")


def _check_loop(c) -> None:
  """Accumulation, sweeps, targets, the loop's modes and checkpoints."""
  _check_positive("accum_steps", c.accum_steps, integer=True)
  if not c.sweep.batch_sizes or any(int(b) < 1 for b in c.sweep.batch_sizes):
    raise ConfigError(f"sweep.batch_sizes={tuple(c.sweep.batch_sizes)!r} must be positive "
                      "integers")
  if not c.sweep.lr_multipliers or any(m <= 0 for m in c.sweep.lr_multipliers):
    raise ConfigError(f"sweep.lr_multipliers={tuple(c.sweep.lr_multipliers)!r} must be "
                      "positive numbers")
  _check_positive("sweep.workers", c.sweep.workers, integer=True)
  if not 0.0 <= c.target.accuracy <= 1.0:
    raise ConfigError(f"target.accuracy={c.target.accuracy!r} must be in [0, 1] (0: off)")
  if c.target.loss < 0 or (c.target.loss and c.target.accuracy):
    raise ConfigError(f"target.loss={c.target.loss!r} must be >= 0 (0: off), and not set "
                      f"together with target.accuracy={c.target.accuracy!r}")
  _check_positive("target.first_eval_step", c.target.first_eval_step, integer=True)
  if not c.target.eval_growth > 1.0:
    raise ConfigError(f"target.eval_growth={c.target.eval_growth!r} must be > 1")
  _check_choice("accum_loop", c.accum_loop, ("auto", "scan", "unroll"))
  _check_choice("nonfinite", c.nonfinite, NONFINITE_MODES)
  _check_choice("transfer_guard", c.transfer_guard, TRANSFER_GUARDS)
  _check_positive("max_consecutive_skips", c.max_consecutive_skips, integer=True)
  _check_choice("restore", c.restore, RESTORE_MODES)
  if c.checkpoint.every_secs < 0:
    raise ConfigError(f"checkpoint.every_secs={c.checkpoint.every_secs!r} must be >= 0 "
                      "(0: off)")


def _check_batch_schedule(c) -> None:
  """The adaptive batch, the batch warmup and the noise scale."""
  _check_choice("batch_schedule", c.batch_schedule, BATCH_SCHEDULES)
  _check_choice("adaptive.grow", c.adaptive.grow, GROW_MODES)
  _check_positive("adaptive.multiple", c.adaptive.multiple)
  if c.adaptive.max_batch_size and c.adaptive.max_batch_size < c.batch_size:
    raise ConfigError(f"adaptive.max_batch_size={c.adaptive.max_batch_size} must be 0 or at "
                      f"least batch_size={c.batch_size}")
  if c.adaptive.max_learning_rate < 0:
    raise ConfigError(f"adaptive.max_learning_rate={c.adaptive.max_learning_rate!r} must be "
                      ">= 0 (0: no cap)")
  if c.batch_schedule == "warmup":
    final = c.batch_warmup.final_batch_size
    m = final // c.batch_size if final else 0
    if not (final and final % c.batch_size == 0 and m & (m - 1) == 0):
      raise ConfigError(f"batch_warmup.final_batch_size={final!r} must be a power of 2 times "
                        f"batch_size={c.batch_size} under batch_schedule='warmup'")
    if c.batch_warmup.tokens < 0:
      raise ConfigError(f"batch_warmup.tokens={c.batch_warmup.tokens!r} must be >= 0")
  if c.batch_schedule == "adaptive" and not c.noise_scale.enabled:
    raise ConfigError("batch_schedule='adaptive' follows the noise scale; set "
                      "noise_scale.enabled=True")
  if not 0.0 <= c.noise_scale.decay < 1.0:
    raise ConfigError(f"noise_scale.decay={c.noise_scale.decay!r} must be in [0, 1)")
  if c.noise_scale.enabled and c.accum_steps < 2 and c.mesh.fsdp > 1:
    raise ConfigError(
        f"noise_scale.enabled with mesh.fsdp={c.mesh.fsdp} needs accum_steps >= 2: split "
        "parameters' gradients are summed over the fsdp group, so the small batch is a "
        "microbatch of the global batch")
  if c.noise_scale.enabled and c.accum_steps < 2 and _cross_replica_loss(c):
    what = (f"model.norm={c.model.norm!r}" if cross_replica_statistics(
        c.model.norm, c.model.bcn_estimated) else "contrastive.negatives='global'")
    raise ConfigError(
        f"noise_scale.enabled with {what} needs accum_steps >= 2: cross-replica statistics "
        "or negatives leave no per-replica small-batch gradient, so the small batch is a "
        "microbatch of the global batch")


def _check_training(c) -> None:
  """EMA, regularisation, step counts, warmup and data paths."""
  if not 0.0 <= c.ema.decay < 1.0:
    raise ConfigError(f"ema.decay={c.ema.decay!r} must be in [0, 1)")
  _check_positive("ema.base_batch_size", c.ema.base_batch_size)
  if c.optimizer.weight_decay < 0:
    raise ConfigError(f"optimizer.weight_decay={c.optimizer.weight_decay!r} must be >= 0")
  if not 0 <= c.label_smoothing < 1:
    raise ConfigError(f"label_smoothing={c.label_smoothing!r} must be in [0, 1)")
  if c.steps_per_epoch < 1:
    raise ConfigError(f"batch_size={c.batch_size} is larger than the "
                      f"{c.dataset.num_train_examples} training examples")
  if c.num_train_steps < 1:
    raise ConfigError(f"num_epochs={c.num_epochs} gives {c.num_train_steps} training steps; "
                      "it must give at least 1")
  if c.schedule.warmup_epochs < 0 or c.schedule.warmup_steps > c.num_train_steps:
    raise ConfigError(f"schedule.warmup_epochs={c.schedule.warmup_epochs} gives "
                      f"{c.schedule.warmup_steps} warmup steps; allowed: 0 to num_train_steps="
                      f"{c.num_train_steps}")
  if c.checkpoint.every_steps < 0:
    raise ConfigError(f"checkpoint.every_steps={c.checkpoint.every_steps} must be >= 0")
  if c.input.num_workers < 0:
    raise ConfigError(f"input.num_workers={c.input.num_workers} must be >= 0")
  if c.dataset.data_dir and os.path.exists(c.dataset.data_dir) and not os.path.isdir(
      c.dataset.data_dir):
    raise ConfigError(f"dataset.data_dir={c.dataset.data_dir!r} is a file, not a directory")


def _check_devices(c, num_devices: int) -> None:
  """What must divide evenly over ``num_devices`` devices."""
  if num_devices % c.mesh.fsdp:
    raise ConfigError(f"mesh.fsdp={c.mesh.fsdp} does not divide the {num_devices} devices; "
                      f"use a divisor of {num_devices}")
  for name in ("batch_size", "eval_batch_size"):
    if c[name] % num_devices:
      raise ConfigError(f"{name}={c[name]} is not divisible by the {num_devices} devices; "
                        f"use a multiple of {num_devices}")
  if c.model.norm == "group_batch" and num_devices % c.model.bn_group_size:
    raise ConfigError(f"model.bn_group_size={c.model.bn_group_size} does not divide the "
                      f"{num_devices} devices; use a divisor of {num_devices}")
  per_device = c.batch_size // num_devices
  if per_device % c.accum_steps:
    raise ConfigError(f"accum_steps={c.accum_steps} does not divide the per-device batch of "
                      f"{per_device} (batch_size={c.batch_size} over {num_devices} devices)")
  per_device //= c.accum_steps  # What one BatchNorm call sees.
  if c.batch_schedule == "adaptive" and num_devices == 1 and c.accum_steps == 1:
    raise ConfigError("batch_schedule='adaptive' needs the noise scale, which needs two "
                      "batch sizes: use more than one device or accum_steps > 1")
  if c.model.norm == "ghost_batch" and per_device % c.model.virtual_batch_size:
    raise ConfigError(f"model.virtual_batch_size={c.model.virtual_batch_size} does not "
                      f"divide the per-device microbatch of {per_device}; use a divisor of it")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``'path/to/config.py[:arg]'`` as ``--config`` does: the file's
  ``get_config(arg)`` (or ``get_config()`` without an argument).

  Raises:
    ConfigError: the file does not exist or has no ``get_config``.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"effjax_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every value before anything expensive or destructive happens.

  Args:
    c: the experiment config.
    num_devices: if given, the global batch must divide evenly over this many devices.

  Raises:
    ConfigError: with a one-line message naming the bad value and what is allowed.
  """
  _check_values(c)
  _check_loop(c)
  _check_batch_schedule(c)
  _check_training(c)
  if num_devices:
    _check_devices(c, num_devices)
