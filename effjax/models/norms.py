"""Normalization and convolution selection for the model zoo (``config.model.norm``)."""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from effjax.nn import BatchChannelNorm, BatchNorm, WSConv
from effjax.parallel import BATCH_AXES

NORMS = ("batch", "sync_batch", "group_batch", "ghost_batch", "layer", "group",
         "batch_channel", "none")
BATCH_NORMS = ("batch", "sync_batch", "group_batch", "ghost_batch", "batch_channel")


def cross_replica_statistics(kind: str, bcn_estimated: bool = True) -> bool:
  """Whether norm ``kind`` normalizes with statistics that span replicas *and* carry
  gradient (sync and grouped BN; large-batch BCN). Then a replica's gradient is not the
  gradient of its own examples' loss (see ``effjax.steps.train_step``'s noise scale).
  Ghost BN reduces over replicas only for its running averages, and micro-batch BCN
  stops the gradient through its estimates, so neither counts."""
  return kind in ("sync_batch", "group_batch") or (kind == "batch_channel" and
                                                     not bcn_estimated)
CONVS = ("auto", "standard", "ws", "scaled_ws")


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """How a model normalizes (hashable, so it can be a linen attribute).

  Attributes:
    kind: one of ``NORMS``:
      ``batch``: BatchNorm over each replica's batch (running averages are made identical
      by the train step's ``pmean``);
      ``sync_batch``: over the global batch (``axis_name=BATCH_AXES``);
      ``group_batch``: over groups of ``group_size`` consecutive replicas;
      ``ghost_batch``: over ghost batches of ``virtual_batch_size`` examples per replica;
      ``layer``, ``group`` (GroupNorm with ``num_groups``), ``batch_channel``
      (``BatchChannelNorm``, with ``num_groups`` channel groups), ``none``.
    momentum: running-average momentum (``1 - r``, the estimate update rate, for BCN).
    epsilon: added to variances.
    num_groups: groups for ``group`` and ``batch_channel``; reduced to the largest divisor
      of each layer's channel count.
    group_size: replicas per BN group for ``group_batch``.
    virtual_batch_size: examples per ghost batch for ``ghost_batch``.
    bcn_estimated: micro-batch BCN (estimated statistics) or large-batch BCN.
    conv: ``standard``, ``ws`` (weight standardization), ``scaled_ws`` (NF-ResNet style),
      or ``auto``: ``ws`` for ``batch_channel`` (Qiao et al. pair them), else standard.
    running_mean_shift: effjax's batch norms take the one-pass variance around the
      running mean (``effjax.nn.BatchNorm(use_running_mean_shift=...)``); False: flax's
      formula.
    batch_norm: for ``batch`` and ``sync_batch``, a linen module with flax's
      ``BatchNorm`` signature to use instead of ``effjax.nn.BatchNorm`` (e.g.
      ``flax.linen.BatchNorm``, to compare against it); None: effjax's.
  """
  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_groups: int = 32
  group_size: int = 2
  virtual_batch_size: int = 32
  bcn_estimated: bool = True
  conv: str = "auto"
  running_mean_shift: bool = True
  batch_norm: Any = None

  @classmethod
  def from_config(cls, model_config: Any) -> "NormConfig":
    """From ``config.model`` (``norm``, ``norm_momentum``, ``norm_groups``,
    ``bn_group_size``, ``virtual_batch_size``, ``bcn_estimated``, ``conv``, ``bn_shift``;
    missing keys take the defaults)."""
    get = lambda key, field: model_config.get(key, cls.__dataclass_fields__[field].default)
    return cls(kind=model_config.norm, momentum=get("norm_momentum", "momentum"),
               num_groups=get("norm_groups", "num_groups"),
               group_size=get("bn_group_size", "group_size"),
               virtual_batch_size=get("virtual_batch_size", "virtual_batch_size"),
               bcn_estimated=get("bcn_estimated", "bcn_estimated"), conv=get("conv", "conv"),
               running_mean_shift=get("bn_shift", "running_mean_shift"))


def as_norm_config(norm: "str | NormConfig") -> NormConfig:
  return NormConfig(kind=norm) if isinstance(norm, str) else norm


class Identity(nn.Module):
  """No normalization; accepts and ignores ``scale_init``."""
  scale_init: Any = None

  @nn.compact
  def __call__(self, x):
    return x


def _divisor_at_most(c: int, g: int) -> int:
  return max(d for d in range(1, min(g, c) + 1) if c % d == 0)


def make_norm(norm: "str | NormConfig", *, train: bool,
              dtype: Any = jnp.float32) -> Callable[..., nn.Module]:
  """Returns a constructor ``norm(name=None, scale_init=ones) -> nn.Module``.

  Args:
    norm: a ``NormConfig``, or just its ``kind``.
    train: batch statistics (True) or running averages (False) for batch norms.
    dtype: computation dtype; parameters and statistics stay float32.

  Returns:
    A module constructor taking ``name`` and ``scale_init``.
  """
  n = as_norm_config(norm)
  shift = {} if n.batch_norm else {"use_running_mean_shift": n.running_mean_shift}
  bn = functools.partial(n.batch_norm or BatchNorm, use_running_average=not train,
                         momentum=n.momentum, epsilon=n.epsilon, dtype=dtype, **shift)
  if n.kind == "batch":
    return bn
  if n.kind == "sync_batch":
    return functools.partial(bn, axis_name=BATCH_AXES)
  if n.kind == "group_batch":
    return functools.partial(bn, axis_name=BATCH_AXES, group_size=n.group_size)
  if n.kind == "ghost_batch":
    return functools.partial(bn, axis_name=BATCH_AXES, virtual_batch_size=n.virtual_batch_size)
  if n.kind == "batch_channel":
    return functools.partial(_BatchChannelNorm, num_groups=n.num_groups,
                             use_running_average=not train,
                             estimated_statistics=n.bcn_estimated, momentum=n.momentum,
                             epsilon=n.epsilon, dtype=dtype, axis_name=BATCH_AXES)
  if n.kind == "layer":
    return functools.partial(nn.LayerNorm, epsilon=n.epsilon, dtype=dtype)
  if n.kind == "group":
    return functools.partial(_GroupNorm, num_groups=n.num_groups, epsilon=n.epsilon,
                             dtype=dtype)
  if n.kind == "none":
    return Identity
  raise ValueError(f"model.norm={n.kind!r} is not one of {NORMS}")


def make_conv(norm: "str | NormConfig", dtype: Any = jnp.float32) -> Callable[..., nn.Module]:
  """Returns the convolution constructor (``nn.Conv``'s signature) the norm calls for."""
  n = as_norm_config(norm)
  conv = n.conv
  if conv == "auto":
    conv = "ws" if n.kind == "batch_channel" else "standard"
  if conv == "standard":
    return functools.partial(nn.Conv, dtype=dtype)
  if conv in ("ws", "scaled_ws"):
    return functools.partial(WSConv, dtype=dtype, scaled=conv == "scaled_ws")
  raise ValueError(f"model.conv={n.conv!r} is not one of {CONVS}")


class _GroupNorm(nn.Module):
  """GroupNorm whose group count is the largest divisor of the channels <= num_groups."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=_divisor_at_most(x.shape[-1], self.num_groups),
                        epsilon=self.epsilon, dtype=self.dtype, scale_init=self.scale_init)(x)


class _BatchChannelNorm(nn.Module):
  """BatchChannelNorm whose group count is the largest divisor of the channels <=
  num_groups (so one setting serves every layer width)."""
  num_groups: int = 32
  use_running_average: bool = False
  estimated_statistics: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: Any = None
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return BatchChannelNorm(
        num_groups=_divisor_at_most(x.shape[-1], self.num_groups),
        use_running_average=self.use_running_average,
        estimated_statistics=self.estimated_statistics, momentum=self.momentum,
        epsilon=self.epsilon, dtype=self.dtype, axis_name=self.axis_name,
        scale_init=self.scale_init)(x)
