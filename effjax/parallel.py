"""Data parallelism: one per-replica step function, run under ``shard_map`` or ``pmap``.

Per-replica functions reduce over the named axis ``DATA_AXIS`` with ``lax.pmean``/``psum``.
``Runner`` compiles them for either launch path and moves states and batches to devices
as global ``jax.Array``s built from per-process data, so the same code runs on one CPU,
one host with 8 devices, or many hosts.
"""

import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The mesh axes that hold different examples. ``fsdp`` also splits the state
# (``effjax.fsdp``); where it is not bound (``pmap``, a user's 1-D mesh) collectives over
# ``BATCH_AXES`` reduce over ``DATA_AXIS`` alone (``bound_axes``).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
PARALLEL_MODES = ("shard_map", "pmap")
# Set to 1 to check every compiled function's outputs for equality across replicas
# (``Runner.compile``); the tests run with it on.
CHECK_REPLICATED_ENV = "EFFJAX_CHECK_REPLICATED"


class ReplicationError(AssertionError):
  """A per-replica function returned an output that differs across replicas."""


def bound_axes(axis_name: Any) -> Any:
  """``axis_name`` without ``FSDP_AXIS`` where that axis is not bound in the current
  trace (``pmap``, a 1-D mesh): so a model or step written for ``BATCH_AXES`` runs under
  every launcher. Other names are left as they are."""
  if not isinstance(axis_name, tuple) or FSDP_AXIS not in axis_name:
    return axis_name
  try:
    jax.lax.axis_size(FSDP_AXIS)
    return axis_name
  except NameError:
    rest = tuple(a for a in axis_name if a != FSDP_AXIS)
    return rest[0] if len(rest) == 1 else rest


def batch_axes() -> Any:
  """The bound axes that split the batch, inside a per-replica function: ``('data',
  'fsdp')`` on effjax's mesh, ``'data'`` under ``pmap`` or on a 1-D mesh."""
  return bound_axes(BATCH_AXES)


def _key_data(x) -> Any:
  """A typed PRNG key array's raw data (its bits); any other array as it is."""
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _bits(x) -> jax.Array:
  """``x``'s bits as a flat uint32 vector (64-bit values as pairs of words)."""
  x = _key_data(jnp.asarray(x))
  if x.dtype.itemsize in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  unsigned = {2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _raveled_per_dtype(leaves: list, indices) -> list[tuple[list[int], jax.Array]]:
  """The leaves at ``indices`` grouped by dtype (in order of first appearance), each group
  raveled and concatenated into one vector: ``[(its indices, its vector)]``."""
  groups: dict = {}
  for i in indices:
    groups.setdefault(jnp.dtype(leaves[i].dtype), []).append(i)
  return [(idx, jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]))
          for idx in groups.values()]


def _ring_equal(leaves: list, axis_name: Any) -> tuple[jax.Array, list[tuple[int, int]]]:
  """Whether each element of all ``leaves`` equals the previous replica's copy, as one
  flat bool vector (one ``ppermute`` of all bits), and each leaf's (start, length) in it.

  The leaves are concatenated per dtype and each dtype's vector is read as bits once:
  read as bits leaf by leaf, XLA:CPU gave every leaf a copying kernel of its own (73 in
  the test LM's step, a fifth of its compile)."""
  leaves = [_key_data(jnp.asarray(x)) for x in leaves]
  parts, spans, start = [], [(0, 0)] * len(leaves), 0
  for idx, vec in _raveled_per_dtype(leaves, range(len(leaves))):
    bits = _bits(vec)
    words = bits.size // max(1, sum(leaves[i].size for i in idx))  # 2 for 64-bit values.
    for i in idx:
      spans[i] = (start, leaves[i].size * words)
      start += spans[i][1]
    parts.append(bits)
  flat = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  n = jax.lax.axis_size(axis_name)
  shifted = jax.lax.ppermute(flat, axis_name, [(i, (i + 1) % n) for i in range(n)])
  return flat == shifted, spans


def replication_flags(tree: Any, axis_name: Any = None) -> jax.Array:
  """One bool per leaf of ``tree``: whether it is bitwise identical on every replica of
  ``axis_name`` (NaNs included). Call inside the per-replica function.

  All leaves' bits, flattened into one buffer, go once around the ring (one
  ``ppermute``): each replica compares its copy with the previous replica's, and all are
  equal iff every neighbouring pair is. One ``pmin`` then makes the flags the same on
  all replicas. Two collectives in all, whatever the number of leaves: a collective per
  leaf made the checked CNN step 2.3x the unchecked one on 8 CPU devices."""
  axis_name = batch_axes() if axis_name is None else axis_name
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((0,), bool)
  equal, spans = _ring_equal(leaves, axis_name)
  flags = jnp.stack([jnp.all(equal[a:a + n]) for a, n in spans])
  return jax.lax.pmin(flags.astype(jnp.int32), axis_name) > 0


def replicas_agree(tree: Any, axis_name: Any = None) -> jax.Array:
  """``jnp.all(replication_flags(tree, axis_name))``, without the per-leaf flags: one
  reduction instead of one per leaf, which in a train step's program is about 3 fused
  kernels for each output leaf (0.44 s of the test LM step's 2.35 s compile)."""
  axis_name = batch_axes() if axis_name is None else axis_name
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((), bool)
  equal, _ = _ring_equal(leaves, axis_name)
  return jax.lax.pmin(jnp.all(equal).astype(jnp.int32), axis_name) > 0


def _split_state_agrees(state: Any, specs: Any) -> jax.Array:
  """``replicas_agree`` of a state whose leaves with an ``fsdp`` spec differ across the
  ``fsdp`` axis by design: those are checked over ``DATA_AXIS`` only."""
  leaves, spec_leaves = jax.tree.leaves(state), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P))
  split = [any(a == FSDP_AXIS for a in s) for s in spec_leaves]
  return (replicas_agree([x for x, k in zip(leaves, split) if k], DATA_AXIS) &
          replicas_agree([x for x, k in zip(leaves, split) if not k]))


def differing_outputs(tree: Any, stacked: bool = False) -> list[str]:
  """The paths of ``tree``'s leaves whose copies on this process's devices differ
  bitwise: shards holding the same part of an array (``shard.index``), or with
  ``stacked`` (``pmap`` outputs) the rows of the leading device axis."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    copies = {}
    for shard in x.addressable_shards:
      part = "row" if stacked else repr(shard.index)
      copies.setdefault(part, []).append(np.asarray(_key_data(shard.data)).tobytes())
    if any(len(set(c)) > 1 for c in copies.values()):
      bad.append(jax.tree_util.keystr(path))
  return bad


class _CheckedFn:
  """A compiled per-replica function whose outputs are checked for equality across
  replicas after every call (a debug mode: it waits for each call's result).

  With ``check_vma=False`` nothing stops a per-replica function from returning a value
  it forgot to reduce; ``out_specs=P()`` then silently returns device 0's copy. The
  program returns one flag (``replicas_agree``); only when it is false are the outputs'
  per-device copies compared on the host, to name the ones that differ."""

  def __init__(self, compiled: Callable, stacked: bool):
    self._compiled, self._stacked = compiled, stacked

  def lower(self, *args, **kwargs):
    return self._compiled.lower(*args, **kwargs)

  def __call__(self, *args):
    out, agree = self._compiled(*args)
    if not np.asarray(agree.addressable_shards[0].data).all():
      bad = differing_outputs(out, self._stacked) or ["(only across processes)"]
      raise ReplicationError(f"outputs differ across replicas (not reduced over "
                             f"{DATA_AXIS!r}?): {', '.join(bad[:5])}")
    return out
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def with_cpu_device_count(xla_flags: str, devices: int) -> str:
  """``xla_flags`` (an ``XLA_FLAGS`` value) asking for ``devices`` simulated CPU devices:
  any device count in it is replaced, every other flag kept.

  Args:
    xla_flags: the flags, e.g. ``os.environ.get("XLA_FLAGS", "")``.
    devices: the number of CPU devices.

  Returns:
    The new ``XLA_FLAGS`` value.
  """
  rest = _DEVICE_COUNT_FLAG.sub("", xla_flags).split()
  return " ".join(rest + [f"--xla_force_host_platform_device_count={devices}"])


def size_cpu_thread_pool() -> None:
  """Gives XLA:CPU more pool threads than simulated devices (sets ``NPROC`` if unset).

  With ``--xla_force_host_platform_device_count=N``, XLA:CPU runs the N device programs on
  one pool of max(cores, N) threads. A device that reaches an all-reduce blocks its
  thread until all N arrive; with N blocked threads, work still queued for the last
  device never runs, and under CPU contention the process aborts after 40 s ("only 7 of
  8 arrived"). 2N threads remove the deadlock. Only the CPU backend reads ``NPROC``, and
  only when it starts, so this must run before the first JAX computation; effjax calls
  it on import.
  """
  match = _DEVICE_COUNT_FLAG.search(os.environ.get("XLA_FLAGS", ""))
  if match and "NPROC" not in os.environ:
    os.environ["NPROC"] = str(max(2 * int(match.group(1)), os.cpu_count() or 1))


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """The ``(data, fsdp)`` ``Mesh`` over all devices, grouped by process: ``fsdp``
  consecutive devices form one group that splits the state (``effjax.fsdp``); all of
  them hold different examples. ``fsdp=1`` is plain data parallelism.

  Grouping by process keeps each process's rows of a global batch contiguous (the batch
  is split over both axes, in device order), which the input pipeline relies on.

  Raises:
    ValueError: ``fsdp`` does not divide the number of devices.
  """
  devices = devices if devices is not None else jax.devices()
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp!r} must be a positive divisor of the "
                     f"{len(devices)} devices")
  return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


# The TrainState fields that FSDP splits (``effjax.fsdp``'s rule); all else is replicated.
SHARDED_FIELDS = ("params", "ema_params", "opt_state")


class Runner:
  """Compiles per-replica functions and places data for one parallel mode.

  Attributes:
    mode: ``'shard_map'`` (jit over a Mesh) or ``'pmap'``.
    mesh: the ``(data, fsdp)`` mesh (or a user's 1-D ``data`` mesh).
    fsdp: devices that split the parameters and optimizer state (1: all replicated).
    num_devices, num_local_devices: over all processes / this process.
  """

  def __init__(self, mode: str = "shard_map", mesh: Mesh | None = None,
               fsdp_min_size: int = 1024):
    if mode not in PARALLEL_MODES:
      raise ValueError(f"parallel={mode!r} is not one of {PARALLEL_MODES}")
    self.mode = mode
    self.mesh = mesh if mesh is not None else make_mesh()
    self.fsdp = int(dict(self.mesh.shape).get(FSDP_AXIS, 1))
    if mode == "pmap" and self.fsdp > 1:
      raise ValueError(f"parallel='pmap' has one axis; mesh.fsdp={self.fsdp} needs "
                       "parallel='shard_map'")
    self.fsdp_min_size = fsdp_min_size
    self.num_devices = self.mesh.devices.size
    self.num_local_devices = sum(d.process_index == jax.process_index()
                                 for d in self.mesh.devices.flat)
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
    self.batch_spec = P(axes if len(axes) > 1 else axes[0])
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, self.batch_spec)
    self._concat: dict[int, Callable] = {}

  @classmethod
  def from_config(cls, config) -> "Runner":
    """The runner of ``config.parallel`` on a ``(data, config.mesh.fsdp)`` mesh."""
    return cls(config.parallel, make_mesh(fsdp=int(config.mesh.fsdp)),
               fsdp_min_size=int(config.mesh.fsdp_min_size))

  def _split(self, state: Any) -> bool:
    return self.fsdp > 1 and all(hasattr(state, f) for f in SHARDED_FIELDS + ("replace",))

  def _field_specs(self, name: str, tree: Any) -> Any:
    """The ``PartitionSpec`` of each array of the state field ``name``."""
    from effjax import fsdp as fsdp_lib  # pylint: disable=g-import-not-at-top
    if self.fsdp > 1 and name in SHARDED_FIELDS:
      return fsdp_lib.partition_specs(tree, self.fsdp, self.fsdp_min_size)
    return jax.tree.map(lambda _: P(), tree)

  def state_specs(self, state: Any) -> Any:
    """The ``PartitionSpec``s of a state with global shapes: ``effjax.fsdp``'s rule for
    the parameters, their EMA and the optimizer state; ``P()`` (replicated) for the rest
    and for any state when ``fsdp == 1``."""
    if not self._split(state):
      return P()
    return jax.tree.map(lambda _: P(), state).replace(
        **{f: self._field_specs(f, getattr(state, f)) for f in SHARDED_FIELDS})

  def with_fsdp_dims(self, state: Any) -> Any:
    """``state`` with ``fsdp_dims`` (the static split dimension of each parameter) set
    for this mesh; unchanged for other states."""
    from effjax import fsdp as fsdp_lib  # pylint: disable=g-import-not-at-top
    if not hasattr(state, "fsdp_dims"):
      return state
    dims = fsdp_lib.leaf_dims(state.params, self.fsdp, self.fsdp_min_size) if \
        self._split(state) else ()
    return state if state.fsdp_dims == dims else state.replace(fsdp_dims=dims)

  def state_shardings(self, items: dict) -> dict:
    """The ``NamedSharding`` of each array of a state's ``items()`` (checkpoint restore
    targets on this mesh)."""
    named = lambda s: NamedSharding(self.mesh, s)
    return {k: jax.tree.map(named, self._field_specs(k, v),
                            is_leaf=lambda x: isinstance(x, P))
            for k, v in items.items()}

  def place_state(self, state: Any) -> Any:
    """A host (or device) ``TrainState`` -> on the devices: split per ``state_specs``
    (FSDP) or replicated, with ``fsdp_dims`` set."""
    if not self._split(state):
      return self.with_fsdp_dims(state.replace(**self.replicate(state.items())))
    def put(x, s):
      if isinstance(x, jax.Array) and x.sharding == s:
        return x  # Already in place (a checkpoint restored onto this mesh).
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    items = state.items()
    return self.with_fsdp_dims(state.replace(**jax.tree.map(put, items,
                                                            self.state_shardings(items))))

  def compile(self, fn: Callable, donate_state: bool = True,
              check_replicated: Optional[bool] = None) -> Callable:
    """Compiles ``fn(state, batch) -> outputs`` to run once per replica.

    The state is replicated (or, on a mesh with ``fsdp > 1``, split per
    ``state_specs``), the batch split along its leading axis over all devices, and every
    output must be identical across replicas (reduce it over the batch axes). A donated
    state is returned first, laid out as it came in: ``fn(state, batch) -> (state,
    rest)``.

    Args:
      fn: the per-replica function.
      donate_state: donate the state's buffers to the outputs.
      check_replicated: after every call, check that each output is identical on all
        replicas (split state leaves: on all replicas of ``data``) and raise
        ``ReplicationError`` naming those that are not (one extra ``ppermute`` and
        ``pmin`` and a wait per call: for tests and debugging). Default: on when the environment sets
        ``EFFJAX_CHECK_REPLICATED=1`` and there is more than one device (on one there
        is nothing to compare, and the wait per call would serialize the loop).
    """
    if check_replicated is None:
      check_replicated = (os.environ.get(CHECK_REPLICATED_ENV, "0") == "1"
                          and self.num_devices > 1)
    if self.mode == "pmap":
      if check_replicated:
        inner = fn
        fn = lambda *args: (lambda out: (out, replicas_agree(out)))(inner(*args))
      donate = (0,) if donate_state else ()
      compiled = jax.pmap(fn, axis_name=DATA_AXIS, donate_argnums=donate)
    else:
      compiled = self._compile_shard_map(fn, donate_state, check_replicated)
    return _CheckedFn(compiled, self.mode == "pmap") if check_replicated else compiled

  def _compile_shard_map(self, fn: Callable, donate_state: bool, check: bool) -> Callable:
    # check_vma=False: with it on, shard_map's autodiff sums gradients of replicated
    # inputs over the axis by itself, and the explicit pmean that pmap needs would then
    # scale them. Off, one per-replica function means the same thing under both paths.
    def run(state, batch):
      state = self.with_fsdp_dims(state)
      specs = self.state_specs(state)
      split = donate_state and self._split(state)
      out_specs = (specs, P()) if split else P()

      def per_replica(s, b):
        out = fn(s, b)
        if not check:
          return out
        if split:
          return out, _split_state_agrees(out[0], specs) & replicas_agree(out[1:])
        return out, replicas_agree(out)
      return jax.shard_map(per_replica, mesh=self.mesh, in_specs=(specs, self.batch_spec),
                           out_specs=(out_specs, P()) if check else out_specs,
                           check_vma=False)(state, batch)
    return jax.jit(run, donate_argnums=(0,) if donate_state else ())

  def compile_rows(self, fn: Callable) -> Callable:
    """Compiles ``fn(state, batch) -> per-row outputs`` to run once per replica; the
    outputs stay split over the devices like the batch (read them with
    ``rows_to_host``)."""
    if self.mode == "pmap":
      return jax.pmap(fn, axis_name=DATA_AXIS)

    def run(state, batch):
      state = self.with_fsdp_dims(state)
      return jax.shard_map(fn, mesh=self.mesh, in_specs=(self.state_specs(state),
                                                         self.batch_spec),
                           out_specs=self.batch_spec, check_vma=False)(state, batch)
    return jax.jit(run)

  def rows_to_host(self, tree: Any) -> Any:
    """Outputs of ``compile_rows`` -> numpy, all processes' rows in global order."""
    def get(x):
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        x = multihost_utils.process_allgather(x, tiled=True)
      x = np.asarray(x)
      return x.reshape((-1,) + x.shape[2:]) if self.mode == "pmap" else x
    return jax.tree.map(get, tree)

  def replicate(self, tree: Any) -> Any:
    """Host or device values (identical on all processes) -> replicated device state."""
    def put(x):
      x = np.asarray(x)
      if self.mode == "pmap":
        shape = (self.num_devices,) + x.shape
        return jax.make_array_from_callback(
            shape, self.sharded, lambda idx: np.broadcast_to(x, shape)[idx])
      return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])
    return jax.tree.map(put, jax.device_get(tree))

  def unreplicate(self, tree: Any) -> Any:
    """Device state -> one copy, as replicated global arrays (what checkpoints hold)."""
    if self.mode == "pmap":
      return jax.jit(lambda t: jax.tree.map(lambda x: x[0], t),
                     out_shardings=self.replicated)(tree)
    return tree

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays split over the devices."""
    def put(x):
      x = np.asarray(x)
      if x.shape[0] % self.num_local_devices:
        raise ValueError(f"per-process batch of {x.shape[0]} is not divisible by the "
                         f"{self.num_local_devices} local devices")
      if self.mode == "pmap":
        per = x.shape[0] // self.num_local_devices
        x = x.reshape((self.num_local_devices, per) + x.shape[1:])
        return jax.make_array_from_process_local_data(
            self.sharded, x, (self.num_devices, per) + x.shape[2:])
      return jax.make_array_from_process_local_data(self.sharded, x)
    return jax.tree.map(put, local_batch)

  def concat_batches(self, batches: list) -> Any:
    """Device batches -> one, each device's rows of all of them together, on the device
    (no rows move between devices). Compiled once per number of batches."""
    k = len(batches)
    if k == 1:
      return batches[0]
    if k not in self._concat:
      cat = lambda *bs: jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *bs)
      if self.mode == "pmap":
        self._concat[k] = jax.pmap(cat, axis_name=DATA_AXIS)
      else:
        self._concat[k] = jax.jit(jax.shard_map(cat, mesh=self.mesh,
                                                in_specs=(self.batch_spec,) * k,
                                                out_specs=self.batch_spec, check_vma=False))
    return self._concat[k](*batches)

  def to_host(self, tree: Any) -> Any:
    """Replica-identical outputs (metrics) -> numpy, one copy."""
    def get(x):
      if self.mode == "pmap":
        return np.asarray(x.addressable_shards[0].data)[0]
      return np.asarray(x.addressable_shards[0].data)
    return jax.tree.map(get, tree)


def group_psum(tree: Any, axis_name: Any, group_size: int | None = None) -> Any:
  """Sums each leaf over groups of ``group_size`` consecutive replicas on ``axis_name``.

  Replica ``i`` belongs to group ``i // group_size``. This is what ``lax.psum`` with
  ``axis_index_groups`` would compute, but built from collectives that work under
  ``shard_map`` as well as ``pmap`` (grouped ``psum`` raises NotImplementedError under
  ``shard_map``):

  - a power-of-two ``group_size`` uses a butterfly of ``log2(group_size)`` ``ppermute``
    exchanges, ``x + partner(x)``. Float addition is commutative, so every member of a
    group gets bitwise the same sum, and each replica moves ``log2(g)`` copies of the
    leaf, whatever the axis size;
  - any other ``group_size`` psums a ``[num_groups, ...]`` array that holds the leaf in
    its group's row, then reads its own row (exact, ``num_groups`` times the traffic).

  Args:
    tree: a pytree of arrays, this replica's values.
    axis_name: the named data axis (a ``shard_map`` mesh axis or ``pmap`` axis name).
    group_size: replicas per group; ``None`` or the axis size means the whole axis (a
      plain ``psum``) and 1 means no reduction. It must divide the axis size.

  Returns:
    The tree of group sums, identical on every replica of a group.

  Raises:
    ValueError: if ``group_size`` does not divide the axis size.
  """
  axis_name = bound_axes(axis_name)
  n = jax.lax.axis_size(axis_name)
  if group_size is None or group_size == n:
    return jax.lax.psum(tree, axis_name)
  if not isinstance(group_size, int) or group_size < 1 or n % group_size:
    raise ValueError(f"group_size={group_size!r} must be a positive divisor of the {n} "
                     f"replicas on axis {axis_name!r}")
  if group_size == 1:
    return tree
  if group_size & (group_size - 1) == 0:
    k = 1
    while k < group_size:
      perm = [(i, i ^ k) for i in range(n)]
      tree = jax.tree.map(lambda x, p=perm: x + jax.lax.ppermute(x, axis_name, p), tree)
      k *= 2
    return tree
  num_groups = n // group_size
  group = jax.lax.axis_index(axis_name) // group_size

  def reduce(x):
    rows = jax.nn.one_hot(group, num_groups, dtype=x.dtype).reshape((num_groups,) +
                                                                     (1,) * x.ndim)
    return jax.lax.psum(rows * x[None], axis_name)[group]
  return jax.tree.map(reduce, tree)


# Leaves with at most this many elements travel packed into one vector (``packed_psum``)
# on GPU and TPU, and are reduced as one vector by ``global_sq_norm``.
PACK_MAX_SIZE = 4096
# On XLA:CPU, ``packed_psum`` packs leaves up to this size (``pack_max_size``).
CPU_PACK_MAX_SIZE = 1 << 18


def pack_max_size() -> int:
  """``packed_psum``'s default ``max_size`` on the default backend.

  On XLA:CPU, ``CPU_PACK_MAX_SIZE`` (2^18 elements, 1 MiB of float32): each operand of
  an all-reduce is a meeting of all the device threads, which costs more than copying a
  leaf of up to about that size into the packed vector; ResNet-18's few larger kernels
  cost more copied than met for (BENCHMARKS.md, eleventh pass). Elsewhere
  ``PACK_MAX_SIZE``: XLA's all-reduce combiner merges operands itself, so a large leaf
  would only be copied."""
  return CPU_PACK_MAX_SIZE if jax.default_backend() == "cpu" else PACK_MAX_SIZE


def packed_psum(tree: Any, axis_name: Any, max_size: int | None = None) -> Any:
  """``lax.psum(tree, axis_name)``, with the small leaves (at most ``max_size``
  elements) raveled into one vector per dtype, summed as one operand, and split again.

  Given the same operands, the sums are elementwise the same as ``psum``'s, bit for bit:
  packing changes which operand an element travels in, not what is added to it. (In a
  larger program XLA may fuse the operands' producers differently around the
  concatenation, which can move their last bits.) It changes how many operands
  the all-reduce has. XLA:CPU meets the replicas once per operand, so a step's scalars
  (loss, weight, metrics) and BN statistics, each its own operand, cost a rendezvous
  each (``BENCHMARKS.md``, sixth pass); on GPU and TPU, XLA's all-reduce combiner merges
  small operands itself and the packing costs a copy of a few kB. There, large leaves are
  left as they are: concatenating them would copy them for nothing.

  Args:
    tree: a pytree of arrays, this replica's values.
    axis_name: the named axis or axes to sum over.
    max_size: the largest leaf (in elements) that is packed; ``None``:
      ``pack_max_size()`` (2^18 on CPU, ``PACK_MAX_SIZE`` elsewhere).

  Returns:
    The tree of sums over ``axis_name``, identical on every replica.
  """
  max_size = pack_max_size() if max_size is None else max_size
  leaves, treedef = jax.tree.flatten(tree)
  big = [i for i, x in enumerate(leaves) if x.size > max_size]
  groups = _raveled_per_dtype(leaves, [i for i, x in enumerate(leaves) if x.size <= max_size])
  summed_packed, summed_big = jax.lax.psum(([vec for _, vec in groups],
                                            [leaves[i] for i in big]), axis_name)
  out = list(leaves)
  for i, x in zip(big, summed_big):
    out[i] = x
  for (idx, _), vec in zip(groups, summed_packed):
    offset = 0
    for i in idx:
      n = leaves[i].size
      out[i] = vec[offset:offset + n].reshape(leaves[i].shape)
      offset += n
  return jax.tree.unflatten(treedef, out)


def packed_pmean(tree: Any, axis_name: Any, max_size: int | None = None) -> Any:
  """``lax.pmean`` as ``packed_psum`` divided by the axis size."""
  n = jax.lax.axis_size(axis_name)
  return jax.tree.map(lambda x: x / n, packed_psum(tree, axis_name, max_size))


def global_sq_norm(tree: Any, max_size: int = PACK_MAX_SIZE) -> jax.Array:
  """The squared l2 norm of all leaves together, accumulated in float32 (0 for none).

  The leaves of at most ``max_size`` elements are raveled into one float32 vector and
  reduced once; larger leaves are reduced one by one. XLA:CPU runs each reduction as a
  kernel of its own, so a tree of many biases and scales costs one kernel, not one per
  leaf (the noise scale's small-batch norm in ``steps``, ``clip_by_global_norm``).

  Args:
    tree: a pytree of arrays.
    max_size: the largest leaf (in elements) that is packed.

  Returns:
    A float32 scalar.
  """
  leaves = jax.tree.leaves(tree)
  small = [jnp.ravel(x).astype(jnp.float32) for x in leaves if x.size <= max_size]
  parts = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves if x.size > max_size]
  if small:
    parts.append(jnp.sum(jnp.square(jnp.concatenate(small))))
  return sum(parts, jnp.zeros((), jnp.float32))


def global_norm(tree: Any) -> jax.Array:
  """The l2 norm of all leaves together, accumulated in float32."""
  return jnp.sqrt(global_sq_norm(tree))
