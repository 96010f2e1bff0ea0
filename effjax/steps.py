"""The train state and the pure, per-replica train and eval steps.

Both steps run once per replica and reduce over ``DATA_AXIS``; ``Runner.compile`` runs
them under ``shard_map`` or ``pmap``. Hyperparameters reach them through the state's
static fields (``apply_fn``, ``tx``, ``schedule``) or keyword arguments bound once.
"""

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from effjax import adaptive as adaptive_lib
from effjax import fsdp as fsdp_lib
from effjax import stats as stats_lib
from effjax.optim.factory import is_lr_injected, set_learning_rate
from effjax.optim.transforms import trust_ratio_stats
from effjax.parallel import DATA_AXIS, batch_axes, packed_pmean, packed_psum
from effjax import tasks as task_lib
from effjax.tasks import CLASSIFICATION, Task
from effjax.tasks.classification import cross_entropy  # Re-exported (effjax.cross_entropy).

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
      (base batches consumed, current multiplier); the step then sets the optimizer's LR
      to ``schedule(base_step)`` times the scaling rule's factor (an empty dict when off).
    apply_fn, tx, schedule: the model's apply, the optimizer, the LR schedule (static).
    fsdp_dims: the dimension each parameter (``jax.tree.leaves`` order) is split along
      over the ``fsdp`` mesh axis, -1 for replicated; ``()``: none is split (static; set
      by ``Runner.place_state``). Then ``params``, ``ema_params`` and ``opt_state`` are
      per-device shards inside the step (``effjax.fsdp``).
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
  fsdp_dims: tuple = struct.field(pytree_node=False, default=())

  def variables(self, params=None) -> dict:
    """The model's variables; inside a per-replica step, the split parameters are
    gathered first (``effjax.fsdp.gather``)."""
    v = {"params": fsdp_lib.gather(self.params, self.fsdp_dims) if params is None else params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v

  def items(self) -> dict:
    """The data fields as a dict (what is checkpointed)."""
    return {k: getattr(self, k) for k in STATE_FIELDS}


def create_train_state(rng: jax.Array, model: flax.linen.Module, tx, schedule,
                       input_shape: tuple[int, ...], ema: bool = False,
                       noise_scale: bool = False, adaptive_batch: bool = False,
                       task: Task = CLASSIFICATION) -> TrainState:
  """Initialises parameters (``task.init_variables`` on a batch of one example of
  ``input_shape``), the optimizer state, if ``ema`` the parameter EMA (starting at the
  initial parameters), and if ``noise_scale`` the noise-scale averages, and if
  ``adaptive_batch`` the batch-size state, for the adaptive batch or a batch-size warmup
  (build ``tx`` with ``create_optimizer(..., inject_lr=True)`` then), on the host."""
  variables = jax.jit(lambda r: task.init_variables(model, r, tuple(input_shape)))(rng)
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


def _varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over under ``shard_map(check_vma=True)`` (else empty)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def as_per_replica(tree: Any, batch: dict) -> Any:
  """Marks ``tree`` (the replicated state read by the loss) as varying over ``DATA_AXIS``
  when the step runs under ``shard_map(check_vma=True)``.

  With check_vma on, autodiff of a replicated (invariant) input sums its gradient over
  the axis by itself, so the explicit mean that ``pmap`` and ``check_vma=False`` need
  would give ``n`` times the gradient, and no per-replica gradient (the noise scale's
  small batch) would exist. Made varying first, the gradients are per-replica under all
  three launch modes, and the step's one ``pmean`` means the same thing everywhere.
  The mode is detected from the batch, which varies over ``DATA_AXIS`` only under
  check_vma.
  """
  if DATA_AXIS not in _varying_axes(jax.tree.leaves(batch)[0]):
    return tree
  axes = batch_axes()
  axes = axes if isinstance(axes, tuple) else (axes,)
  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def dropout_rng(seed: int, step: jax.Array, microbatch: int | jax.Array) -> jax.Array:
  """The dropout key of one microbatch on this replica: ``(seed, step, replica,
  microbatch)`` folded in, so a resumed run replays the same masks, and no two replicas
  or microbatches share one."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  key = jax.random.fold_in(key, jax.lax.axis_index(batch_axes()))
  return jax.random.fold_in(key, microbatch)


def _loss_and_grads(task: Task, state: TrainState, params, batch_stats, batch: dict, rng):
  """The task's ``LossOutput`` on one (micro)batch, and the gradient of its loss *sum*
  (with respect to this device's shards of split parameters: the transpose of their
  gather sums it over the ``fsdp`` group)."""
  model_state = {"batch_stats": batch_stats} if batch_stats else {}

  def loss_fn(p):
    p = fsdp_lib.gather(p, state.fsdp_dims)
    out = task.loss(state.apply_fn, {"params": p, **model_state}, batch, rng)
    return out.loss, out

  (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return out, grads


SMALL_BATCHES = ("replica", "microbatch")


class _Sums(NamedTuple):
  """What the microbatch loop accumulates (all float32)."""
  grads: Any      # Gradient of the loss sum.
  loss: jax.Array
  weight: jax.Array
  metrics: dict
  small_sq: jax.Array  # Sum over small batches of their mean gradient's squared norm.


def _add(a: _Sums, b: _Sums) -> _Sums:
  return jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)


def _micro_sums(task, state, params, stats, mb, rng, small_batch):
  """One microbatch's ``_Sums`` (all-reduced first under ``'microbatch'``) and its new
  BN statistics."""
  out, g = _loss_and_grads(task, state, params, stats, mb, rng)
  s = _Sums(g, out.loss, out.weight, out.metrics, jnp.zeros((), jnp.float32))
  if small_batch == "microbatch":
    s, _ = _pmean(s, {}, state.fsdp_dims)
  if small_batch:
    # |g / w|^2 as |g|^2 / w^2: the reductions read the gradient sums as they are, with no
    # scaled copy for XLA to store before them.
    s = s._replace(small_sq=fsdp_lib.sq_norm(s.grads, state.fsdp_dims) / jnp.square(s.weight))
  return s, out.model_state.get("batch_stats", {})


def _grads(task: Task, state: TrainState, batch: dict, accum_steps: int, accum_unroll: bool,
           small_batch: Optional[str], seed: int):
  """This replica's ``_Sums`` over its batch (in ``accum_steps`` microbatches), the new BN
  statistics, and whether the sums are all-reduced already.

  ``small_sq`` sums the squared norms of the small-batch mean gradients (zero when
  ``small_batch`` is None): each replica's microbatch (``'replica'``), or each microbatch
  of all replicas (``'microbatch'``, whose sums are then all-reduced per microbatch, so
  the caller does not reduce them again).
  """
  params, stats0 = as_per_replica((state.params, state.batch_stats), batch)
  b, k = task_lib.rows(batch), accum_steps
  if k == 1 and small_batch != "microbatch":
    s, stats = _micro_sums(task, state, params, stats0, batch,
                           dropout_rng(seed, state.step, 0), small_batch)
    return s, stats, False
  micro = jax.tree.map(lambda x: x.reshape((k, b // k) + x.shape[1:]), batch)

  def body(carry, xs):
    j, mb = xs
    acc, stats = carry
    s, stats = _micro_sums(task, state, params, stats, mb, dropout_rng(seed, state.step, j),
                           small_batch)
    return (_add(acc, s), stats), None

  # The carry's zeros come from one microbatch's shapes (the task decides its metrics).
  shapes = jax.eval_shape(lambda: _micro_sums(task, state, params, stats0,
                                              jax.tree.map(lambda x: x[0], micro),
                                              dropout_rng(seed, state.step, 0),
                                              small_batch)[0])
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
  (sums, stats), _ = jax.lax.scan(body, (zeros, stats0), (jnp.arange(k), micro),
                                  unroll=True if accum_unroll else 1)
  return sums, stats, small_batch == "microbatch"


def _learning_rate(state: TrainState, lr_factor: float, max_learning_rate: float,
                   batch_multiplier: int):
  """The LR of this step, and the batch-size state after it.

  The schedule follows the data: under the adaptive batch size, the base batches consumed
  (times the scaling rule's factor, capped); else the step counter. Both advance on
  skipped steps too, since the data moves on.
  """
  size_state = state.batch_size_state
  if isinstance(size_state, adaptive_lib.BatchSizeState):
    lr = jnp.asarray(state.schedule(size_state.base_step), jnp.float32) * lr_factor
    if max_learning_rate:
      lr = jnp.minimum(lr, max_learning_rate)
    size_state = adaptive_lib.BatchSizeState(
        base_step=size_state.base_step + batch_multiplier,
        multiplier=jnp.full((), batch_multiplier, jnp.int32))
    return lr, size_state
  return jnp.asarray(state.schedule(state.step), jnp.float32), size_state


def _update(state: TrainState, grads, lr, recompute_opt_state: bool = False):
  """The optimizer update with ``lr`` set inside the optimizer (where each optimizer
  applies it: LARS/TVLARS before their momentum, Adam-family last).

  With ``recompute_opt_state``, the new optimizer state returned is computed a second
  time from the same inputs, behind an ``optimization_barrier`` so that XLA keeps the two
  computations apart: its only reader is then ``_apply_or_keep``'s select, into which
  it fuses, and the first one's only reader is the update. Otherwise the new state has
  two readers, so XLA stores it for the update, and the select copies it once more after
  the update's norms (see ``train_step``'s ``recompute_opt_state``)."""
  opt_state = state.opt_state
  if is_lr_injected(opt_state):
    opt_state = set_learning_rate(opt_state, lr)
  elif isinstance(state.batch_size_state, adaptive_lib.BatchSizeState):
    raise ValueError("the adaptive batch size sets the LR inside the optimizer: build it "
                     "with create_optimizer(..., inject_lr=True)")
  updates, new_opt_state = state.tx.update(grads, opt_state, state.params)
  if recompute_opt_state:
    inputs = jax.lax.optimization_barrier((grads, opt_state, state.params))
    _, new_opt_state = state.tx.update(*inputs)
  return updates, new_opt_state, optax.apply_updates(state.params, updates)


def _guards(state: TrainState, loss, grad_norm, update_norm, nonfinite: str,
            max_consecutive_skips: int):
  """``(skips, stop_now)``: the skip counters, and whether training must stop at this
  step (see ``train_step``'s ``nonfinite``). Whether the update is applied is decided in
  ``_apply_or_keep``."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  skips = state.skips
  if nonfinite == "skip":
    bad = ~finite
    skips = SkipCounts(total=skips.total + bad.astype(jnp.int32),
                       consecutive=jnp.where(bad, skips.consecutive + 1, 0))
    return skips, skips.consecutive >= max_consecutive_skips
  if nonfinite == "stop":
    return skips, ~finite
  raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}")


def _noise_scale(state: TrainState, small_sq, big_sq, b_small: int, b_big: int, decay: float):
  """The noise-scale averages after this step (``effjax.stats``)."""
  g2, trace = stats_lib.noise_scale_from_norms(small_sq, big_sq, b_small, b_big)
  return stats_lib.update_noise_scale(state.noise_scale, g2, trace, decay)


def _metrics(new_state: TrainState, loss, task_metrics: dict, lr, norms: "_Norms",
             nonfinite: str, noise_scale_decay: float) -> dict:
  metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in task_metrics.items()},
             "lr": lr, "grad_norm": norms.grad, "param_norm": norms.param,
             "update_norm": norms.update}
  if nonfinite == "skip":
    metrics["nonfinite/skipped"] = new_state.skips.total.astype(jnp.float32)
  metrics.update(trust_ratio_stats(new_state.opt_state))  # lars/lamb/tvlars only.
  if isinstance(new_state.noise_scale, stats_lib.NoiseScaleState):
    metrics.update(stats_lib.noise_scale_metrics(new_state.noise_scale, noise_scale_decay))
  return metrics


def _pmean(sums: _Sums, batch_stats, dims: tuple):
  """The mean over all replicas of the sums and BN statistics: one ``pmean`` over the
  batch axes. Gradients of split parameters (``dims``), already summed over their
  ``fsdp`` group by the gather's transpose, are summed over ``data`` only and divided
  by the replica count, so they equal the replicated parameters' mean."""
  axes = batch_axes()
  if not dims:
    return packed_pmean((sums, batch_stats), axes)
  leaves, treedef = jax.tree.flatten(sums.grads)
  split = [x for x, d in zip(leaves, dims) if d != fsdp_lib.REPLICATED]
  rest = [x for x, d in zip(leaves, dims) if d == fsdp_lib.REPLICATED]
  n = jax.lax.axis_size(axes)
  split = iter([x / n for x in jax.lax.psum(split, DATA_AXIS)])
  rest, others, batch_stats = packed_pmean((rest, sums._replace(grads=None), batch_stats),
                                           axes)
  rest = iter(rest)
  grads = [next(split) if d != fsdp_lib.REPLICATED else next(rest) for d in dims]
  return others._replace(grads=jax.tree.unflatten(treedef, grads)), batch_stats


def _reduce(sums: "_Sums", batch_stats, reduced: bool, dims: tuple = ()):
  """The one all-reduce of the step: gradient, loss and metric sums and their weight,
  the BN statistics and the small-batch norms; returns the global means.

  Each collective is a rendezvous of all replicas, so separate ones cost measurably more
  than one (CPU: ~7% of the mnist1d CNN step on 8 devices; see BENCHMARKS.md). XLA:CPU
  also meets once per operand of an all-reduce, so the leaves travel packed into one
  vector per dtype (``parallel.packed_pmean``: up to 2^18 elements on CPU, up to 4096
  elsewhere). Sums divided by the summed weight give the mean over the global batch,
  also when replicas hold different numbers of real tokens."""
  if not reduced:
    sums, batch_stats = _pmean(sums, batch_stats, dims)
  w = sums.weight
  # Times the reciprocal, not divided per element: XLA:CPU stores a per-element quotient
  # for its several readers (the norm, the optimizer's moments); a product stays fused.
  inv_w = 1.0 / w
  grads = jax.tree.map(lambda g: g * inv_w, sums.grads)
  return (grads, sums.loss / w, {k: v / w for k, v in sums.metrics.items()}, sums.small_sq,
          batch_stats)


_APPLIED = ("params", "opt_state", "ema_params", "batch_stats", "noise_scale")


class _Norms(NamedTuple):
  """The step's l2 norms (float32 scalars): of the reduced gradient, of the update, of
  the parameters after the step (the new ones, or the old where the update is dropped)."""
  grad: jax.Array
  update: jax.Array
  param: jax.Array


def _norms(state: TrainState, grads, updates) -> tuple[_Norms, jax.Array]:
  """``(norms, old_param_norm)`` from one collective: each replica reads its own slice
  of the replica-identical trees (``fsdp.split_dots``). ``norms.param`` is the norm of
  the new parameters ``w + u`` until ``_apply_or_keep`` knows whether they are kept.

  It is taken as ``|w|^2 + 2 <w, u> + |u|^2`` rather than from the new parameters
  themselves: those are written by the guard's select, and a second reader would make
  XLA store them once more before it (a pass per parameter array on XLA:CPU).
  """
  gg, uu, ww, wu = fsdp_lib.split_dots(
      [(grads, grads), (updates, updates), (state.params, state.params),
       (state.params, updates)], state.fsdp_dims)
  new = jnp.sqrt(jnp.maximum(ww + 2.0 * wu + uu, 0.0))
  return _Norms(grad=jnp.sqrt(gg), update=jnp.sqrt(uu), param=new), jnp.sqrt(ww)


def _apply_or_keep(state: TrainState, opt_state, params, loss, norms: _Norms, old_param_norm,
                   batch_stats, noise, ema_decay: float):
  """The update and everything it changes (parameters, optimizer state, EMA, BN
  statistics, noise-scale averages), or the state's own values when the loss or gradient
  is non-finite, training has stopped, or the update itself is non-finite.

  Returns ``(fields, norms)``: ``fields`` for ``state.replace``. The update is always
  computed, and a ``where`` per array keeps the old values. XLA fuses a select into the
  kernel that writes the new array when nothing else reads that array (the parameters);
  an array with another reader (AdamW's moments, read by the update too) is stored and
  then selected in a pass of its own (BENCHMARKS.md, fifth pass), unless ``_update``
  computed the optimizer state a second time for this select (``recompute_opt_state``).
  (A ``lax.cond`` around the update copied the state on every applied step, and ran the
  update as a nested computation: 2.7% of the 8-device CNN step, BENCHMARKS.md.) In
  ``norms``, ``update`` is 0 for a step that was not tried on finite inputs, NaN for
  non-finite inputs, and ``param`` is the norm of the parameters kept.
  """
  old = {k: getattr(state, k) for k in _APPLIED}
  new = {"params": params, "opt_state": opt_state, "batch_stats": batch_stats,
         "ema_params": _ema(state.ema_params, params, ema_decay), "noise_scale": noise}
  inputs_finite = jnp.isfinite(loss) & jnp.isfinite(norms.grad)
  tried = inputs_finite & (state.nonfinite_step < 0)
  ok = tried & jnp.isfinite(norms.update)
  fields = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return fields, norms._replace(
      update=jnp.where(tried, norms.update, jnp.where(inputs_finite, 0.0, jnp.nan)),
      param=jnp.where(ok, norms.param, old_param_norm))


def _ema(ema_params, params, decay: float):
  if not ema_params:
    return ema_params
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def train_step(state: TrainState, batch: dict, task: Task = CLASSIFICATION,
               ema_decay: float = 0.0, accum_steps: int = 1, noise_scale_decay: float = 0.99,
               batch_multiplier: int = 1, lr_factor: float = 1.0, max_learning_rate: float = 0.0,
               accum_unroll: bool = False, nonfinite: str = "stop",
               max_consecutive_skips: int = 10, noise_small_batch: str = "replica",
               seed: int = 0, recompute_opt_state: bool = False):
  """One optimizer step on this replica's share of the global batch.

  The task (static) gives each replica's loss *sum* and its weight (examples or real
  tokens); the step all-reduces sums and weights over ``DATA_AXIS`` and divides, which is
  the gradient of the mean loss over the global batch. BatchNorm running averages are averaged
  over replicas too, so they stay identical on every replica. The step is correct under
  ``pmap`` and ``shard_map`` with ``check_vma`` off (effjax's ``Runner``) or on (a user's
  own ``shard_map``; see ``as_per_replica``).

  With ``accum_steps = k > 1`` the replica's batch is split into k consecutive
  microbatches, run one after the other under ``lax.scan`` (activation memory of one
  microbatch), and their gradients are summed in float32 and divided by k. The update
  then equals one step on the whole batch for models without BatchNorm. With BatchNorm,
  each microbatch is normalized on its own: its statistics span that microbatch's
  examples on this replica (``batch``, ``ghost_batch``), or microbatch j of every
  replica (``sync_batch``, ``group_batch``), and the running averages are updated once
  per microbatch, in order, as k forward passes would.

  When the state keeps a noise-scale average (``state.noise_scale``), the step estimates
  |G|^2 and tr(Sigma) from small-batch gradients and the global gradient, and updates
  the averages (``effjax.stats``). The small batch is chosen by ``noise_small_batch``:

  - ``'replica'``: each microbatch on each replica (``b / k`` examples). Right only when
    each replica's gradient is the gradient of its own examples' loss, i.e. when no
    statistic crosses replicas.
  - ``'microbatch'``: microbatch j of every replica together (``B / k`` examples), with
    an all-reduce of each microbatch's gradient. Needed for cross-replica statistics
    (sync/grouped BN): the transpose of their ``psum`` sends every replica's loss into
    each replica's gradient, so a per-replica gradient is not a small-batch gradient;
    only the mean over replicas is. Needs ``accum_steps >= 2``.

  Args:
    state: the replicated ``TrainState``; its optimizer built with
      ``create_optimizer(..., inject_lr=True)`` (the step sets the LR in it), or, for a
      fixed batch only, any optax transformation following its own schedule.
    batch: this replica's rows, as the task reads them (classification:
      ``{'input': [b, ...], 'label': [b]}``).
    task: an ``effjax.tasks.Task``: the loss, its weight and the train metrics.
    ema_decay: momentum of the parameter EMA, if the state keeps one (scale it with the
      batch size by ``effjax.optim.ema_decay_for_batch``).
    accum_steps: microbatches per step; must divide ``b``.
    noise_scale_decay: momentum of the noise-scale averages.
    batch_multiplier: under the adaptive batch size (``state.batch_size_state``), how many
      base batches this step's batch holds; the base step advances by it.
    lr_factor: under the adaptive batch size, the scaling rule's LR factor for
      ``batch_multiplier``: the LR is ``schedule(base_step) * lr_factor``, at most
      ``max_learning_rate`` (if > 0), set inside the optimizer.
    accum_unroll: unroll the microbatch loop instead of a ``lax.scan`` loop. XLA:CPU runs
      convolutions inside a loop about 30 times slower (measured on the mnist1d CNN), so
      the trainer unrolls on CPU; on accelerators the scan keeps one microbatch's
      activations live at a time.
    nonfinite: what a NaN/Inf loss or gradient does. ``'stop'``: the state freezes at the
      last finite one and ``nonfinite_step`` records the step. ``'skip'``: the update is
      dropped (parameters, optimizer state, BN statistics, EMA and noise-scale averages
      stay as they were), counted in ``state.skips``; the step counter, the batch-size
      state and so the LR schedule move on with the data. ``max_consecutive_skips``
      skips in a row then stop as ``'stop'``.
    noise_small_batch: ``'replica'`` or ``'microbatch'``, see above.
    seed: the dropout keys derive from ``(seed, step, replica, microbatch)``
      (``dropout_rng``), so a resumed run replays them.
    recompute_opt_state: compute the optimizer's new state twice, once for the update
      and once for the state kept (``_update``), so that it is written once, where the
      guard decides whether to keep it, instead of stored and then copied by the guard.
      The numbers are the same up to float32 rounding (XLA may contract a multiply-add
      into an FMA in one of the two computations and not in the other). It pays for
      optimizers whose state update is elementwise
      (``effjax.optim.ELEMENTWISE_OPTIMIZERS``: SGD, momentum, AdamW; the LM's step is
      1-1.5% faster on 8 CPU devices, BENCHMARKS.md twelfth pass); for those that take
      norms (LARS, LAMB) it would take them twice, with their collectives under FSDP.
      The trainer sets it from ``optimizer.name``.

  Returns:
    ``(new_state, metrics)``; the metrics are replica-identical scalars: ``train/loss``,
    the task's ``train/<metric>`` (classification: ``train/accuracy``), ``lr`` (the LR the optimizer applied), ``grad_norm``,
    ``param_norm``, ``update_norm``, for optimizers with a trust ratio
    ``trust_ratio/{min,median,max}``, and with the noise scale
    ``noise_scale/{g2,trace_sigma,b_simple}``.

  Raises:
    ValueError: ``accum_steps`` does not divide the batch, or the noise scale has no
      small batch (one replica and no microbatches, or ``'microbatch'`` with one).

  References:
    McCandlish et al. 2018, arXiv:1812.06162 (noise scale).
  """
  b = task_lib.rows(batch)
  if accum_steps < 1 or b % accum_steps:
    raise ValueError(f"accum_steps={accum_steps} must be a positive divisor of the "
                     f"per-replica batch of {b}")
  if noise_small_batch not in SMALL_BATCHES:
    raise ValueError(f"noise_small_batch={noise_small_batch!r} is not one of {SMALL_BATCHES}")
  noise_on = isinstance(state.noise_scale, stats_lib.NoiseScaleState)
  n = jax.lax.axis_size(batch_axes())
  if noise_on and noise_small_batch == "replica" and state.fsdp_dims:
    raise ValueError("noise_small_batch='replica' needs each replica's own gradient; with "
                     "split parameters (mesh.fsdp > 1) their gradients are summed over the "
                     "fsdp group: use 'microbatch'")
  b_small = b // accum_steps * (n if noise_small_batch == "microbatch" else 1)
  if noise_on and b_small >= b * n:
    raise ValueError(f"the noise scale needs two batch sizes; its small batch "
                     f"({noise_small_batch!r}: {b_small} examples) is the whole batch: "
                     "use more replicas or accum_steps > 1")
  sums, batch_stats, reduced = _grads(task, state, batch, accum_steps, accum_unroll,
                                      noise_small_batch if noise_on else None, seed)
  grads, loss, task_metrics, small_sq, batch_stats = _reduce(sums, batch_stats, reduced,
                                                             state.fsdp_dims)
  lr, size_state = _learning_rate(state, lr_factor, max_learning_rate, batch_multiplier)
  updates, opt_state, params = _update(state, grads, lr, recompute_opt_state)
  norms, old_param_norm = _norms(state, grads, updates)
  noise = state.noise_scale
  if noise_on:
    noise = _noise_scale(state, small_sq / accum_steps, jnp.square(norms.grad), b_small,
                         b * n, noise_scale_decay)
  applied, norms = _apply_or_keep(state, opt_state, params, loss, norms, old_param_norm,
                                  batch_stats, noise, ema_decay)
  skips, stop_now = _guards(state, loss, norms.grad, norms.update, nonfinite,
                            max_consecutive_skips)
  new_state = state.replace(
      step=state.step + 1, **applied, batch_size_state=size_state, skips=skips,
      nonfinite_step=jnp.where(stop_now & (state.nonfinite_step < 0), state.step,
                               state.nonfinite_step))
  return new_state, _metrics(new_state, loss, task_metrics, lr, norms, nonfinite,
                             noise_scale_decay)


def eval_step(state: TrainState, batch: dict, task: Task = CLASSIFICATION):
  """The task's eval sums (loss, weight, metrics, ``count``) over the global eval batch.

  ``batch['mask']`` is 0 on padding rows, which therefore count nowhere.
  """
  return packed_psum(task.eval_sums(state.apply_fn, state.variables(), batch), batch_axes())


def eval_rows_step(state: TrainState, batch: dict, task: Task):
  """The task's per-row eval outputs (``Task.eval_rows``) and ``mask``, for this
  replica's rows (``Runner.compile_rows`` concatenates them over the replicas)."""
  return {**task.eval_rows(state.apply_fn, state.variables(), batch), "mask": batch["mask"]}
