"""Builds the optimizer named by a config, as an ``optax.chain``."""

from typing import Any

import optax

from effjax.optim import transforms
from effjax.optim.schedules import warmup_schedule

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw", "lars", "lamb", "tvlars")
WEIGHT_DECAY_MASKS = ("ndim>1", "all")


def decay_mask(kind: str):
  """``'ndim>1'``: decay weights only, not biases or norm scales/offsets; ``'all'``."""
  if kind == "all":
    return None
  if kind == "ndim>1":
    return transforms.default_mask
  raise ValueError(f"optimizer.weight_decay_mask={kind!r} is not one of {WEIGHT_DECAY_MASKS}")


def _mask(kind: str):
  """Config mask names -> ``effjax.optim`` masks (None: the recipe default; True: all)."""
  if kind not in WEIGHT_DECAY_MASKS:
    raise ValueError(f"mask {kind!r} is not one of {WEIGHT_DECAY_MASKS}")
  return None if kind == "ndim>1" else True


def create_optimizer(config: Any, total_steps: int, unit_lr: bool = False):
  """Returns ``(tx, schedule)`` for ``config.optimizer`` and ``config.schedule``.

  Args:
    config: the experiment config; uses ``optimizer.{name, learning_rate, momentum,
      nesterov, weight_decay, weight_decay_mask, trust_ratio_mask, trust_coefficient,
      max_trust_ratio, grad_prenorm, b1, b2, eps, tvlars}`` and ``schedule.{decay,
      warmup_steps, init_value, end_value, power, decay_fraction}``.
    total_steps: training steps in all.
    unit_lr: build the optimizer with learning rate 1, leaving the caller to multiply the
      updates by the schedule (the adaptive batch size does, to follow the schedule in
      examples rather than steps). Every optimizer here applies its LR as the last
      scaling of the update (weight decay included), so that product is the same update.

  Returns:
    An ``optax.GradientTransformation`` and the learning-rate schedule (followed by the
    transformation, or to be applied by the caller when ``unit_lr``).
  """
  o, s = config.optimizer, config.schedule
  schedule = warmup_schedule(float(o.learning_rate), total_steps, int(s.warmup_steps),
                             s.decay, init_value=s.init_value, end_value=s.end_value,
                             power=s.power, decay_fraction=s.decay_fraction)
  lr = 1.0 if unit_lr else schedule
  wd = float(o.weight_decay)
  decay = (optax.add_decayed_weights(wd, mask=decay_mask(o.weight_decay_mask))
           if wd else optax.identity())
  if o.name == "adamw":
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd,
                     mask=decay_mask(o.weight_decay_mask))
  elif o.name in ("sgd", "momentum", "nesterov"):
    # Coupled weight decay (added to the gradient before momentum), as in the
    # Goyal et al. and LARS recipes.
    tx = optax.chain(decay, optax.sgd(lr, momentum=None if o.name == "sgd" else o.momentum,
                                      nesterov=o.name == "nesterov"))
  elif o.name in ("lars", "tvlars", "lamb"):
    common = dict(weight_decay=wd, weight_decay_mask=_mask(o.weight_decay_mask),
                  trust_ratio_mask=_mask(o.trust_ratio_mask))
    max_ratio = float(o.max_trust_ratio) if o.max_trust_ratio > 0 else None
    if o.name == "lars":
      tx = transforms.lars(lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient,
                           nesterov=o.nesterov, max_trust_ratio=max_ratio, **common)
    elif o.name == "lamb":
      tx = transforms.lamb(lr, b1=o.b1, b2=o.b2, eps=o.eps, max_trust_ratio=max_ratio,
                           grad_prenorm=o.grad_prenorm, **common)
    else:
      tv = o.tvlars
      tx = transforms.tvlars(lr, decay_rate=tv.decay_rate, delay_steps=tv.delay_steps,
                             alpha=tv.alpha, min_factor=tv.min_factor, momentum=o.momentum,
                             trust_coefficient=o.trust_coefficient, nesterov=o.nesterov,
                             **common)
  else:
    raise ValueError(f"optimizer.name={o.name!r} is not one of {OPTIMIZERS}")
  return tx, schedule
