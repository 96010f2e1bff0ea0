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
and the newest valid one is loaded.
"""

import dataclasses
import glob
import json
import os
import shutil
import threading
import zlib
from typing import Any, Callable, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

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


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(directory: str) -> list[str]:
  """The items' files (``state/...``, ``data/...``). Orbax rewrites the step's top-level
  files (``_CHECKPOINT_METADATA``, ``commit_success.txt``) when it commits, after the
  manifest is written, so those are not covered."""
  out = []
  for root, _, names in os.walk(directory):
    if root != directory:
      out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(out)


def write_manifest(step_dir: str) -> None:
  """Records the size and CRC32 of every file of a finished checkpoint (atomically)."""
  files = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
           for f in _files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as fh:
    json.dump({"files": files}, fh)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str, checksums: bool = True) -> Optional[str]:
  """Returns None if ``step_dir`` matches its manifest, else what is wrong (one line)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return "no manifest (the save did not finish)"
  try:
    with open(path, encoding="utf-8") as fh:
      files = json.load(fh)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable manifest ({type(e).__name__})"
  for name, (size, crc) in sorted(files.items()):
    p = os.path.join(step_dir, name)
    if not os.path.exists(p):
      return f"file {name} is missing"
    actual = os.path.getsize(p)
    if actual != size:
      return f"file {name} has {actual} bytes, {size} were written"
    if checksums and _crc32(p) != crc:
      return f"file {name} fails its CRC32 check"
  return None


def _unused(path: str) -> str:
  """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist."""
  dest, n = path, 1
  while os.path.exists(dest):
    dest, n = f"{path}.{n}", n + 1
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


class Checkpointer:
  """Verified orbax checkpoints in ``directory``: items ``state`` and ``data``.

  ``state`` is the train state's data fields (a pytree of arrays); ``data`` is the grain
  iterator's JSON state, so a resumed run reads exactly the batches an uninterrupted run
  would have read. Saves are asynchronous; ``wait``/``close`` block until they are on disk.

  Args:
    directory: where the step directories go.
    max_to_keep: how many verified checkpoints to keep.
    primary: whether this process writes manifests, prunes and moves damaged checkpoints
      (process 0 on a shared filesystem).
    sync: called with a name where all processes must meet (multi-host); no-op by default.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, primary: Optional[bool] = None,
               sync: Optional[Callable[[str], None]] = None):
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    self.primary = jax.process_index() == 0 if primary is None else primary
    self._sync = sync or (lambda name: None)
    self._inflight: Optional[int] = None
    self._lock = threading.Lock()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalized)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  # --- listing and validity -------------------------------------------------------------

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Step directories present (finished by orbax or not yet verified), ascending."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

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
    tmp = sorted(glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")),
                 key=os.path.getmtime)
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
    verified = [s for s in self.all_steps() if self.check(s, checksums=True) is None]
    for step in verified[:-self.max_to_keep]:
      doomed = os.path.join(self.directory, f".deleting-{step}")
      os.replace(self.step_dir(step), doomed)  # Atomic: a kill mid-delete leaves no half step.
      shutil.rmtree(doomed, ignore_errors=True)

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving ``step`` (asynchronously); the previous save finishes first."""
    self.manager.wait_until_finished()
    if self.primary:
      self._prune()
    with self._lock:
      self._inflight = step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  # --- restoring ------------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step ``step`` into the structure, shapes and shardings of the template."""
    self.manager.reload()
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
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
    loaded or none is left, moved to ``<directory>.invalid/<step>``.

    Args:
      abstract_state: the restore target (``abstract_like``).
      check_shapes: raise ``CheckpointMismatchError`` when the newest valid checkpoint's
        arrays differ from the target (before anything is moved).

    Returns:
      A ``Restored``; ``step`` is None when no valid checkpoint exists.
    """
    invalid = []
    found = Restored(None)
    for step in reversed(self.all_steps()):
      problem = self.check(step)
      if problem is None:
        try:
          bad = self.mismatch(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          bad, problem = None, f"unreadable metadata ({type(e).__name__})"
        if bad and check_shapes:
          raise CheckpointMismatchError(
              f"checkpoint step {step} in {self.directory!r} does not match the config: "
              f"{bad}; use a new workdir or --config.restore=ignore")
        if problem is None:
          try:
            state, data = self.restore(step, abstract_state)
            found = Restored(step, state, data)
          except Exception as e:  # pylint: disable=broad-except
            problem = f"does not load ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})"
      if problem is not None:
        logging.warning("checkpoint step %d in %s is damaged: %s", step, self.directory, problem)
        invalid.append((step, problem))
      if found.step is not None:
        break
    self._sync("effjax_checkpoint_checked")
    if invalid and self.primary:
      for step, _ in invalid:
        self._quarantine(step)
    self._sync("effjax_checkpoint_quarantined")
    self.manager.reload()
    return dataclasses.replace(found, invalid=tuple(invalid))

  def _quarantine(self, step: int) -> str:
    root = self.directory + ".invalid"
    os.makedirs(root, exist_ok=True)
    dest = _unused(os.path.join(root, str(step)))
    os.replace(self.step_dir(step), dest)
    return dest

  def set_aside(self) -> Optional[str]:
    """Moves every checkpoint to ``<directory>.replaced[.N]`` (``restore='ignore'``)."""
    if not self.all_steps():
      return None
    self.manager.wait_until_finished()
    dest = _unused(self.directory + ".replaced")
    if self.primary:
      os.makedirs(dest)
      for step in self.all_steps():
        os.replace(self.step_dir(step), os.path.join(dest, str(step)))
    self._sync("effjax_checkpoint_set_aside")
    self.manager.reload()
    return dest

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


def read_arrays(step_dir: str) -> tuple[Any, dict]:
  """Reads a checkpoint's state as host numpy arrays (no model or mesh needed) and its
  input-pipeline state: for inspecting or comparing checkpoints.

  Returns:
    ``(state, data)``: the state's pytree as saved (NamedTuples come back as their
    serialized containers) and the ``data`` item's dict.
  """
  state_dir = os.path.join(step_dir, "state")
  meta = ocp.StandardCheckpointer().metadata(state_dir)
  tree = meta.item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  with open(os.path.join(step_dir, "data", "metadata"), encoding="utf-8") as f:
    data = json.load(f)
  return state, data


def abstract_like(tree: Any, sharding) -> Any:
  """``ShapeDtypeStruct``s of ``tree``'s leaves placed with ``sharding`` (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
