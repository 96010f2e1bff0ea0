"""Batch-size scaling rules for the learning rate."""

SCALING_RULES = ("linear", "sqrt", "none")


def scale_learning_rate(base_lr, batch_size, base_batch_size=256, rule: str = "linear"):
  """The learning rate for ``batch_size``, given one tuned at ``base_batch_size``.

  Works on numbers and on ``ml_collections.FieldReference``s, so a config can derive its
  LR lazily and stay consistent under ``--config.batch_size=...`` overrides.

  Args:
    base_lr: learning rate tuned at ``base_batch_size``.
    batch_size: the global batch size.
    base_batch_size: the reference batch size (256 in Goyal et al.).
    rule: ``'linear'`` (lr * B / B0, Goyal et al. 2017), ``'sqrt'`` (lr * sqrt(B / B0),
      Krizhevsky 2014; Hoffer et al. 2017) or ``'none'``.

  Returns:
    The scaled learning rate (a number, or a FieldReference if an input is one).

  References:
    Goyal et al. 2017, arXiv:1706.02677; Krizhevsky 2014, arXiv:1404.5997;
    Hoffer et al. 2017, arXiv:1705.08741.
  """
  if rule == "linear":
    return base_lr * (batch_size / base_batch_size)
  if rule == "sqrt":
    return base_lr * (batch_size / base_batch_size) ** 0.5
  if rule == "none":
    return base_lr * 1.0
  raise ValueError(f"scaling rule {rule!r} is not one of {SCALING_RULES}")


def ema_decay_for_batch(decay: float, batch_size, base_batch_size) -> float:
  """The EMA scaling rule: momentum ``rho`` tuned at ``base_batch_size`` becomes
  ``rho ** kappa`` at ``batch_size = kappa * base_batch_size``.

  With the LR scaled by the optimizer's own rule, this keeps a model EMA averaging over
  the same number of examples, and so over the same stretch of training, at any batch size.

  Args:
    decay: the EMA momentum ``rho`` at ``base_batch_size`` (e.g. 0.9999).
    batch_size: the new global batch size.
    base_batch_size: the batch size ``decay`` was tuned at.
    (Numbers or ``ml_collections.FieldReference``s, for lazily derived config values.)

  Returns:
    ``decay ** (batch_size / base_batch_size)``.

  References:
    Busbridge et al. 2023, arXiv:2307.13813 ("How to Scale Your EMA").
  """
  if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
    raise ValueError(f"EMA decay={decay!r} must be in [0, 1]")
  return decay ** (batch_size / base_batch_size)
