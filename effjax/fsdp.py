"""FSDP: parameters, their EMA and the optimizer state sharded over the ``fsdp`` mesh axis.

The mesh is ``(data, fsdp)``; every device holds different examples (the batch is split
over both axes), and the ``fsdp`` axis also splits the state. The rule, one for every
array of the state: a leaf with at least ``min_size`` elements is split along its
largest dimension that ``k`` divides (the first such among equal ones; a stacked layer
axis, under a module named ``layers``, never: each layer keeps its own trust ratio);
any other leaf (biases, norm scales, counters, trust ratios) is replicated. The rule
reads only a leaf's path and global shape, so the parameters, their EMA and each
optimizer moment (whose paths end in the parameter's) are split alike.

Inside the per-replica step, ``gather`` all-gathers the parameters over ``fsdp`` for
the forward pass; differentiated with respect to the shards, its transpose
reduce-scatters the gradients, so each device keeps the summed gradient of its own
shard. Norms over sharded leaves psum their squares over ``fsdp``
(``sq_norm``; ``effjax.optim`` takes ``axis_name`` and ``sharded``).

References:
  Rajbhandari et al. 2019, arXiv:1910.02054 (ZeRO); Xu et al. 2020, arXiv:2004.13336
  (automatic cross-replica sharding of weight update).
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effjax.parallel import DATA_AXIS, FSDP_AXIS, batch_axes, global_sq_norm

REPLICATED = -1
STACKED_NAME = "layers"  # effjax.models.STACKED_NAME (nn.scan of DecoderLM).
DEFAULT_MIN_SIZE = 1024
# split_dots: leaves with fewer elements per device are sliced as one concatenation.
SPLIT_MIN_PART = 4096


def _stacked(path) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == STACKED_NAME for k in path)


def shard_dim(shape: tuple[int, ...], k: int, min_size: int = DEFAULT_MIN_SIZE,
              stacked: bool = False) -> int:
  """The dimension a leaf of global ``shape`` is split along over ``k`` devices, or
  ``REPLICATED`` (-1).

  Args:
    shape: the leaf's global shape.
    k: the ``fsdp`` axis size.
    min_size: leaves with fewer elements stay replicated.
    stacked: the leading axis stacks layers; it is never split.

  Returns:
    The largest dimension divisible by ``k`` (the first among equal sizes), or -1.
  """
  if k <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return REPLICATED
  best = REPLICATED
  for d in range(1 if stacked else 0, len(shape)):
    if shape[d] % k == 0 and (best == REPLICATED or shape[d] > shape[best]):
      best = d
  return best


def shard_dims(tree: Any, k: int, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """``shard_dim`` of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s with
  global shapes), as a tree of ints."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: shard_dim(tuple(jnp.shape(x)), k, min_size, _stacked(path)), tree)


def partition_spec(dim: int) -> jax.sharding.PartitionSpec:
  """The ``PartitionSpec`` of a leaf split along ``dim`` (-1: replicated)."""
  if dim == REPLICATED:
    return jax.sharding.PartitionSpec()
  return jax.sharding.PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def partition_specs(tree: Any, k: int, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """The ``PartitionSpec`` of every leaf of ``tree`` under the rule."""
  return jax.tree.map(partition_spec, shard_dims(tree, k, min_size))


def sharded_mask(params: Any, k: int, min_size: int = DEFAULT_MIN_SIZE) -> Callable:
  """A function of a parameter tree (full or masked by ``optax.masked``, global or
  per-device shapes) giving ``True`` for the leaves split over ``fsdp``, decided once
  from ``params``' global shapes: the ``sharded`` argument of ``effjax.optim``'s
  transforms."""
  paths = {jax.tree_util.keystr(p) for p, d in
           jax.tree_util.tree_flatten_with_path(shard_dims(params, k, min_size))[0]
           if d != REPLICATED}
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path) in paths, tree)


def gather(params: Any, dims: tuple[int, ...]) -> Any:
  """The full parameters from this device's shards (inside the per-replica step):
  ``all_gather`` over ``fsdp`` of each leaf whose entry of ``dims`` (one per leaf, in
  ``jax.tree.leaves`` order) is a dimension. Its transpose reduce-scatters the
  gradient. ``dims=()`` means nothing is sharded."""
  if not dims:
    return params
  leaves, treedef = jax.tree.flatten(params)
  full = [x if d == REPLICATED else jax.lax.all_gather(x, FSDP_AXIS, axis=d, tiled=True)
          for x, d in zip(leaves, dims)]
  return jax.tree.unflatten(treedef, full)


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))


def _part_dot(xs: list, ys: list, index: jax.Array, parts: int) -> jax.Array:
  """Device ``index``'s ``1/parts`` of the inner product of two lists of leaves, in
  float32: a slice of each leaf with at least ``SPLIT_MIN_PART`` elements per device
  (its tail, if ``parts`` does not divide it, on device 0), and of the small leaves a
  slice of their concatenation (zero-padded to a multiple of ``parts``).

  XLA:CPU runs every reduction as its own kernel, so a slice per small leaf (biases,
  norm scales) would cost a kernel each; a concatenation of the large ones would copy
  them whole, since the slice does not fuse into it.
  """
  if parts == 1:
    return sum((_dot(x, y) for x, y in zip(xs, ys)), jnp.zeros((), jnp.float32))
  total = jnp.zeros((), jnp.float32)
  small_x, small_y = [], []
  for x, y in zip(xs, ys):
    x, y = x.reshape(-1), y.reshape(-1)
    q = x.size // parts
    if q < SPLIT_MIN_PART:
      small_x.append(x.astype(jnp.float32))
      small_y.append(y.astype(jnp.float32))
      continue
    # The slice of the product, not the product of the slices: a slice of ``x`` shared
    # by two pairs (<w, w> and <w, u>) would be stored by XLA (CPU) for its two readers,
    # and held from the first (early: w is an input) to the second (after the update).
    prod = x.astype(jnp.float32) * y.astype(jnp.float32)
    total += jnp.sum(jax.lax.dynamic_slice_in_dim(prod[:q * parts], index * q, q))
    if x.size > q * parts:
      total += jnp.where(index == 0, jnp.sum(prod[q * parts:]), 0.0)
  if small_x:
    size = sum(x.size for x in small_x)
    q = -(-size // parts)
    pad = [jnp.zeros((q * parts - size,), jnp.float32)]
    part = lambda v: jax.lax.dynamic_slice_in_dim(jnp.concatenate(v + pad), index * q, q)
    total += _dot(part(small_x), part(small_y))
  return total


def split_dots(pairs: Sequence[tuple[Any, Any]], dims: tuple[int, ...] = ()) -> jax.Array:
  """The inner product ``<a, b>`` (over all leaves) of each pair of trees that every
  replica holds alike (reduced gradients, updates, parameters), inside the per-replica
  step, with the work split over the replicas and one collective for them all.

  Each device reads its own slice of every leaf (of a replicated leaf, a slice among all
  devices; of an ``fsdp`` shard, among the devices holding that shard), and one ``psum``
  over the batch axes adds the slices of all the pairs. The result is the same on every
  device. ``sq_norm`` has every replica read every element: on 8 devices, 8 times the
  reads for one number.

  Args:
    pairs: ``(a, b)`` trees, each laid out like the parameters (their shards, per
      ``dims``), each the same on every replica of the batch axes.
    dims: ``TrainState.fsdp_dims``: the split dimension of each leaf, ``()`` for none.

  Returns:
    A float32 vector: ``<a, b>`` of each pair over the whole (global) trees, in order.
  """
  parts = _dot_parts(pairs, dims)
  axes = batch_axes()
  return parts if jax.lax.axis_size(axes) == 1 else jax.lax.psum(parts, axes)


def split_sq_norms(trees: Sequence[Any], dims: tuple[int, ...] = ()) -> jax.Array:
  """``split_dots`` of each tree with itself: the squared l2 norms, one ``psum``."""
  return split_dots([(t, t) for t in trees], dims)


def _dot_parts(pairs: Sequence[tuple[Any, Any]], dims: tuple[int, ...]) -> jax.Array:
  """This device's part of each pair's inner product (``split_dots`` before its psum)."""
  axes = batch_axes()
  everyone = (jax.lax.axis_index(axes), jax.lax.axis_size(axes))
  same_shard = (jax.lax.axis_index(DATA_AXIS), jax.lax.axis_size(DATA_AXIS))

  def part(a, b):
    xs, ys = jax.tree.leaves(a), jax.tree.leaves(b)
    dims_ = dims or (REPLICATED,) * len(xs)
    pick = lambda leaves, split: [v for v, d in zip(leaves, dims_) if (d != REPLICATED) == split]
    return (_part_dot(pick(xs, False), pick(ys, False), *everyone)
            + _part_dot(pick(xs, True), pick(ys, True), *same_shard))

  return jnp.stack([part(a, b) for a, b in pairs])


def sq_norm(tree: Any, dims: tuple[int, ...] = ()) -> jax.Array:
  """The squared l2 norm of all leaves of a tree laid out like the parameters (their
  shards, per ``dims``), in float32: the sharded leaves' squares are summed over
  ``fsdp``, the replicated ones counted once. Every device reads all of its leaves; for
  a tree the same on every replica, ``split_sq_norms`` shares the work."""
  if not dims:
    return global_sq_norm(tree)
  leaves = jax.tree.leaves(tree)
  local = global_sq_norm([x for x, d in zip(leaves, dims) if d == REPLICATED])
  split = global_sq_norm([x for x, d in zip(leaves, dims) if d != REPLICATED])
  return local + jax.lax.psum(split, FSDP_AXIS)


def leaf_dims(params: Any, k: int, min_size: int = DEFAULT_MIN_SIZE) -> tuple[int, ...]:
  """``shard_dims`` of ``params`` as a tuple in leaf order (``TrainState.fsdp_dims``);
  ``()`` when nothing is split."""
  dims = tuple(jax.tree.leaves(shard_dims(params, k, min_size)))
  return dims if any(d != REPLICATED for d in dims) else ()


def bytes_per_device(tree: Any) -> int:
  """Bytes that one device holds of ``tree``'s arrays, from their own shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total
