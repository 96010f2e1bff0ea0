"""Builds the optimizer named by a config, as an ``optax.chain``."""

import functools
from typing import Any

import jax.numpy as jnp
import optax

from effjax.optim import transforms
from effjax.parallel import FSDP_AXIS
from effjax.optim.schedules import warmup_schedule

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw", "lars", "lamb", "tvlars")
# Those whose state update reads each element alone (no norms, no collectives), so that
# computing the new state a second time costs one fused pass (``train_step``'s
# ``recompute_opt_state``).
ELEMENTWISE_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw")
WEIGHT_DECAY_MASKS = ("ndim>1", "all")


def decay_mask(kind: str, stacked: Any = None):
  """The weight-decay mask named by the config, as a function of the parameters:
  ``'ndim>1'``: weights only (``transforms.default_mask``, counting a stacked layer
  axis out when ``stacked`` marks one); ``'all'``: every parameter
  (``transforms.all_mask``). Never ``None``, which optax and effjax read differently."""
  if kind == "all":
    return transforms.all_mask
  if kind == "ndim>1":
    if stacked is None:
      return transforms.default_mask
    return functools.partial(transforms.default_mask, stacked=stacked)
  raise ValueError(f"optimizer.weight_decay_mask={kind!r} is not one of {WEIGHT_DECAY_MASKS}")


# The optimizers' own epsilon defaults: Adam's 1e-8; LAMB's 1e-6 (the paper's code and
# ``effjax.optim.lamb``). ``optimizer.eps`` overrides them when set.
DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6}


def _build(o, lr, stacked=None, sharded=None) -> optax.GradientTransformation:
  """The chain for ``config.optimizer`` ``o`` at learning rate ``lr`` (a number or a
  schedule); ``stacked`` marks parameters with a stacked layer axis; ``sharded`` (a
  function of the parameters) those split over the ``fsdp`` axis, whose norms are
  summed over it."""
  wd = float(o.weight_decay)
  mask = decay_mask(o.weight_decay_mask, stacked)
  eps = DEFAULT_EPS.get(o.name) if o.get("eps") is None else float(o.eps)
  if o.name == "adamw":
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=eps, weight_decay=wd, mask=mask)
  if o.name in ("sgd", "momentum", "nesterov"):
    # Coupled weight decay (added to the gradient before momentum), as in the
    # Goyal et al. and LARS recipes.
    decay = optax.add_decayed_weights(wd, mask=mask) if wd else optax.identity()
    return optax.chain(decay, optax.sgd(lr, momentum=None if o.name == "sgd" else o.momentum,
                                        nesterov=o.name == "nesterov"))
  if o.name not in ("lars", "tvlars", "lamb"):
    raise ValueError(f"optimizer.name={o.name!r} is not one of {OPTIMIZERS}")
  common = dict(weight_decay=wd, weight_decay_mask=mask, stacked=stacked,
                trust_ratio_mask=decay_mask(o.trust_ratio_mask, stacked),
                axis_name=FSDP_AXIS if sharded is not None else None, sharded=sharded)
  max_ratio = float(o.max_trust_ratio) if o.max_trust_ratio > 0 else None
  if o.name == "lars":
    return transforms.lars(lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient,
                           nesterov=o.nesterov, max_trust_ratio=max_ratio, **common)
  if o.name == "lamb":
    return transforms.lamb(lr, b1=o.b1, b2=o.b2, eps=eps, max_trust_ratio=max_ratio,
                           grad_prenorm=o.grad_prenorm, **common)
  tv = o.tvlars
  return transforms.tvlars(lr, decay_rate=tv.decay_rate, delay_steps=tv.delay_steps,
                           alpha=tv.alpha, min_factor=tv.min_factor, momentum=o.momentum,
                           trust_coefficient=o.trust_coefficient, nesterov=o.nesterov,
                           **common)


def create_optimizer(config: Any, total_steps: int, inject_lr: bool = False,
                     sharded: Any = None):
  """Returns ``(tx, schedule)`` for ``config.optimizer`` and ``config.schedule``.

  Args:
    config: the experiment config; uses ``optimizer.{name, learning_rate, momentum,
      nesterov, weight_decay, weight_decay_mask, trust_ratio_mask, trust_coefficient,
      max_trust_ratio, grad_prenorm, b1, b2, eps, tvlars}`` and ``schedule.{decay,
      warmup_steps, init_value, end_value, power, decay_fraction}``.
    total_steps: training steps in all.
    inject_lr: wrap the optimizer in ``optax.inject_hyperparams``, so that the caller sets
      the learning rate in ``opt_state.hyperparams['learning_rate']`` before each update
      (``effjax.steps.train_step`` does, from the schedule at the step that the data has
      reached). The LR then sits where each optimizer applies it: LARS and TVLARS scale
      by it *before* their momentum trace, so it cannot be applied to the output instead.
      Without it, ``tx`` follows ``schedule`` by its own update count.
    sharded: for parameters split over the ``fsdp`` mesh axis, a function of the
      parameters marking them (``effjax.fsdp.sharded_mask``): trust ratios and the
      prenorm's global norm then sum their squares over ``fsdp``. None: replicated.

  Returns:
    An ``optax.GradientTransformation`` and the learning-rate schedule.
  """
  o, s = config.optimizer, config.schedule
  schedule = warmup_schedule(float(o.learning_rate), total_steps, int(s.warmup_steps),
                             s.decay, init_value=s.init_value, end_value=s.end_value,
                             power=s.power, decay_fraction=s.decay_fraction)
  # A model that stacks its layers (nn.scan) gets one trust ratio per layer.
  model = config.get("model")
  stacked = transforms.stacked_mask if model is not None and model.get("scan_layers") else None
  if inject_lr:
    tx = optax.inject_hyperparams(lambda learning_rate: _build(o, learning_rate, stacked,
                                                               sharded),
                                  hyperparam_dtype=jnp.float32)(
                                      learning_rate=float(schedule(0)))
  else:
    tx = _build(o, schedule, stacked, sharded)
  return tx, schedule


def set_learning_rate(opt_state: Any, lr) -> Any:
  """``opt_state`` of an ``inject_lr`` optimizer with its learning rate set to ``lr``.

  Raises:
    ValueError: the state has no injected learning rate.
  """
  if not is_lr_injected(opt_state):
    raise ValueError("the optimizer has no injected learning rate; build it with "
                     "create_optimizer(..., inject_lr=True) or optax.inject_hyperparams")
  return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                         "learning_rate": jnp.asarray(lr, jnp.float32)})


def is_lr_injected(opt_state: Any) -> bool:
  """Whether ``opt_state`` comes from ``optax.inject_hyperparams`` with a learning rate."""
  return isinstance(getattr(opt_state, "hyperparams", None), dict) and \
      "learning_rate" in opt_state.hyperparams
