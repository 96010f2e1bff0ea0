"""The train state and the pure, per-replica train and eval steps.

Both steps run once per replica and reduce over ``DATA_AXIS``; ``Runner.compile`` runs
them under ``shard_map`` or ``pmap``. Hyperparameters reach them through the state's
static fields (``apply_fn``, ``tx``, ``schedule``) or keyword arguments bound once.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from effjax.optim.transforms import trust_ratio_stats
from effjax.parallel import DATA_AXIS, global_norm

# The fields of a TrainState that are data (and go into checkpoints).
STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "nonfinite_step", "ema_params")


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and writes, as one pytree.

  Attributes:
    step: number of steps taken.
    params: model parameters (float32).
    batch_stats: BatchNorm running averages (an empty dict without BatchNorm).
    opt_state: the optax state.
    nonfinite_step: the first step whose loss or gradient was NaN/Inf, or -1. From that
      step on, updates are not applied, so the parameters stay the last finite ones.
    ema_params: an exponential moving average of ``params`` (an empty dict when off).
    apply_fn, tx, schedule: the model's apply, the optimizer, the LR schedule (static).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array
  ema_params: Any
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
                       input_shape: tuple[int, ...], ema: bool = False) -> TrainState:
  """Initialises parameters (with a batch of one), the optimizer state and, if ``ema``,
  the parameter EMA (starting at the initial parameters), on the host."""
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + tuple(input_shape)),
                                           train=False))(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    nonfinite_step=jnp.full((), -1, jnp.int32),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                    apply_fn=model.apply, tx=tx, schedule=schedule)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing, in float32."""
  n = logits.shape[-1]
  targets = jax.nn.one_hot(labels, n)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / n
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict, label_smoothing: float = 0.0,
               ema_decay: float = 0.0):
  """One optimizer step on this replica's share of the global batch.

  The loss is the mean over this replica's examples; gradients are averaged over
  ``DATA_AXIS``, which equals the gradient of the mean loss over the global batch (all
  replicas hold the same number of examples). BatchNorm running averages are averaged
  over replicas too, so they stay identical on every replica.

  Args:
    state: the replicated ``TrainState``.
    batch: ``{'input': [b, ...], 'label': [b]}``, this replica's rows.
    label_smoothing: label-smoothing factor for the cross-entropy.
    ema_decay: momentum of the parameter EMA, if the state keeps one (scale it with the
      batch size by ``effjax.optim.ema_decay_for_batch``).

  Returns:
    ``(new_state, metrics)``; the metrics are replica-identical scalars: ``train/loss``,
    ``train/accuracy``, ``lr``, ``grad_norm``, ``param_norm``, ``update_norm`` and, for
    optimizers with a trust ratio, ``trust_ratio/{min,median,max}``.
  """
  def loss_fn(params):
    logits, new_vars = state.apply_fn(state.variables(params), batch["input"], train=True,
                                      mutable=["batch_stats"])
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (logits, new_vars.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, DATA_AXIS)
  batch_stats = jax.lax.pmean(batch_stats, DATA_AXIS)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  loss = jax.lax.pmean(loss, DATA_AXIS)
  accuracy = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch["label"]), DATA_AXIS)
  grad_norm = global_norm(grads)
  update_norm = global_norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  ok = finite & (state.nonfinite_step < 0)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  ema_params = state.ema_params
  if ema_params:
    ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                              ema_params, params)
  new_state = state.replace(
      step=state.step + 1,
      ema_params=keep(ema_params, state.ema_params),
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step,
                               state.step))
  metrics = {
      "train/loss": loss,
      "train/accuracy": accuracy,
      "lr": jnp.asarray(state.schedule(state.step), jnp.float32),
      "grad_norm": grad_norm,
      "param_norm": global_norm(new_state.params),
      "update_norm": update_norm,
  }
  metrics.update(trust_ratio_stats(new_state.opt_state))  # lars/lamb/tvlars only.
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
