"""The train state and the pure, per-replica train and eval steps.

Both steps run once per replica and reduce over ``DATA_AXIS``; ``Runner.compile`` runs
them under ``shard_map`` or ``pmap``. Hyperparameters reach them through the state's
static fields (``apply_fn``, ``tx``, ``schedule``) or keyword arguments bound once.
"""

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from effjax import adaptive as adaptive_lib
from effjax import stats as stats_lib
from effjax.optim.transforms import trust_ratio_stats
from effjax.parallel import DATA_AXIS, global_norm, global_sq_norm

# The fields of a TrainState that are data (and go into checkpoints).
STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "nonfinite_step", "skips",
                "ema_params", "noise_scale", "batch_size_state")
NONFINITE_MODES = ("stop", "skip")


class SkipCounts(NamedTuple):
  """Steps whose update was dropped for a NaN/Inf (``nonfinite='skip'``)."""
  total: jax.Array        # int32: all skipped steps.
  consecutive: jax.Array  # int32: the current run of skipped steps.


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and writes, as one pytree.

  Attributes:
    step: number of steps taken.
    params: model parameters (float32).
    batch_stats: BatchNorm running averages (an empty dict without BatchNorm).
    opt_state: the optax state.
    nonfinite_step: the step at which training must stop, or -1: the first step whose
      loss or gradient was NaN/Inf (``nonfinite='stop'``), or the step that made too many
      consecutive skips (``'skip'``). From that step on, updates are not applied, so the
      parameters stay the last finite ones.
    skips: ``SkipCounts`` of the updates dropped under ``nonfinite='skip'``.
    ema_params: an exponential moving average of ``params`` (an empty dict when off).
    noise_scale: the gradient noise scale's averages, an ``effjax.stats.NoiseScaleState``
      (an empty dict when off).
    batch_size_state: under the adaptive batch size, an ``effjax.adaptive.BatchSizeState``
      (base batches consumed, current multiplier); the optimizer then runs with LR 1 and
      the step multiplies its updates by ``schedule(base_step)`` (an empty dict when off).
    apply_fn, tx, schedule: the model's apply, the optimizer, the LR schedule (static).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array
  skips: SkipCounts
  ema_params: Any
  noise_scale: Any
  batch_size_state: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  schedule: Callable = struct.field(pytree_node=False)

  def variables(self, params=None) -> dict:
    v = {"params": self.params if params is None else params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v

  def items(self) -> dict:
    """The data fields as a dict (what is checkpointed)."""
    return {k: getattr(self, k) for k in STATE_FIELDS}


def create_train_state(rng: jax.Array, model: flax.linen.Module, tx, schedule,
                       input_shape: tuple[int, ...], ema: bool = False,
                       noise_scale: bool = False, adaptive_batch: bool = False) -> TrainState:
  """Initialises parameters (with a batch of one), the optimizer state, if ``ema`` the
  parameter EMA (starting at the initial parameters), and if ``noise_scale`` the
  noise-scale averages, and if ``adaptive_batch`` the batch-size state (build ``tx`` with
  ``unit_lr=True`` then), on the host."""
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + tuple(input_shape)),
                                           train=False))(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    nonfinite_step=jnp.full((), -1, jnp.int32),
                    skips=SkipCounts(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                    noise_scale=stats_lib.init_noise_scale() if noise_scale else {},
                    batch_size_state=(adaptive_lib.init_batch_size_state() if adaptive_batch
                                      else {}),
                    apply_fn=model.apply, tx=tx, schedule=schedule)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing, in float32."""
  n = logits.shape[-1]
  targets = jax.nn.one_hot(labels, n)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / n
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _loss_and_grads(state: TrainState, params, batch_stats, batch: dict,
                    label_smoothing: float):
  """Loss, correct-prediction count, new BN statistics and gradients on one batch."""
  def loss_fn(p):
    variables = {"params": p}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, new_vars = state.apply_fn(variables, batch["input"], train=True,
                                      mutable=["batch_stats"])
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (logits, new_vars.get("batch_stats", {}))

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return loss, accuracy, new_stats, grads


def train_step(state: TrainState, batch: dict, label_smoothing: float = 0.0,
               ema_decay: float = 0.0, accum_steps: int = 1, noise_scale_decay: float = 0.99,
               batch_multiplier: int = 1, lr_factor: float = 1.0, max_learning_rate: float = 0.0,
               accum_unroll: bool = False, nonfinite: str = "stop",
               max_consecutive_skips: int = 10):
  """One optimizer step on this replica's share of the global batch.

  The loss is the mean over this replica's examples; gradients are averaged over
  ``DATA_AXIS``, which equals the gradient of the mean loss over the global batch (all
  replicas hold the same number of examples). BatchNorm running averages are averaged
  over replicas too, so they stay identical on every replica.

  With ``accum_steps = k > 1`` the replica's batch is split into k consecutive
  microbatches, run one after the other under ``lax.scan`` (activation memory of one
  microbatch), and their gradients are summed in float32 and divided by k. The update
  then equals one step on the whole batch for models without BatchNorm. With BatchNorm,
  each microbatch is normalized on its own: its statistics span that microbatch's
  examples on this replica (``batch``, ``ghost_batch``), or microbatch j of every
  replica (``sync_batch``, ``group_batch``), and the running averages are updated once
  per microbatch, in order, as k forward passes would.

  When the state keeps a noise-scale average (``state.noise_scale``), the step estimates
  |G|^2 and tr(Sigma) from the small-batch gradients (each microbatch on each replica:
  ``b / k`` examples; their squared norms are averaged) and the global gradient, and
  updates the averages (``effjax.stats``).

  Args:
    state: the replicated ``TrainState``.
    batch: ``{'input': [b, ...], 'label': [b]}``, this replica's rows.
    label_smoothing: label-smoothing factor for the cross-entropy.
    ema_decay: momentum of the parameter EMA, if the state keeps one (scale it with the
      batch size by ``effjax.optim.ema_decay_for_batch``).
    accum_steps: microbatches per step; must divide ``b``.
    accum_unroll: unroll the microbatch loop instead of a ``lax.scan`` loop. XLA:CPU runs
      convolutions inside a loop about 30 times slower (measured on the mnist1d CNN), so
      the trainer unrolls on CPU; on accelerators the scan keeps one microbatch's
      activations live at a time.
    noise_scale_decay: momentum of the noise-scale averages.
    batch_multiplier: under the adaptive batch size (``state.batch_size_state``), how many
      base batches this step's batch holds; the base step advances by it.
    lr_factor: under the adaptive batch size, the scaling rule's LR factor for
      ``batch_multiplier``: the updates are multiplied by
      ``schedule(base_step) * lr_factor``, at most ``max_learning_rate`` (if > 0).
    nonfinite: what a NaN/Inf loss or gradient does. ``'stop'``: the state freezes at the
      last finite one and ``nonfinite_step`` records the step. ``'skip'``: the update is
      dropped (parameters, optimizer state, BN statistics, EMA and noise-scale averages
      stay as they were; the step counter and the data move on), counted in
      ``state.skips``; ``max_consecutive_skips`` skips in a row then stop as ``'stop'``.

  Returns:
    ``(new_state, metrics)``; the metrics are replica-identical scalars: ``train/loss``,
    ``train/accuracy``, ``lr``, ``grad_norm``, ``param_norm``, ``update_norm``, for
    optimizers with a trust ratio ``trust_ratio/{min,median,max}``, and with the noise
    scale ``noise_scale/{g2,trace_sigma,b_simple}``.

  Raises:
    ValueError: ``accum_steps`` does not divide the batch, or the noise scale is on with
      one replica and no microbatches (there is no small batch then).

  References:
    McCandlish et al. 2018, arXiv:1812.06162 (noise scale).
  """
  b = batch["label"].shape[0]
  if accum_steps < 1 or b % accum_steps:
    raise ValueError(f"accum_steps={accum_steps} must be a positive divisor of the "
                     f"per-replica batch of {b}")
  if accum_steps == 1:
    loss, accuracy, batch_stats, grads = _loss_and_grads(state, state.params,
                                                         state.batch_stats, batch,
                                                         label_smoothing)
    small_sq = global_sq_norm(grads)
  else:
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, b // accum_steps) + x.shape[1:]),
                         batch)

    def body(carry, mb):
      grad_sum, stats, loss_sum, acc_sum, sq_sum = carry
      loss, acc, stats, g = _loss_and_grads(state, state.params, stats, mb, label_smoothing)
      grad_sum = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), grad_sum, g)
      return (grad_sum, stats, loss_sum + loss, acc_sum + acc, sq_sum + global_sq_norm(g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero = jnp.zeros((), jnp.float32)
    (grad_sum, batch_stats, loss, accuracy, small_sq), _ = jax.lax.scan(
        body, (zeros, state.batch_stats, zero, zero, zero), micro,
        unroll=True if accum_unroll else 1)
    grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grad_sum,
                         state.params)
    loss, accuracy, small_sq = loss / accum_steps, accuracy / accum_steps, small_sq / accum_steps

  # One all-reduce for everything the replicas average: each collective is a rendezvous
  # of all replicas, so five separate ones cost measurably more than one (CPU: ~7% of
  # the mnist1d CNN step on 8 devices; see BENCHMARKS.md).
  grads, batch_stats, loss, accuracy, small_sq_mean = jax.lax.pmean(
      (grads, batch_stats, loss, accuracy, small_sq), DATA_AXIS)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  size_state = state.batch_size_state
  if isinstance(size_state, adaptive_lib.BatchSizeState):
    lr = jnp.asarray(state.schedule(size_state.base_step), jnp.float32) * lr_factor
    if max_learning_rate:
      lr = jnp.minimum(lr, max_learning_rate)
    updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
    size_state = adaptive_lib.BatchSizeState(
        base_step=size_state.base_step + batch_multiplier,
        multiplier=jnp.full((), batch_multiplier, jnp.int32))
  else:
    lr = jnp.asarray(state.schedule(state.step), jnp.float32)
  params = optax.apply_updates(state.params, updates)

  grad_norm = global_norm(grads)
  update_norm = global_norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  ok = finite & (state.nonfinite_step < 0)
  skips = state.skips
  if nonfinite == "skip":
    bad = ~finite
    skips = SkipCounts(total=skips.total + bad.astype(jnp.int32),
                       consecutive=jnp.where(bad, skips.consecutive + 1, 0))
    stop_now = skips.consecutive >= max_consecutive_skips
  elif nonfinite == "stop":
    stop_now = ~finite
  else:
    raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}")
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  ema_params = state.ema_params
  if ema_params:
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                              ema_params, params)
  noise = state.noise_scale
  if isinstance(noise, stats_lib.NoiseScaleState):
    n = jax.lax.axis_size(DATA_AXIS)
    if n == 1 and accum_steps == 1:
      raise ValueError("the noise scale needs two batch sizes: more than one replica or "
                       "accum_steps > 1")
    g2, trace = stats_lib.noise_scale_from_norms(
        small_sq_mean, jnp.square(grad_norm), b // accum_steps, b * n)
    noise = stats_lib.update_noise_scale(noise, g2, trace, noise_scale_decay)
  new_state = state.replace(
      step=state.step + 1,
      ema_params=keep(ema_params, state.ema_params),
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      noise_scale=keep(noise, state.noise_scale),
      batch_size_state=keep(size_state, state.batch_size_state),
      skips=skips,
      nonfinite_step=jnp.where(stop_now & (state.nonfinite_step < 0), state.step,
                               state.nonfinite_step))
  metrics = {
      "train/loss": loss,
      "train/accuracy": accuracy,
      "lr": lr,
      "grad_norm": grad_norm,
      "param_norm": global_norm(new_state.params),
      "update_norm": update_norm,
  }
  if nonfinite == "skip":
    metrics["nonfinite/skipped"] = skips.total.astype(jnp.float32)
  metrics.update(trust_ratio_stats(new_state.opt_state))  # lars/lamb/tvlars only.
  if isinstance(noise, stats_lib.NoiseScaleState):
    metrics.update(stats_lib.noise_scale_metrics(new_state.noise_scale, noise_scale_decay))
  return new_state, metrics


def eval_step(state: TrainState, batch: dict):
  """Sums of loss, correct predictions and real examples over the global eval batch.

  ``batch['mask']`` is 0 on padding rows, which therefore count nowhere.
  """
  logits = state.apply_fn(state.variables(), batch["input"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  sums = {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}
  return jax.lax.psum(sums, DATA_AXIS)
