"""NNX modules over ``effjax.nn.functional``: BatchNorm with cross-replica, grouped and
ghost statistics; Batch-Channel Norm; a weight-standardized convolution."""

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.nn import functional as F

Initializer = Callable[..., jax.Array]


def _use_running_average(call_value, own_value, layer: str) -> bool:
  value = own_value if call_value is None else call_value
  if value is None:
    raise ValueError(f"{layer}: pass use_running_average to the constructor or the call, "
                     "or use model.train() / model.eval()")
  return bool(value)


def _param(init, rngs: nnx.Rngs, shape, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype))


class BatchNorm(nnx.Module):
  """``flax.nnx.BatchNorm`` with statistics over the global batch, groups of replicas or
  ghost batches, on any launch path (the NNX twin of ``effjax.nn.BatchNorm``).

  Same constructor and call as ``nnx.BatchNorm`` (``num_features``, ``rngs``,
  ``use_running_average``, ``axis``, ``momentum``, ``epsilon``, ``dtype``,
  ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``,
  ``axis_name``, ``use_fast_variance``; ``mask`` at call time), with
  ``axis_index_groups`` replaced by ``group_size`` (which works under ``shard_map``) and
  ``virtual_batch_size`` added. ``scale`` and ``bias`` are ``nnx.Param``, ``mean`` and
  ``var`` are ``nnx.BatchStat``. The running averages are updated from the count-weighted
  average of the statistics over the whole ``axis_name``, so they stay identical on every
  replica (see ``effjax.nn.functional.batch_norm``); the one-pass variance is taken
  around the running mean unless ``use_running_mean_shift=False``, as in the linen
  module.

  Differs from ``nnx.BatchNorm`` in the output dtype only: with ``dtype=None`` it is the
  input's (statistics are float32 in both).

  Attributes:
    axis_name: named data axis to take statistics over (sync BN), or ``None``.
    group_size: statistics over groups of this many consecutive replicas on ``axis_name``.
    virtual_batch_size: ghost BN, statistics over each chunk of this many examples of a
      replica's batch.

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Hoffer et al. 2017, arXiv:1705.08741 (ghost
    BN); Goyal et al. 2017, arXiv:1706.02677 (BN over groups of examples).
  """

  def __init__(self, num_features: int, *, use_running_average: Optional[bool] = False,
               axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-5,
               dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Initializer = nnx.initializers.zeros_init(),
               scale_init: Initializer = nnx.initializers.ones_init(), axis_name: Any = None,
               group_size: Optional[int] = None, virtual_batch_size: Optional[int] = None,
               use_fast_variance: bool = True, use_running_mean_shift: bool = True,
               rngs: nnx.Rngs):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale = _param(scale_init, rngs, shape, param_dtype) if use_scale else nnx.data(None)
    self.bias = _param(bias_init, rngs, shape, param_dtype) if use_bias else nnx.data(None)
    self.num_features, self.use_running_average, self.axis = num_features, use_running_average, axis
    self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
    self.axis_name, self.group_size = axis_name, group_size
    self.virtual_batch_size, self.use_fast_variance = virtual_batch_size, use_fast_variance
    self.use_running_mean_shift = use_running_mean_shift

  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    axes = F._axes(x.ndim, self.axis)
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    if _use_running_average(use_running_average, self.use_running_average, "BatchNorm"):
      view = lambda p: F._feature_view(p, x.ndim, axes)
      return F.normalize(x, view(self.mean[...]), view(self.var[...]), view(scale), view(bias),
                         epsilon=self.epsilon, dtype=self.dtype)
    y, mean, var = F.batch_norm(
        x, scale, bias, feature_axes=axes, epsilon=self.epsilon, axis_name=self.axis_name,
        group_size=self.group_size, virtual_batch_size=self.virtual_batch_size, mask=mask,
        use_fast_variance=self.use_fast_variance, dtype=self.dtype,
        shift=self.mean[...] if self.use_running_mean_shift else None)
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1.0 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1.0 - m) * var)
    return y


class BatchChannelNorm(nnx.Module):
  """Batch-Channel Normalization (the NNX twin of ``effjax.nn.BatchChannelNorm``): a batch
  normalization, then a channel (group) normalization of each example with a per-group
  affine.

  ``estimated_statistics=True`` (micro-batch BCN) normalizes with running estimates that
  each training step first moves toward the batch's statistics by ``1 - momentum``
  (``mean``/``var`` are ``nnx.BatchStat``); ``False`` (large-batch BCN) uses an
  ``effjax.nnx.BatchNorm`` (``batch_norm``) with ``axis_name``/``group_size``/
  ``virtual_batch_size``. Use it after ``WSConv``.

  References:
    Qiao et al. 2019, arXiv:1903.10520 (Algorithm 1, micro-batch BCN).
  """

  def __init__(self, num_features: int, *, num_groups: int = 32,
               use_running_average: Optional[bool] = False, estimated_statistics: bool = True,
               momentum: float = 0.9, epsilon: float = 1e-5, dtype: Any = None,
               param_dtype: Any = jnp.float32, axis_name: Any = None,
               group_size: Optional[int] = None, virtual_batch_size: Optional[int] = None,
               scale_init: Initializer = nnx.initializers.ones_init(), rngs: nnx.Rngs):
    c, g = num_features, num_groups
    if g < 1 or c % g:
      raise ValueError(f"num_groups={g} must be a positive divisor of the {c} channels")
    if estimated_statistics and (group_size is not None or virtual_batch_size is not None):
      raise ValueError("group_size and virtual_batch_size apply to BatchChannelNorm only "
                       "with estimated_statistics=False")
    if estimated_statistics:
      self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
      self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))
      self.batch_scale = _param(nnx.initializers.ones_init(), rngs, (c,), param_dtype)
      self.batch_bias = _param(nnx.initializers.zeros_init(), rngs, (c,), param_dtype)
      self.batch_norm = nnx.data(None)
    else:
      self.batch_norm = BatchNorm(c, use_running_average=use_running_average,
                                  momentum=momentum, epsilon=epsilon, dtype=dtype,
                                  param_dtype=param_dtype, axis_name=axis_name,
                                  group_size=group_size,
                                  virtual_batch_size=virtual_batch_size, rngs=rngs)
    self.channel_scale = _param(scale_init, rngs, (g,), param_dtype)
    self.channel_bias = _param(nnx.initializers.zeros_init(), rngs, (g,), param_dtype)
    self.num_groups, self.use_running_average = g, use_running_average
    self.estimated_statistics, self.momentum, self.epsilon = (estimated_statistics, momentum,
                                                              epsilon)
    self.dtype, self.axis_name = dtype, axis_name

  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    eval_mode = _use_running_average(use_running_average, self.use_running_average,
                                     "BatchChannelNorm")
    if self.batch_norm is not None:
      y = self.batch_norm(x, eval_mode, mask=mask)
    elif eval_mode:
      view = lambda p: F._feature_view(p, x.ndim, (x.ndim - 1,))
      y = F.normalize(x, view(self.mean[...]), view(self.var[...]), view(self.batch_scale[...]),
                      view(self.batch_bias[...]), epsilon=self.epsilon, dtype=self.dtype)
    else:
      y, self.mean[...], self.var[...] = F.estimated_batch_norm(
          x, self.mean[...], self.var[...], self.batch_scale[...], self.batch_bias[...],
          rate=1.0 - self.momentum, epsilon=self.epsilon, axis_name=self.axis_name, mask=mask,
          dtype=self.dtype)
    y = F.channel_norm(y, self.num_groups, epsilon=self.epsilon)
    return F.group_affine(y, self.channel_scale[...], self.channel_bias[...],
                          self.dtype or x.dtype)


class WSConv(nnx.Module):
  """A convolution whose kernel is weight-standardized on every call (the NNX twin of
  ``effjax.nn.WSConv``): ``nnx.Conv``'s constructor (``in_features``, ``out_features``,
  ``kernel_size``, ``strides``, ``padding``, ``input_dilation``, ``kernel_dilation``,
  ``feature_group_count``, ``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
  ``kernel_init``, ``bias_init``, ``rngs``) and parameter names, with the kernel replaced
  by ``effjax.nn.functional.standardize_weight(kernel)``; ``scaled=True`` is the
  NF-ResNet variant with a learnable per-output ``gain``.

  References:
    Qiao et al. 2019, arXiv:1903.10520 (WS); Brock et al. 2021, arXiv:2101.08692 (scaled
    WS).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               *, strides: Any = 1, padding: Any = "SAME", input_dilation: Any = 1,
               kernel_dilation: Any = 1, feature_group_count: int = 1, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(), scaled: bool = False,
               use_gain: Optional[bool] = None,
               gain_init: Initializer = nnx.initializers.ones_init(),
               epsilon: Optional[float] = None, rngs: nnx.Rngs):
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    if in_features % feature_group_count:
      raise ValueError(f"feature_group_count={feature_group_count} does not divide the "
                       f"{in_features} input channels")
    self.kernel = _param(kernel_init, rngs, ks + (in_features // feature_group_count,
                                                  out_features), param_dtype)
    self.bias = (_param(bias_init, rngs, (out_features,), param_dtype) if use_bias
                 else nnx.data(None))
    use_gain = scaled if use_gain is None else use_gain
    self.gain = (_param(gain_init, rngs, (out_features,), param_dtype) if use_gain
                 else nnx.data(None))
    self.kernel_size, self.strides, self.padding = ks, strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.feature_group_count, self.dtype, self.param_dtype = (feature_group_count, dtype,
                                                              param_dtype)
    self.precision, self.scaled, self.epsilon = precision, scaled, epsilon

  def __call__(self, x):
    x, unbatched = F.batched_conv_input(x, len(self.kernel_size), self.feature_group_count)
    w = F.standardize_weight(self.kernel[...], epsilon=self.epsilon, scaled=self.scaled)
    if self.gain is not None:
      w = w * self.gain[...]
    y = F.conv(x, w, strides=self.strides, padding=self.padding,
               input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
               feature_group_count=self.feature_group_count, dtype=self.dtype,
               param_dtype=self.param_dtype, precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y[0] if unbatched else y
