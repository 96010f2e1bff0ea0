"""Checkpoints and workdirs on any path orbax accepts (etils.epath), and processes that
agree on the step they restore."""

import contextlib
import os

from etils import epath
from etils.epath import testing as epath_testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checkpoint as ckpt_lib
from effjax import trainer
from tests.helpers import assert_trees_close

BUCKET = "gs://effjax-test-bucket"


@contextlib.contextmanager
def gs_on_local_disk(root):
  """Routes every epath operation on ``gs://effjax-test-bucket/...`` to ``root`` on local
  disk (epath's own test backend), so code written against the epath API runs on a
  non-POSIX path without a network. Records the paths it was given."""
  seen = []

  def local(p):
    p = os.fspath(p)
    seen.append(p)
    return p.replace(BUCKET, str(root)) if p.startswith(BUCKET) else p

  def back(p):
    return p.replace(str(root), BUCKET) if str(p).startswith(str(root)) else p

  def one(fn, p, *a, **k):
    return fn(local(p), *a, **k)

  def two(fn, p, q, *a, **k):
    return fn(local(p), local(q), *a, **k)

  def walk(fn, p, **k):
    for r, d, f in fn(local(p), **k):
      yield back(r), d, f

  def glob(fn, p):
    return [back(x) for x in fn(local(p))]
  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, mkdir=one,
                                makedirs=one, remove=one, rmtree=one, stat=one, walk=walk,
                                glob=glob, rename=two, replace=two, copy=two):
    yield seen


def test_gs_paths_stay_urls_and_the_manifest_code_runs_on_them(tmp_path):
  assert os.fspath(ckpt_lib.resolve_path(f"{BUCKET}/r50")) == f"{BUCKET}/r50"
  assert ckpt_lib.resolve_path("rel/dir").is_absolute()
  cwd_before = set(os.listdir("."))
  with gs_on_local_disk(tmp_path) as seen:
    workdir = trainer.prepare_workdir(f"{BUCKET}/run")
    assert workdir == f"{BUCKET}/run"  # Not <cwd>/gs:/effjax-test-bucket/run.
    step = epath.Path(workdir) / "checkpoints" / "6"
    (step / "state").mkdir(parents=True)
    (step / "state" / "a.bin").write_bytes(b"0123456789")
    (step / "data").mkdir()
    (step / "data" / "metadata").write_text("{}")
    ckpt_lib.write_manifest(step)
    assert ckpt_lib.verify(step) is None
    (step / "state" / "a.bin").write_bytes(b"0123456780")
    assert ckpt_lib.verify(step) == "file state/a.bin fails its CRC32 check"
    assert ckpt_lib.verify(step, checksums=False) is None
  assert all(p.startswith(BUCKET) or p.startswith(str(tmp_path)) for p in seen if "://" in p)
  assert (tmp_path / "run" / "checkpoints" / "6" / ckpt_lib.MANIFEST).exists()
  assert set(os.listdir(".")) == cwd_before  # Nothing made local under the cwd.


def _state(x):
  return {"w": jnp.full((4,), x, jnp.float32), "step": jnp.asarray(x, jnp.int32)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ckpt_lib.abstract_like(tree, sharding)


def test_processes_restore_the_step_process_0_chose(tmp_path):
  """A process whose view of the directory differs (here: a newer step 9 it sees) still
  restores the step process 0 chose (through ``agree``); on its own it would take 9."""
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", max_to_keep=5)
  for s in (3, 6):
    ck.save(s, _state(s), {"pos": s})
    ck.wait()
  ck.close()
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(tmp_path / "ck" / "6", tmp_path / "ck" / "9")  # Valid by its manifest.
  alone = ckpt_lib.Checkpointer(tmp_path / "ck", primary=True)
  assert alone.restore_latest(_abstract(_state(0))).step == 9
  alone.close()
  follower = ckpt_lib.Checkpointer(tmp_path / "ck", primary=False, agree=lambda v: 6)
  got = follower.restore_latest(_abstract(_state(0)))
  follower.close()
  assert got.step == 6 and got.data == {"pos": 6}
  assert_trees_close(jax.device_get(got.state), jax.device_get(_state(6)), rtol=0, atol=0)


def test_a_checkpoint_that_does_not_match_is_skipped_not_quarantined(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "ck")
  ck.save(4, _state(4), {"pos": 4})
  ck.close()
  other = {"w": jnp.zeros((5,), jnp.float32), "step": jnp.zeros((), jnp.int32)}
  ck = ckpt_lib.Checkpointer(tmp_path / "ck")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"w has shape \(4,\)"):
    ck.restore_latest(_abstract(other))
  got = ck.restore_latest(_abstract(other), check_shapes=False)
  ck.close()
  assert got.step is None and got.invalid == ()
  assert [s for s, _ in got.mismatched] == [4]
  assert not (tmp_path / "ck.invalid").exists() and (tmp_path / "ck" / "4").is_dir()


def test_pruning_verifies_each_checkpoint_once(tmp_path, monkeypatch):
  """Pruning keeps only CRC-verified checkpoints, and reads each one's files once, not
  every kept checkpoint on every save."""
  calls = []
  crc = ckpt_lib._crc32
  monkeypatch.setattr(ckpt_lib, "_crc32", lambda p: calls.append(os.fspath(p)) or crc(p))
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", max_to_keep=2)
  for s in range(1, 7):
    ck.save(s, _state(s), {"pos": s})
  ck.close()
  assert ck.all_steps() == [5, 6]
  per_step = {}
  for p in calls:
    step = p.split(os.sep + "ck" + os.sep)[1].split(os.sep)[0]
    per_step.setdefault(step, set()).add(p)
  reads = {s: sum(c.startswith(os.fspath(tmp_path / "ck" / s) + os.sep) for c in calls)
           for s in per_step if s.isdigit()}
  files = {s: len(per_step[s]) for s in reads}
  assert reads == files, (reads, files)  # Each file CRC'd once by pruning.
