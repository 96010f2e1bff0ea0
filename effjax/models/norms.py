"""Normalization layer selection for the model zoo (``config.model.norm``)."""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from effjax.parallel import DATA_AXIS

NORMS = ("batch", "sync_batch", "layer", "group", "none")


class Identity(nn.Module):
  """No normalization; accepts and ignores ``scale_init``."""
  scale_init: Any = None

  @nn.compact
  def __call__(self, x):
    return x


def make_norm(kind: str, *, train: bool, dtype: Any = jnp.float32, momentum: float = 0.9,
              epsilon: float = 1e-5, num_groups: int = 32) -> Callable[..., nn.Module]:
  """Returns a constructor ``norm(name=None, scale_init=ones) -> nn.Module``.

  Args:
    kind: ``batch`` (statistics over each device's batch), ``sync_batch`` (over the global
      batch, via ``axis_name=DATA_AXIS``), ``layer``, ``group`` or ``none``.
    train: batch statistics (True) or running averages (False) for batch norms.
    dtype: computation dtype; parameters and statistics stay float32.
    momentum, epsilon: batch-norm running-average momentum and epsilon.
    num_groups: groups for ``group`` norm (reduced to divide the channel count).

  Returns:
    A module constructor taking ``name`` and ``scale_init``.
  """
  if kind in ("batch", "sync_batch"):
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                             epsilon=epsilon, dtype=dtype,
                             axis_name=DATA_AXIS if kind == "sync_batch" else None)
  if kind == "layer":
    return functools.partial(nn.LayerNorm, epsilon=epsilon, dtype=dtype)
  if kind == "group":
    return functools.partial(_GroupNorm, num_groups=num_groups, epsilon=epsilon, dtype=dtype)
  if kind == "none":
    return Identity
  raise ValueError(f"model.norm={kind!r} is not one of {NORMS}")


class _GroupNorm(nn.Module):
  """GroupNorm whose group count is the largest divisor of the channels <= num_groups."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    g = max(d for d in range(1, min(self.num_groups, c) + 1) if c % d == 0)
    return nn.GroupNorm(num_groups=g, epsilon=self.epsilon, dtype=self.dtype,
                        scale_init=self.scale_init)(x)
