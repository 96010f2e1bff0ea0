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
