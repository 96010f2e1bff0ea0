"""FSDP on the (data, fsdp) mesh: the same training on every mesh shape, the state split
1/k per device, and checkpoints that restore onto another mesh."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checkpoint as ckpt_lib
from effjax import fsdp, make_mesh, optim, trainer
from effjax.parallel import FSDP_AXIS, ReplicationError, Runner
from helpers import assert_trees_close, lm_config, tiny_config

MESHES = (1, 2, 4, 8)  # fsdp sizes: meshes (8, 1), (4, 2), (2, 4), (1, 8).
STEPS = 20


def _train(config, k, batches, wrong_norms=False, check=None, start_states=None):
  """Params (host), metrics, per-device state bytes, the last state and the host
  state's data fields after each step, over the batches on the mesh with ``fsdp = k``.
  ``start_states``: each step after the first starts from these fields (another run's
  states after its steps, from the same initial state) instead of from the previous
  step's output. ``wrong_norms``:
  the optimizer's norms over each device's shard only (no ``sharded``/``axis_name``),
  the bug FSDP-aware norms prevent."""
  runner = Runner("shard_map", make_mesh(fsdp=k))
  setup = trainer.build(config, runner=runner)
  state = setup.state
  if wrong_norms:
    tx, _ = optim.create_optimizer(config, config.num_train_steps, inject_lr=True)
    state = state.replace(tx=tx)
  state = runner.place_state(state)
  nbytes = fsdp.bytes_per_device((state.params, state.opt_state))
  shard_bytes = sum(x.addressable_shards[0].data.nbytes
                    for x in jax.tree.leaves((state.params, state.opt_state)))
  step = runner.compile(trainer.make_train_step(config, task=setup.task),
                        check_replicated=not wrong_norms if check is None else check)
  metrics, after = [], []
  for i, batch in enumerate(batches):
    if start_states is not None and i > 0:
      state = runner.place_state(state.replace(**start_states[i - 1]))
    state, m = step(state, runner.shard_batch(batch))
    metrics.append(runner.to_host(m))
    after.append(jax.device_get(state.items()))
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
  return params, metrics, nbytes, shard_bytes, state, after


@pytest.fixture(scope="module", params=["lars_sync_bn", "lamb_lm"])
def mesh_runs(request, data_dir):
  """20 steps of the same batches on every mesh: LARS with sync BN on the mnist1d CNN, and
  LAMB (with NVLAMB's prenorm) on the LM; plus the shard-local-norm variant on (2, 4)."""
  if request.param == "lars_sync_bn":
    config = tiny_config(data_dir, **{"model.norm": "sync_batch", "optimizer.name": "lars",
                                      "optimizer.base_learning_rate": 2.0,
                                      "model.widths": (32, 64)})
  else:
    config = lm_config(data_dir, **{"optimizer.name": "lamb", "optimizer.grad_prenorm": True,
                                    "model.num_layers": 1})
  setup = trainer.build(config, runner=Runner("shard_map"))
  pre, _ = trainer.preprocess_fns(config, setup.spec, setup.task)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    idx = np.sort(rng.choice(len(setup.train_source), config.batch_size, replace=False))
    batches.append(pre(setup.train_source.gather(idx),
                       [np.random.default_rng(int(i)) for i in idx]))
  # Every mesh takes each step from the (8, 1) run's state before it: over 20 chained
  # steps of LARS at LR 2, one activation rounding across zero on one mesh and not on
  # another (the sums' order differs per mesh and per CPU's kernels) would move the
  # rest of the run, and that is not what this test is about.
  runs = {1: _train(config, 1, batches)}
  for k in MESHES[1:]:
    runs[k] = _train(config, k, batches, start_states=runs[1][5])
  runs["wrong"] = _train(config, 4, batches, wrong_norms=True)
  return request.param, config, runs, batches


def test_every_mesh_gives_the_same_training(mesh_runs):
  """(8,1), (4,2), (2,4) and (1,8): each of 20 steps, from the same state, gives the
  same state (parameters, optimizer state, BN statistics) and logged metrics to float
  tolerance; norms over each device's shard alone differ."""
  name, config, runs, batches = mesh_runs
  ref_params, ref_metrics, ref_after = runs[1][0], runs[1][1], runs[1][5]
  for k in MESHES[1:]:
    for i, (got, want) in enumerate(zip(runs[k][5], ref_after)):
      assert_trees_close(got, want, f"{name} fsdp={k} after step {i + 1}", rtol=2e-5,
                         atol=2e-6)
    assert_trees_close(runs[k][0], ref_params, f"{name} fsdp={k}", rtol=2e-5, atol=2e-6)
    for key in ("train/loss", "grad_norm", "param_norm", "update_norm", "trust_ratio/min",
                "trust_ratio/median", "trust_ratio/max"):
      np.testing.assert_allclose([m[key] for m in runs[k][1]], [m[key] for m in ref_metrics],
                                 rtol=2e-5, err_msg=f"{name} fsdp={k} {key}")
  # The loss moved (the runs train), and shard-local trust ratios give another model.
  assert ref_metrics[-1]["train/loss"] < ref_metrics[0]["train/loss"]
  wrong = jax.tree.leaves(runs["wrong"][0])
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(wrong, jax.tree.leaves(ref_params))) \
      > 1e-3
  assert not np.allclose(runs["wrong"][1][-1]["trust_ratio/max"],
                         ref_metrics[-1]["trust_ratio/max"], rtol=1e-3)
  # The replication check (on in the tests) names the shard-local ratios as outputs that
  # differ across the fsdp group (shown once, on the CNN).
  if name == "lars_sync_bn":
    with pytest.raises(ReplicationError, match="trust_ratio"):
      _train(config, 4, batches[:1], wrong_norms=True, check=True)


def test_state_bytes_per_device_fall_as_one_over_k(mesh_runs):
  """Parameters + optimizer state per device, from the arrays' own shardings: exactly the
  replicated leaves plus 1/k of the split ones, and close to 1/k overall."""
  name, config, runs, _ = mesh_runs
  full = runs[1][2]
  state = runs[1][4]
  split = replicated = 0
  for x in jax.tree.leaves((state.params, state.opt_state)):
    d = fsdp.shard_dim(x.shape, 8, config.mesh.fsdp_min_size, False)
    n = x.size * x.dtype.itemsize
    if d == fsdp.REPLICATED:
      replicated += n
    else:
      split += n
  assert split > 0.7 * full, (name, split, full)  # Most bytes are in split leaves.
  for k in MESHES:
    nbytes, shard_bytes = runs[k][2], runs[k][3]
    assert nbytes == shard_bytes  # The shardings say what the devices hold.
    if k > 1:
      assert nbytes == pytest.approx(replicated + split / k, rel=0.02), (name, k)
      assert nbytes < full * (1 / k + 0.25), (name, k, nbytes / full)
    else:
      assert nbytes == full
  # The split leaves sit along the fsdp axis of the mesh, and every device holds 1/k.
  big = max(jax.tree.leaves(runs[8][4].params), key=lambda x: x.size)
  assert FSDP_AXIS in big.sharding.spec and big.addressable_shards[0].data.size == big.size // 8


def test_save_on_2x4_restores_onto_8x1_and_1x8_and_continues(data_dir, tmp_path,
                                                             monkeypatch):
  """A run checkpointed on (2, 4) resumes on (2, 4), (8, 1) and (1, 8). The restored arrays
  are the saved ones bit for bit on every mesh, each laid out for its mesh; resumed on
  (2, 4) it is bitwise the run that never stopped (metrics, eval loss, final state and
  input position); on (8, 1) and (1, 8) it equals that run to float tolerance. (Not
  bitwise across meshes: each mesh shape sums a gradient in its own order, e.g. four then
  two on (2, 4); numerically-zero gradients, such as an attention key bias's, then
  differ in their rounding noise.)"""
  # Equality is checked on the results; the per-step replication check (on in the other
  # FSDP tests) would only add an all-gather and a wait to each of these runs' steps.
  monkeypatch.setenv("EFFJAX_CHECK_REPLICATED", "0")
  overrides = {"optimizer.name": "lamb", "log_every": 1, "checkpoint.every_steps": 8,
               "model.num_layers": 1}
  config = lambda k: lm_config(data_dir, **{**overrides, "mesh.fsdp": k})
  full = trainer.train_and_evaluate(config(4), str(tmp_path / "full"), verbose=False)
  first = tmp_path / "on_2x4"
  part = trainer.train_and_evaluate(config(4), str(first), verbose=False, stop_after=8)
  assert part["stopped"] and part["final_step"] == 8 < full["final_step"]
  restored_on, results = {}, {}
  for k, mesh in ((4, "2x4"), (1, "8x1"), (8, "1x8")):
    workdir = tmp_path / f"to_{mesh}"
    shutil.copytree(first, workdir)
    setup = trainer.build(config(k), with_data=False)
    items = setup.state.items()
    ck = ckpt_lib.Checkpointer(workdir / "checkpoints", 3)
    restored = ck.restore_latest(ckpt_lib.abstract_like(items,
                                                        setup.runner.state_shardings(items)))
    ck.close()
    restored_on[mesh] = jax.device_get(restored.state)
    assert_trees_close(restored_on[mesh], restored_on["2x4"], f"restore on {mesh}", rtol=0,
                       atol=0)
    embedding = restored.state["params"]["embed"]["embedding"]
    assert (FSDP_AXIS in embedding.sharding.spec) == (k > 1), mesh
    assert embedding.addressable_shards[0].data.size == embedding.size // k
    summary = trainer.train_and_evaluate(config(k), str(workdir), verbose=False)
    results[mesh] = (summary, _rows(workdir))
  ref_rows, last = _rows(tmp_path / "full"), str(full["final_step"])
  summary, rows = results["2x4"]
  assert summary["eval/loss"] == full["eval/loss"]
  assert [(r["step"], r["train/loss"], r["param_norm"]) for r in rows] == \
      [(r["step"], r["train/loss"], r["param_norm"]) for r in ref_rows]
  end, data = ckpt_lib.read_arrays(tmp_path / "to_2x4" / "checkpoints" / last)
  ref_end, ref_data = ckpt_lib.read_arrays(tmp_path / "full" / "checkpoints" / last)
  assert_trees_close(end, ref_end, "resumed on 2x4 vs never stopped", rtol=0, atol=0)
  assert data == ref_data
  for mesh in ("8x1", "1x8"):
    summary, rows = results[mesh]
    assert summary["final_step"] == full["final_step"]
    assert summary["eval/loss"] == pytest.approx(full["eval/loss"], rel=1e-5), mesh
    for key in ("train/loss", "param_norm", "grad_norm"):
      np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref_rows],
                                 rtol=1e-5, err_msg=f"{mesh} {key}")
    end, data = ckpt_lib.read_arrays(tmp_path / f"to_{mesh}" / "checkpoints" / last)
    assert_trees_close(end["params"], ref_end["params"], mesh, rtol=1e-5, atol=1e-6)
    assert data == ref_data


def _rows(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f if '"train/loss"' in line]


@pytest.mark.parametrize("k", [1, 2, 8])
def test_split_dots_equal_numpy_on_every_mesh_and_need_their_psum(k):
  """``fsdp.split_dots`` (each device reads its slice, one psum) gives every pair's inner
  product over all leaves (``split_sq_norms``: a tree with itself), the same on every
  device, on meshes (8, 1), (4, 2) and (1, 8): with small leaves (sliced as one
  concatenation), a large leaf whose size leaves a tail, and large and small leaves
  split over ``fsdp``. Without the psum each device has a part only (the defect shown)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  big = 8 * fsdp.SPLIT_MIN_PART
  trees = [{"tiny": rng.normal(size=(7,)), "tail": rng.normal(size=(big + 5,)),
            "w": rng.normal(size=(64, big // 8)), "v": rng.normal(size=(3, 40, 32))}
           for _ in range(2)]
  trees = jax.tree.map(lambda x: np.asarray(x, np.float32), trees)
  mesh = make_mesh(fsdp=k)
  dims = fsdp.leaf_dims(trees[0], k, min_size=1024)
  assert (dims == ()) == (k == 1) and (k == 1 or dims.count(fsdp.REPLICATED) == 2)
  specs = fsdp.partition_specs(trees[0], k, min_size=1024)

  def dots(a, b, psum):
    if psum:
      return jnp.concatenate([fsdp.split_sq_norms([a, b], dims),
                              fsdp.split_dots([(a, b)], dims)])[None]
    return fsdp._dot_parts([(a, a), (b, b), (a, b)], dims)[None]  # pylint: disable=protected-access

  leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(t)] for t in trees]
  inner = lambda i, j: sum(float(np.sum(x * y)) for x, y in zip(leaves[i], leaves[j]))
  want = np.asarray([inner(0, 0), inner(1, 1), inner(0, 1)])
  assert abs(want[2]) > 10  # The cross term is not ~0 by chance: the test can fail.
  for psum in (True, False):
    out = jax.jit(jax.shard_map(lambda a, b: dots(a, b, psum), mesh=mesh,
                                in_specs=(specs, specs), out_specs=P(("data", "fsdp")),
                                check_vma=False))(*trees)
    out = np.asarray(out)
    assert out.shape == (8, 3)
    if psum:
      np.testing.assert_allclose(out, np.broadcast_to(want, (8, 3)), rtol=1e-4)
      assert (out == out[0]).all()
    else:
      assert (np.abs(out[:, :2]) < 0.5 * want[:2]).all()
      np.testing.assert_allclose(out.sum(0), want, rtol=1e-4)
