"""Orbax checkpoints of the train state and the input pipeline's position, verified.

Each step directory ``checkpoints/<step>`` holds two orbax items: ``state`` (the train
state's arrays, tensorstore/OCDBT) and ``data`` (the grain iterator's JSON state). Nothing
is pickled. When orbax has written a save, and before it renames the temporary directory
to the step, process 0 writes ``effjax_manifest.json`` beside the items: the size and CRC32
of every file. A checkpoint is *valid* when its manifest
is present and every file matches it, so a truncated file, a missing metadata file or a
save killed before it finished is detected before anything is loaded.

Old checkpoints are pruned here, not by orbax: only after a newer one has been verified,
so a valid checkpoint is never deleted while the newer ones are invalid. On restore,
invalid checkpoints are reported and moved to ``checkpoints.invalid/`` (never deleted),
and the newest valid one is loaded. With several processes, process 0 verifies and
chooses the step and every process restores that one (``agree``), so a filesystem that
is not strongly consistent cannot make processes load different steps.

All file access goes through ``etils.epath``, as orbax's does, so the directory may be
any path orbax accepts (``gs://...`` included); nothing here is POSIX-only.
"""

import dataclasses
import json
import os
import threading
import zlib
from typing import Any, Callable, Optional, Union

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

PathLike = Union[str, os.PathLike, epath.Path]


def resolve_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: a URL-style path (``gs://b/run``) is kept as it is; a
  local one is made absolute. (``os.path.abspath('gs://b/r')`` would give the local
  ``<cwd>/gs:/b/r``.)"""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))

MANIFEST = "effjax_manifest.json"


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not match the state the config builds."""


@dataclasses.dataclass
class Restored:
  """What ``Checkpointer.restore_latest`` found."""
  step: Optional[int]          # The restored step, or None when no valid checkpoint exists.
  state: Any = None
  data: Optional[dict] = None
  invalid: tuple = ()          # ``(step, problem)`` of the damaged checkpoints skipped.
  mismatched: tuple = ()       # ``(step, what)`` skipped as not matching (check_shapes=False).


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _size(path: epath.Path) -> int:
  return int(path.stat().length)


def _files(directory: PathLike) -> list[str]:
  """The items' files (``state/...``, ``data/...``). Orbax rewrites the step's top-level
  files (``_CHECKPOINT_METADATA``, ``commit_success.txt``) when it commits, after the
  manifest is written, so those are not covered."""
  directory = epath.Path(directory)
  out = []
  for root, _, names in directory.walk():
    root = epath.Path(root)
    if root != directory:
      out += [os.fspath(root.relative_to(directory) / n) for n in names]
  return sorted(out)


def write_manifest(step_dir: PathLike) -> None:
  """Records the size and CRC32 of every file of a finished checkpoint (atomically: a
  temporary file renamed into place)."""
  step_dir = epath.Path(step_dir)
  files = {f: [_size(step_dir / f), _crc32(step_dir / f)] for f in _files(step_dir)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files}), encoding="utf-8")
  tmp.replace(step_dir / MANIFEST)


def verify(step_dir: PathLike, checksums: bool = True) -> Optional[str]:
  """Returns None if ``step_dir`` matches its manifest, else what is wrong (one line)."""
  step_dir = epath.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.exists():
    return "no manifest (the save did not finish)"
  try:
    files = json.loads(path.read_text(encoding="utf-8"))["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable manifest ({type(e).__name__})"
  for name, (size, crc) in sorted(files.items()):
    p = step_dir / name
    if not p.exists():
      return f"file {name} is missing"
    actual = _size(p)
    if actual != size:
      return f"file {name} has {actual} bytes, {size} were written"
    if checksums and _crc32(p) != crc:
      return f"file {name} fails its CRC32 check"
  return None


def _unused(path: epath.Path) -> epath.Path:
  """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist."""
  dest, n = path, 1
  while dest.exists():
    dest, n = path.parent / f"{path.name}.{n}", n + 1
  return dest


def _first_mismatch(saved: Any, expected: Any) -> Optional[str]:
  """Names the first array whose path, shape or dtype differs between two trees."""
  # Orbax's metadata keeps containers as saved (a NamedTuple comes back as a dict or list),
  # so paths are compared by their key names: 'opt_state/1/0/trace/Conv_0/kernel'.
  def name(k):
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in p): x for p, x in leaves}
  a, b = flat(saved), flat(expected)
  # Parameters first (what a user recognises), then the rest (optimizer, BN, EMA) by path.
  rank = lambda k: (not k.startswith("params/"), k)
  for key in sorted(set(a) | set(b), key=rank):
    if key not in a:
      return f"{key} is in the config's state but not in the checkpoint"
    if key not in b:
      return f"{key} is in the checkpoint but not in the config's state"
    sa, sb = tuple(a[key].shape), tuple(b[key].shape)
    if sa != sb:
      return f"{key} has shape {sa} in the checkpoint and {sb} in the config"
    if a[key].dtype is not None and jax.numpy.dtype(a[key].dtype) != jax.numpy.dtype(b[key].dtype):
      return f"{key} has dtype {a[key].dtype} in the checkpoint and {b[key].dtype} in the config"
  return None


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's pytree handler, as ``StandardCheckpointHandler`` builds it (same files), but
  on one process without replica-parallel saving.

  On CPU, orbax splits each replicated array over its replicas so that each writes a
  part. With one process every replica is local: the split writes nothing in parallel,
  and costs a jitted slice per array shape (72 compiles on the first save of the test
  LM) and a dispatch per slice on every save (0.14 s per save of that LM against 0.04 s
  without). Several processes keep orbax's default registry.
  """
  if jax.process_count() > 1:
    return ocp.PyTreeCheckpointHandler()
  # No public path to orbax's array metadata store, which the default jax.Array handler
  # writes (it restores typed PRNG keys as keys); without it they come back as uint32.
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types()]
  handlers.append((jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())))
  return ocp.PyTreeCheckpointHandler(
      type_handler_registry=ocp.type_handlers.create_type_handler_registry(*handlers))


class Checkpointer:
  """Verified orbax checkpoints in ``directory``: items ``state`` and ``data``.

  ``state`` is the train state's data fields (a pytree of arrays); ``data`` is the grain
  iterator's JSON state, so a resumed run reads exactly the batches an uninterrupted run
  would have read. Saves are asynchronous; ``wait``/``close`` block until they are on disk.

  Args:
    directory: where the step directories go: a local path or any path orbax accepts
      (``gs://...``).
    max_to_keep: how many verified checkpoints to keep.
    primary: whether this process verifies, chooses the step to restore, writes
      manifests, prunes and moves damaged checkpoints (process 0 on a shared filesystem).
    sync: called with a name where all processes must meet (multi-host); no-op by default.
    agree: ``agree(value) -> int``, process 0's integer on every process (a collective,
      e.g. ``multihost_utils.broadcast_one_to_all``); identity by default.
  """

  def __init__(self, directory: PathLike, max_to_keep: int = 3,
               primary: Optional[bool] = None, sync: Optional[Callable[[str], None]] = None,
               agree: Optional[Callable[[int], int]] = None):
    self.directory = resolve_path(directory)
    self.max_to_keep = max_to_keep
    self.primary = jax.process_index() == 0 if primary is None else primary
    self._sync = sync or (lambda name: None)
    self._agree = agree or (lambda value: value)
    self._inflight: Optional[int] = None
    self._lock = threading.Lock()
    # Steps whose full CRC check passed, with their manifest's bytes: pruning re-checks a
    # step only when its manifest changed, not every kept checkpoint on every save.
    self._verified: dict[int, bytes] = {}
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalized)),
        item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()})

  # --- listing and validity -------------------------------------------------------------

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Step directories present (finished by orbax or not yet verified), ascending."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def check(self, step: int, checksums: bool = True) -> Optional[str]:
    """None if checkpoint ``step`` is valid, else its problem (see ``verify``)."""
    return verify(self.step_dir(step), checksums)

  def valid_steps(self, checksums: bool = False) -> list[int]:
    return [s for s in self.all_steps() if self.check(s, checksums) is None]

  def latest_step(self) -> Optional[int]:
    """The newest valid step (manifest and sizes checked; CRCs are checked on restore)."""
    steps = self.valid_steps()
    return steps[-1] if steps else None

  # --- saving ---------------------------------------------------------------------------

  def _finalized(self) -> None:
    """Orbax's post-finalization callback (a background thread, after the items are
    written, before the temporary directory is renamed to the step): writes the manifest
    inside it, so it appears with the step in the same atomic rename."""
    with self._lock:
      step, self._inflight = self._inflight, None
    if step is None or not self.primary:
      return
    tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"),
                 key=lambda p: p.stat().mtime)
    try:
      write_manifest(tmp[-1] if tmp else self.step_dir(step))
    except OSError as e:  # Never let bookkeeping kill training; the check will see it.
      logging.error("checkpoint %d: could not write its manifest: %s", step, e)

  def _prune(self) -> None:
    """Deletes checkpoints that have ``max_to_keep`` fully verified (CRC) newer ones.

    Damaged or unfinished checkpoints never count, so an older valid checkpoint survives
    as long as the newer ones are not valid; damaged ones are never deleted here.
    """
    if not self.max_to_keep:
      return
    verified = [s for s in self.all_steps() if self._fully_verified(s)]
    for step in verified[:-self.max_to_keep]:
      doomed = self.directory / f".deleting-{step}"
      self.step_dir(step).rename(doomed)  # A kill mid-delete leaves no half step.
      doomed.rmtree(missing_ok=True)
      self._verified.pop(step, None)

  def _fully_verified(self, step: int) -> bool:
    """``check(step)`` with CRCs, done once per manifest (cached by its bytes)."""
    try:
      manifest = (self.step_dir(step) / MANIFEST).read_bytes()
    except OSError:
      return False
    if self._verified.get(step) == manifest:
      return True
    if self.check(step, checksums=True) is not None:
      return False
    self._verified[step] = manifest
    return True

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving ``step`` (asynchronously); the previous save finishes first."""
    self.manager.wait_until_finished()
    if self.primary:
      self._prune()
    with self._lock:
      self._inflight = step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  # --- restoring ------------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step ``step`` into the structure, shapes and shardings of the template."""
    self.manager.reload()
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args),
        data=ocp.args.JsonRestore()))
    return out.state, out.data

  def mismatch(self, step: int, abstract_state: Any) -> Optional[str]:
    """The first array of checkpoint ``step`` that does not match the template, or None."""
    self.manager.reload()
    saved = self.manager.item_metadata(step).state.tree
    return _first_mismatch(saved, abstract_state)

  def restore_latest(self, abstract_state: Any, check_shapes: bool = True) -> Restored:
    """Restores the newest valid checkpoint, skipping and moving aside damaged ones.

    Each candidate, newest first, must match its manifest (sizes and CRC32s) and then
    load; one that does not is reported (``logging.warning``) and, once a valid one has
    loaded or none is left, moved to ``<directory>.invalid/<step>``. Process 0 verifies
    and chooses; all processes then restore the step it chose.

    Args:
      abstract_state: the restore target (``abstract_like``).
      check_shapes: raise ``CheckpointMismatchError`` when the chosen checkpoint's arrays
        differ from the target (before anything is moved). When False, a checkpoint that
        does not match is skipped (not loaded, and not quarantined: it is not damaged)
        and listed in ``Restored.mismatched``.

    Returns:
      A ``Restored``; ``step`` is None when no valid, matching checkpoint exists.
    """
    invalid, mismatched, tried = [], [], set()
    found = Restored(None)
    while True:
      step = self._agree(self._newest_valid(tried, invalid) if self.primary else -1)
      if step < 0:
        break
      tried.add(step)
      try:
        bad, problem = self.mismatch(step, abstract_state), None
      except Exception as e:  # pylint: disable=broad-except
        bad, problem = None, f"unreadable metadata ({type(e).__name__})"
      if bad and check_shapes:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {os.fspath(self.directory)!r} does not match the "
            f"config: {bad}; use a new workdir or --config.restore=ignore")
      if bad:
        mismatched.append((step, bad))
        continue
      if problem is None:
        try:
          state, data = self.restore(step, abstract_state)
          found = Restored(step, state, data)
          break
        except Exception as e:  # pylint: disable=broad-except
          problem = f"does not load ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})"
      logging.warning("checkpoint step %d in %s is damaged: %s", step, self.directory, problem)
      invalid.append((step, problem))
    self._sync("effjax_checkpoint_checked")
    if invalid and self.primary:
      for step, _ in invalid:
        self._quarantine(step)
    self._sync("effjax_checkpoint_quarantined")
    self.manager.reload()
    return dataclasses.replace(found, invalid=tuple(invalid), mismatched=tuple(mismatched))

  def _newest_valid(self, tried: set, invalid: list) -> int:
    """The newest step not yet tried that passes ``check`` (CRCs included), or -1;
    failing ones are appended to ``invalid`` (``(step, problem)``)."""
    for step in reversed(self.all_steps()):
      if step in tried:
        continue
      problem = self.check(step)
      if problem is None:
        return step
      tried.add(step)
      logging.warning("checkpoint step %d in %s is damaged: %s", step, self.directory, problem)
      invalid.append((step, problem))
    return -1

  def _quarantine(self, step: int) -> epath.Path:
    root = self.directory.parent / (self.directory.name + ".invalid")
    root.mkdir(parents=True, exist_ok=True)
    dest = _unused(root / str(step))
    self.step_dir(step).rename(dest)
    return dest

  def set_aside(self) -> Optional[str]:
    """Moves every checkpoint to ``<directory>.replaced[.N]`` (``restore='ignore'``)."""
    if not self.all_steps():
      return None
    self.manager.wait_until_finished()
    dest = _unused(self.directory.parent / (self.directory.name + ".replaced"))
    if self.primary:
      dest.mkdir(parents=True)
      for step in self.all_steps():
        self.step_dir(step).rename(dest / str(step))
    self._sync("effjax_checkpoint_set_aside")
    self.manager.reload()
    return os.fspath(dest)

  def wait(self) -> None:
    """Blocks until the last save is on disk, then prunes."""
    self.manager.wait_until_finished()
    if self.primary:
      self._prune()

  def close(self) -> None:
    self.manager.wait_until_finished()
    if self.primary:
      self._prune()
    self.manager.close()


def read_arrays(step_dir: PathLike) -> tuple[Any, dict]:
  """Reads a checkpoint's state as host numpy arrays (no model or mesh needed) and its
  input-pipeline state: for inspecting or comparing checkpoints.

  Returns:
    ``(state, data)``: the state's pytree as saved (NamedTuples come back as their
    serialized containers) and the ``data`` item's dict.
  """
  step_dir = epath.Path(step_dir)
  state_dir = step_dir / "state"
  meta = ocp.StandardCheckpointer().metadata(state_dir)
  tree = meta.item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  data = json.loads((step_dir / "data" / "metadata").read_text(encoding="utf-8"))
  return state, data


def abstract_like(tree: Any, sharding) -> Any:
  """``ShapeDtypeStruct``s of ``tree``'s leaves placed with ``sharding`` (restore target):
  one sharding for all, or a tree of them (``Runner.state_shardings``: orbax then
  reads each device's part, so a checkpoint written on one mesh restores onto another)."""
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      sharding)
