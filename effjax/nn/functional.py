"""Normalization maths as pure functions: batch statistics over devices, groups of devices
or ghost batches; Batch-Channel Norm's estimated statistics and channel norm; weight
standardization.

Everything here is a function of arrays (and, for cross-replica statistics, a named
axis), with no module state, so it can be tested against numpy and reused outside linen.
The linen modules in ``effjax.nn.layers`` hold the parameters and running averages.
"""

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from effjax.parallel import bound_axes, group_psum

Axes = int | Sequence[int]


def _axes(ndim: int, axes: Axes) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted({a % ndim for a in axes}))


def _stats_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _replicas(axis_name: Any, group_size: int | None) -> int:
  """How many replicas' examples one statistic spans (``group_psum``'s groups)."""
  if axis_name is None:
    return 1
  axes = bound_axes(axis_name)
  return group_size or (jax.lax.axis_size(axes) if axes else 1)


def batch_moments(x: jax.Array, reduction_axes: Axes, *, axis_name: Any = None,
                  group_size: int | None = None, mask: jax.Array | None = None,
                  use_fast_variance: bool = True, shift: jax.Array | None = None):
  """Mean and biased variance over ``reduction_axes`` and over a group of replicas.

  The statistics are formed from sums and counts reduced over the replicas, so they are
  exactly those of the concatenated examples, also when replicas hold different numbers
  of real (unmasked) examples. (Averaging per-replica means, as ``lax.pmean`` of the
  means does, weights replicas equally and is wrong then: flax issue #2417.)

  Args:
    x: this replica's activations.
    reduction_axes: the axes of ``x`` to reduce (all but the feature axes).
    axis_name: named data axis to reduce over too, or ``None`` for this replica only.
    group_size: reduce over groups of this many consecutive replicas of ``axis_name``
      (see ``effjax.parallel.group_psum``); ``None`` means all of them.
    mask: optional array broadcastable to ``x``; only positions where it is nonzero count.
    use_fast_variance: ``E[x^2] - E[x]^2`` in one reduction (clipped at 0), as flax does;
      ``False`` takes the mean first, then ``E[(x - mean)^2]`` (two reductions).
    shift: optional value ``c`` broadcastable to the statistics' shape (``x``'s with the
      reduced axes as 1); no gradient flows into it. The fast
      path subtracts first: ``var = E[(x-c)^2] - (E[x]-c)^2``, still one reduction. The
      one-pass formula loses about ``2 log10(|mean - c| / std)`` digits to cancellation:
      for ``|mean|/std = 2000`` in float32 that is an 18% error with ``c = 0``, and none
      with ``c`` near the mean (e.g. the running mean, as ``BatchNorm`` passes).

  Returns:
    ``(mean, var, count)`` in at least float32, shaped like ``x`` with the reduced axes
    kept as size 1; ``count`` is the number of examples behind each statistic.
  """
  dtype = _stats_dtype(x)
  x = x.astype(dtype)
  axes = _axes(x.ndim, reduction_axes)
  stats_shape = [1 if a in axes else d for a, d in enumerate(x.shape)]
  c = None
  if shift is not None and use_fast_variance:
    c = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(shift, dtype)), stats_shape)
    x = x - c
  if mask is None:
    # Every replica of a group holds the same number of examples: the count is known
    # when tracing, so only the sums travel (a stacked count cost XLA:CPU a broadcast,
    # a concatenation and, in the backward pass, a pad per layer).
    m = None
    count = jnp.full(stats_shape, math.prod(x.shape[a] for a in axes) *
                     _replicas(axis_name, group_size), dtype)
  else:
    m = jnp.broadcast_to(mask, x.shape).astype(bool)
    x = jnp.where(m, x, 0)
    count = jnp.sum(m, axes, keepdims=True, dtype=dtype)

  def reduce(*sums):
    if axis_name is None:
      return sums
    stacked = jnp.stack(jnp.broadcast_arrays(*sums))  # one collective for all sums
    return tuple(group_psum(stacked, axis_name, group_size))

  def reduce_with_count(*sums):
    return (count,) + reduce(*sums) if m is None else reduce(count, *sums)

  if use_fast_variance:
    # x^2 is traced before the sum of x, as flax does: in the other order, XLA:CPU fused
    # the backward pass's per-element work a second time into the transpose that lays
    # out the gradient for the convolution before it (same maths, traced in another order;
    # 1.5% of the mnist1d CNN's step, BENCHMARKS.md twelfth pass).
    sq = jnp.square(x)
    count, s1, s2 = reduce_with_count(jnp.sum(x, axes, keepdims=True),
                                      jnp.sum(sq, axes, keepdims=True))
    n = jnp.maximum(count, 1)
    mean = s1 / n
    var = jnp.maximum(s2 / n - jnp.square(mean), 0.0)
    if c is not None:
      mean = mean + c
  else:
    count, s1 = reduce_with_count(jnp.sum(x, axes, keepdims=True))
    n = jnp.maximum(count, 1)
    mean = s1 / n
    d = x - mean if m is None else jnp.where(m, x - mean, 0)
    (s2,) = reduce(jnp.sum(jnp.square(d), axes, keepdims=True))
    var = s2 / n
  return mean, var, count


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array | None = None,
              bias: jax.Array | None = None, *, epsilon: float = 1e-5, dtype: Any = None):
  """``(x - mean) / sqrt(var + epsilon) * scale + bias``, cast to ``dtype`` (or x's).

  All of ``mean``, ``var``, ``scale`` and ``bias`` must broadcast against ``x``.
  """
  mul = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  y = (x.astype(mul.dtype) - mean) * mul
  if bias is not None:
    y = y + bias
  return y.astype(dtype or x.dtype)


def _feature_view(p: jax.Array | None, ndim: int, feature_axes: tuple[int, ...]):
  """Reshapes a feature-shaped parameter to broadcast against an ``ndim`` input."""
  if p is None:
    return None
  shape = [1] * ndim
  for a, d in zip(feature_axes, p.shape):
    shape[a] = d
  return p.reshape(shape)


def batch_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               feature_axes: Axes = -1, epsilon: float = 1e-5, axis_name: Any = None,
               group_size: int | None = None, virtual_batch_size: int | None = None,
               mask: jax.Array | None = None, use_fast_variance: bool = True,
               dtype: Any = None, shift: jax.Array | None = None):
  """Batch normalization in training mode, with the statistics over a chosen set of
  examples.

  Which examples one statistic spans:

  - by default, this replica's batch; with ``axis_name``, the global batch on that axis
    (cross-replica or "sync" BN);
  - with ``group_size=g`` (and ``axis_name``), the batches of ``g`` consecutive replicas
    (the TPU-pod practice of BN groups);
  - with ``virtual_batch_size=v``, each chunk of ``v`` consecutive examples of this
    replica's batch (ghost BN). ``axis_name`` then only affects the running averages.

  The statistics returned for the running averages are the count-weighted average of the
  statistics of all groups, over the whole ``axis_name`` when one is given, so they are
  identical on every replica. For sync BN they are the global batch's mean and variance;
  for grouped and ghost BN, the mean of the group means and of the within-group variances
  (the variance the layer normalized with, as in Keras's ghost BN).

  Args:
    x: this replica's activations; axis 0 is the batch.
    scale, bias: optional feature-shaped parameters.
    feature_axes: the axes that are not reduced (channels); the others are.
    epsilon: added to the variance.
    axis_name: named data axis, or ``None``.
    group_size: replicas per statistics group (requires ``axis_name``).
    virtual_batch_size: examples per ghost batch; must divide ``x.shape[0]``.
    mask: optional array broadcastable to ``x``; masked positions count in no statistic.
    use_fast_variance: see ``batch_moments``.
    dtype: output dtype (default: ``x``'s). Statistics are at least float32.
    shift: feature-shaped value subtracted before the one-pass moments (see
      ``batch_moments``); ``BatchNorm`` passes its running mean.

  Returns:
    ``(y, mean, var)``: the normalized ``x`` and feature-shaped float32 statistics for the
    running averages.

  Raises:
    ValueError: for a ``virtual_batch_size`` that does not divide the batch, both
      ``group_size`` and ``virtual_batch_size``, or ``group_size`` without ``axis_name``.

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167 (BatchNorm); Hoffer et al. 2017,
    arXiv:1705.08741 (ghost BN); Goyal et al. 2017, arXiv:1706.02677 (per-worker BN).
  """
  feature_axes = _axes(x.ndim, feature_axes)
  if 0 in feature_axes:
    raise ValueError(f"feature_axes={feature_axes} must not include the batch axis 0")
  if group_size is not None and virtual_batch_size is not None:
    raise ValueError("set one of group_size and virtual_batch_size, not both")
  if group_size is not None and axis_name is None:
    raise ValueError(f"group_size={group_size} needs an axis_name to group replicas on")
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  scale = _feature_view(scale, x.ndim, feature_axes)
  bias = _feature_view(bias, x.ndim, feature_axes)

  if virtual_batch_size is None:
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    mean, var, count = batch_moments(x, reduction_axes, axis_name=axis_name,
                                     group_size=group_size, mask=mask,
                                     use_fast_variance=use_fast_variance,
                                     shift=_feature_view(shift, x.ndim, feature_axes))
    y = normalize(x, mean, var, scale, bias, epsilon=epsilon, dtype=dtype)
    if group_size is None:
      return y, mean.reshape(feature_shape), var.reshape(feature_shape)
    num_stats = 1
  else:
    v, b = virtual_batch_size, x.shape[0]
    if not isinstance(v, int) or v < 1 or b % v:
      raise ValueError(f"virtual_batch_size={v!r} must be a positive divisor of the "
                       f"per-replica batch of {b}")
    ghost = lambda a: a.reshape((b // v, v) + a.shape[1:])
    mg = None if mask is None else ghost(jnp.broadcast_to(mask, x.shape))
    reduction_axes = tuple(a + 1 for a in range(x.ndim) if a not in feature_axes)
    mean, var, count = batch_moments(ghost(x), reduction_axes, mask=mg,
                                     use_fast_variance=use_fast_variance,
                                     shift=None if shift is None else
                                     _feature_view(shift, x.ndim, feature_axes)[None])
    expand = lambda p: None if p is None else p[None]
    y = normalize(ghost(x), mean, var, expand(scale), expand(bias), epsilon=epsilon,
                  dtype=dtype).reshape(x.shape)
    num_stats = b // v
  # Several statistics (groups or ghost batches): their count-weighted average, over the
  # whole axis when there is one, feeds the running averages.
  mean, var, count = (a.reshape((num_stats, -1)) for a in (mean, var, count))
  sums = jnp.stack([jnp.sum(count * mean, 0), jnp.sum(count * var, 0), jnp.sum(count, 0)])
  if axis_name is not None:
    sums = jax.lax.psum(sums, bound_axes(axis_name))
  total = jnp.maximum(sums[2], 1)
  return y, (sums[0] / total).reshape(feature_shape), (sums[1] / total).reshape(feature_shape)


def estimated_batch_norm(x: jax.Array, est_mean: jax.Array, est_var: jax.Array,
                         scale: jax.Array | None = None, bias: jax.Array | None = None, *,
                         rate: float = 0.1, feature_axes: Axes = -1, epsilon: float = 1e-5,
                         axis_name: Any = None, mask: jax.Array | None = None,
                         dtype: Any = None):
  """The batch part of micro-batch Batch-Channel Norm: normalize with *estimated*
  statistics, updated from the batch first.

  With ``mu``, ``s2`` the batch mean and the mean of ``(x - est_mean)^2`` (over
  ``axis_name`` too when given), the estimates move by ``rate``:
  ``est_mean' = est_mean + rate * (mu - est_mean)``,
  ``est_var' = est_var + rate * (s2 - est_var)``, and
  ``y = (x - est_mean') / sqrt(est_var' + epsilon) * scale + bias``.
  No gradient flows through the estimates.

  Args:
    x: activations; axis 0 is the batch.
    est_mean, est_var: feature-shaped current estimates.
    scale, bias: optional feature-shaped affine parameters.
    rate: update rate ``r`` of the estimates.
    feature_axes, epsilon, axis_name, mask, dtype: as in ``batch_norm``.

  Returns:
    ``(y, new_est_mean, new_est_var)``.

  References:
    Qiao et al. 2019, arXiv:1903.10520, Algorithm 1 (micro-batch BCN). The variance
    sample is centred on the current estimate ``est_mean``, not the batch mean, as in the
    authors' code (joe-siyuan-qiao/Batch-Channel-Normalization, ``EstBN``).
  """
  feature_axes = _axes(x.ndim, feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  xs = jax.lax.stop_gradient(x)
  m0 = _feature_view(est_mean, x.ndim, feature_axes)
  # E[x] and E[(x - est_mean)^2] are both plain means, so batch_moments' fast path gives
  # them from the shifted input: mean(x - m0) + m0 and var + mean^2 of the shifted input.
  mean_c, var_c, _ = batch_moments(xs - m0, reduction_axes, axis_name=axis_name, mask=mask)
  mu = (mean_c + m0).reshape(feature_shape)
  s2 = (var_c + jnp.square(mean_c)).reshape(feature_shape)
  new_mean = est_mean + rate * (mu - est_mean)
  new_var = est_var + rate * (s2 - est_var)
  y = normalize(x, _feature_view(new_mean, x.ndim, feature_axes),
                _feature_view(new_var, x.ndim, feature_axes),
                _feature_view(scale, x.ndim, feature_axes),
                _feature_view(bias, x.ndim, feature_axes), epsilon=epsilon, dtype=dtype)
  return y, new_mean, new_var


def channel_norm(x: jax.Array, num_groups: int, *, epsilon: float = 1e-5, dtype: Any = None):
  """Normalizes each example over groups of channels (the last axis) and all other
  non-batch axes, with no affine (group normalization's maths).

  Args:
    x: ``[batch, ..., channels]``.
    num_groups: groups the channels are split into; must divide the channel count.
    epsilon: added to the variance.
    dtype: output dtype (default: ``x``'s).

  Returns:
    The normalized ``x``.

  References:
    Wu & He 2018, arXiv:1803.08494 (GroupNorm); Qiao et al. 2019, arXiv:1903.10520
    (its use as the channel part of BCN).
  """
  c = x.shape[-1]
  if num_groups < 1 or c % num_groups:
    raise ValueError(f"num_groups={num_groups} must be a positive divisor of the {c} channels")
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups)).astype(_stats_dtype(x))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = xg.mean(axes, keepdims=True)
  var = jnp.square(xg - mean).mean(axes, keepdims=True)
  return normalize(xg, mean, var, epsilon=epsilon, dtype=dtype or x.dtype).reshape(x.shape)


def group_affine(x: jax.Array, scale: jax.Array, bias: jax.Array, dtype: Any = None):
  """``x * scale + bias`` with one ``scale``/``bias`` entry per group of consecutive
  channels (the last axis; ``len(scale)`` groups), as Batch-Channel Norm's channel part
  applies them; output in ``dtype`` (default: ``x``'s)."""
  per_channel = lambda p: jnp.repeat(p, x.shape[-1] // p.shape[0])
  return (x * per_channel(scale) + per_channel(bias)).astype(dtype or x.dtype)


def standardize_weight(w: jax.Array, *, fan_in_axes: Axes | None = None,
                       epsilon: float | None = None, scaled: bool = False):
  """Weight Standardization: each output unit's weights get zero mean and unit variance
  over their fan-in.

  ``scaled=False`` (Qiao et al.): ``W' = (W - mean) / sqrt(var + epsilon)``, epsilon 1e-5.
  ``scaled=True`` (NF-ResNets' scaled WS): ``W' = (W - mean) / sqrt(max(N * var,
  epsilon))`` with ``N`` the fan-in, epsilon 1e-4, so that ``W'`` preserves the variance
  of unit-variance inputs; multiply by a learnable gain outside.

  Args:
    w: a kernel, fan-in axes first and output units last (flax's layout).
    fan_in_axes: axes to standardize over (default: all but the last).
    epsilon: see above (default 1e-5, or 1e-4 when ``scaled``).
    scaled: NF-ResNet scaling by ``1/sqrt(N)``.

  Returns:
    The standardized kernel, in ``w``'s dtype.

  References:
    Qiao et al. 2019, arXiv:1903.10520, eq. 5 (WS; the authors' code divides by the
    unbiased std plus 1e-5 instead, a relative difference of about 1/(2N));
    Brock et al. 2021, arXiv:2101.08692, section 4 (scaled WS).
  """
  axes = tuple(range(w.ndim - 1)) if fan_in_axes is None else _axes(w.ndim, fan_in_axes)
  wf = w.astype(_stats_dtype(w))
  mean = wf.mean(axes, keepdims=True)
  var = jnp.square(wf - mean).mean(axes, keepdims=True)
  if scaled:
    n = math.prod(w.shape[a] for a in axes)
    out = (wf - mean) * jax.lax.rsqrt(jnp.maximum(var * n, 1e-4 if epsilon is None
                                                  else epsilon))
  else:
    out = (wf - mean) * jax.lax.rsqrt(var + (1e-5 if epsilon is None else epsilon))
  return out.astype(w.dtype)


def _pairs(value, n: int, name: str) -> tuple:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name}={value} must have {n} entries, one per spatial dimension")
  return value


def batched_conv_input(x: jax.Array, nd: int, feature_group_count: int = 1):
  """``(x with a batch axis, whether one was added)`` for an ``nd``-D convolution; checks
  the rank and that ``feature_group_count`` divides the input channels."""
  unbatched = x.ndim == nd + 1
  if unbatched:
    x = x[None]
  if x.ndim != nd + 2:
    raise ValueError(f"a {nd}D convolution takes inputs of rank {nd + 1} or {nd + 2}, got "
                     f"shape {x.shape}")
  if x.shape[-1] % feature_group_count:
    raise ValueError(f"feature_group_count={feature_group_count} does not divide the "
                     f"{x.shape[-1]} input channels")
  return x, unbatched


def conv(x: jax.Array, kernel: jax.Array, *, strides: Any = 1, padding: Any = "SAME",
         input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: int = 1,
         dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None):
  """A channels-last convolution of a batched ``x`` with ``kernel`` (``spatial + (in /
  groups, out)``), as ``flax.linen.Conv`` computes it: ``padding`` is ``'SAME'``,
  ``'VALID'``, an int, or one int or ``(low, high)`` pair per spatial dimension; the
  compute dtype is ``dtype`` or the promotion of ``x``'s and ``param_dtype``."""
  nd = kernel.ndim - 2
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding={padding!r} is not one of 'SAME', 'VALID', an int or pairs")
  else:
    padding = [(p, p) if isinstance(p, int) else tuple(p)
               for p in _pairs(padding, nd, "padding")]
  dtype = dtype or jnp.result_type(x.dtype, param_dtype)
  spec = (0, nd + 1) + tuple(range(1, nd + 1))
  dn = jax.lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                    out_spec=spec)
  return jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), _pairs(strides, nd, "strides"), padding,
      lhs_dilation=_pairs(input_dilation, nd, "input_dilation"),
      rhs_dilation=_pairs(kernel_dilation, nd, "kernel_dilation"),
      dimension_numbers=dn, feature_group_count=feature_group_count, precision=precision)
