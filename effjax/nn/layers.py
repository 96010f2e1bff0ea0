"""Thin linen modules over ``effjax.nn.functional``: BatchNorm with cross-replica, grouped
and ghost statistics; Batch-Channel Norm; a weight-standardized convolution."""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.nn import functional as F

Initializer = Callable[..., jax.Array]


def _feature_shape(x, axis):
  axes = F._axes(x.ndim, axis)
  return axes, tuple(x.shape[a] for a in axes)


class BatchNorm(nn.Module):
  """A drop-in for ``flax.linen.BatchNorm`` that can take its statistics over the global
  batch, over groups of replicas, or over ghost batches, on any launch path.

  Same attributes, variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``,
  ``var``) and call signature as flax's, with ``axis_index_groups`` replaced by
  ``group_size``, plus ``virtual_batch_size``. The statistics are built from sums and
  counts reduced over replicas, so they stay exact when replicas hold different numbers
  of real examples (``mask``). The running averages are updated from the count-weighted
  average of the statistics over the whole ``axis_name`` (see
  ``effjax.nn.functional.batch_norm``), so they are identical on every replica.

  No collective runs during ``init``, so a model can be initialized outside
  ``shard_map``/``pmap``; ghost batches are not formed during ``init`` either, so any
  batch (a single example too) initializes in train mode.

  Numerics: the one-pass variance ``E[x^2] - E[x]^2`` is taken around the running mean
  (``use_running_mean_shift``, on by default), at the same single collective. Once the
  running mean has tracked the activations, the variance is accurate for any
  ``|mean|/std`` (within 1e-3 relative at 2000, float32); before that (from the initial
  running mean 0) it has the plain one-pass formula's cancellation, about
  ``2 log10(|mean|/std)`` digits, as flax's ``BatchNorm`` always does. ``False`` gives
  flax's formula exactly; on XLA:CPU it is a little faster, since the shift makes XLA
  store ``x - running_mean`` for its reductions (one more pass over every BN input: 0.8%
  of the mnist1d CNN's step in ``benchmarks/step_profile.py``, BENCHMARKS.md).

  Differences from ``flax.linen.BatchNorm`` to know:

  - with ``dtype=None`` the output has the input's dtype (bfloat16 in, bfloat16 out);
    flax promotes it with the parameters' dtype (float32). Statistics are float32 in both.
  - ``momentum`` defaults to 0.99, as in flax; effjax's model zoo passes
    ``config.model.norm_momentum`` (0.9, the ResNet recipes' 1 - 0.1).

  Attributes:
    use_running_average: normalize with the running averages (eval) instead of batch
      statistics; may be passed to ``__call__`` instead.
    axis: the feature axis or axes.
    momentum: decay of the running averages.
    epsilon: added to the variance.
    dtype: output dtype (default: the input's); statistics are at least float32.
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: the affine part, as in flax.
    axis_name: named data axis to take statistics over (sync BN), or ``None``.
    group_size: statistics over groups of this many consecutive replicas on
      ``axis_name`` (works under ``shard_map``; see ``effjax.parallel.group_psum``).
    virtual_batch_size: ghost BN, statistics over each chunk of this many examples of a
      replica's batch.
    use_fast_variance: one-pass ``E[x^2] - E[x]^2`` (flax's default) or two-pass.
    use_running_mean_shift: take the one-pass variance around the running mean (see
      Numerics); ``False``: flax's formula.

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Hoffer et al. 2017, arXiv:1705.08741 (ghost
    BN); Goyal et al. 2017, arXiv:1706.02677 (BN over groups of examples).
  """
  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Any = None
  group_size: int | None = None
  virtual_batch_size: int | None = None
  use_fast_variance: bool = True
  use_running_mean_shift: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    axes, shape = _feature_shape(x, self.axis)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    scale = self.param("scale", self.scale_init, shape, self.param_dtype) \
        if self.use_scale else None
    bias = self.param("bias", self.bias_init, shape, self.param_dtype) \
        if self.use_bias else None
    if use_running_average:
      view = lambda p: F._feature_view(p, x.ndim, axes)
      return F.normalize(x, view(ra_mean.value), view(ra_var.value), view(scale), view(bias),
                         epsilon=self.epsilon, dtype=self.dtype)
    init = self.is_initializing()
    y, mean, var = F.batch_norm(
        x, scale, bias, feature_axes=axes, epsilon=self.epsilon,
        axis_name=None if init else self.axis_name,
        group_size=None if init else self.group_size,
        virtual_batch_size=None if init else self.virtual_batch_size, mask=mask,
        use_fast_variance=self.use_fast_variance, dtype=self.dtype,
        shift=ra_mean.value if self.use_running_mean_shift and not init else None)
    if not init:
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


class BatchChannelNorm(nn.Module):
  """Batch-Channel Normalization: a batch normalization, then a channel (group)
  normalization of each example.

  With ``estimated_statistics=True`` (micro-batch BCN, the default), the batch part
  normalizes with running estimates that each training step first moves toward the
  batch's statistics by ``1 - momentum`` (``effjax.nn.functional.estimated_batch_norm``);
  this is what makes BCN usable with 1-2 examples per replica. With ``False`` (large-batch
  BCN) it is an ``effjax.nn.BatchNorm`` (batch statistics in training, over
  ``axis_name``/``group_size``/``virtual_batch_size`` if given). Channel normalization
  then splits the channels into ``num_groups`` groups and normalizes each example's
  groups, followed by a per-group affine (as in the authors' code). Use it after
  ``WSConv``.

  Attributes:
    num_groups: channel groups; must divide the channel count.
    use_running_average: eval mode (estimates/running averages only, no updates).
    estimated_statistics: micro-batch (True) or large-batch (False) BCN.
    momentum: ``1 - r`` for the estimates' update rate ``r``, or the running-average
      momentum in large-batch mode.
    epsilon: added to variances.
    dtype, param_dtype: as in ``BatchNorm``.
    axis_name, group_size, virtual_batch_size: which examples the batch part's statistics
      span (``group_size``/``virtual_batch_size`` only without estimated statistics).
    scale_init: initializer of the final (per-group) scale; zeros makes a residual branch
      start as the identity.

  References:
    Qiao et al. 2019, arXiv:1903.10520 (Algorithm 1, micro-batch BCN).
  """
  num_groups: int = 32
  use_running_average: bool | None = None
  estimated_statistics: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  group_size: int | None = None
  virtual_batch_size: int | None = None
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    c = x.shape[-1]
    if self.estimated_statistics:
      if self.group_size is not None or self.virtual_batch_size is not None:
        raise ValueError("group_size and virtual_batch_size apply to BatchChannelNorm "
                         "only with estimated_statistics=False")
      est_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
      est_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
      scale = self.param("batch_scale", nn.initializers.ones, (c,), self.param_dtype)
      bias = self.param("batch_bias", nn.initializers.zeros, (c,), self.param_dtype)
      if use_running_average:
        view = lambda p: F._feature_view(p, x.ndim, (x.ndim - 1,))
        y = F.normalize(x, view(est_mean.value), view(est_var.value), view(scale), view(bias),
                        epsilon=self.epsilon, dtype=self.dtype)
      else:
        init = self.is_initializing()
        y, new_mean, new_var = F.estimated_batch_norm(
            x, est_mean.value, est_var.value, scale, bias, rate=1.0 - self.momentum,
            epsilon=self.epsilon, axis_name=None if init else self.axis_name, mask=mask,
            dtype=self.dtype)
        if not init:
          est_mean.value, est_var.value = new_mean, new_var
    else:
      y = BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                    epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    axis_name=self.axis_name, group_size=self.group_size,
                    virtual_batch_size=self.virtual_batch_size, name="batch_norm")(x, mask=mask)
    g = self.num_groups
    if g < 1 or c % g:
      raise ValueError(f"num_groups={g} must be a positive divisor of the {c} channels")
    y = F.channel_norm(y, g, epsilon=self.epsilon)
    gscale = self.param("channel_scale", self.scale_init, (g,), self.param_dtype)
    gbias = self.param("channel_bias", nn.initializers.zeros, (g,), self.param_dtype)
    return F.group_affine(y, gscale, gbias, self.dtype or x.dtype)


class WSConv(nn.Module):
  """A convolution whose kernel is weight-standardized on every call: ``nn.Conv``'s
  attributes and parameter names, with the kernel replaced by
  ``effjax.nn.functional.standardize_weight(kernel)``.

  ``scaled=True`` gives the NF-ResNet/NFNet variant: ``(W - mean) / (std * sqrt(fan_in))``
  times a learnable per-output ``gain`` (initialized by ``gain_init``, e.g. to the
  activation's gamma constant).

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    feature_group_count, use_bias, dtype, param_dtype, precision, kernel_init,
    bias_init: as in ``flax.linen.Conv`` (padding: ``'SAME'``, ``'VALID'``, an int, or
    one int or ``(low, high)`` pair per spatial dimension).
    scaled: NF-ResNet scaled WS.
    use_gain: learnable per-output gain (default: on when ``scaled``).
    gain_init: the gain's initializer.
    epsilon: WS epsilon (default 1e-5, or 1e-4 when ``scaled``).

  References:
    Qiao et al. 2019, arXiv:1903.10520 (WS); Brock et al. 2021, arXiv:2101.08692 (scaled
    WS).
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  scaled: bool = False
  use_gain: bool | None = None
  gain_init: Initializer = nn.initializers.ones
  epsilon: float | None = None

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    x, unbatched = F.batched_conv_input(x, len(ks), self.feature_group_count)
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        ks + (cin // self.feature_group_count, self.features), self.param_dtype)
    w = F.standardize_weight(kernel, epsilon=self.epsilon, scaled=self.scaled)
    if self.scaled if self.use_gain is None else self.use_gain:
      w = w * self.param("gain", self.gain_init, (self.features,), self.param_dtype)
    y = F.conv(x, w, strides=self.strides, padding=self.padding,
               input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
               feature_group_count=self.feature_group_count, dtype=self.dtype,
               param_dtype=self.param_dtype, precision=self.precision)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(y.dtype)
    return y[0] if unbatched else y
