"""shard_map == pmap, data parallelism == one device on the global batch, padded eval."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import effjax
from effjax import data as data_lib
from effjax import steps, trainer
from tests.helpers import assert_trees_close, tiny_config


def _global_batches(setup, n_steps, seed=0):
  pre, _ = trainer.preprocess_fns(setup.config, setup.spec)
  it = iter(data_lib.train_dataset(setup.train_source, pre,
                                   global_batch_size=setup.config.batch_size, seed=seed))
  return [next(it) for _ in range(n_steps)]


def _run(mode, config, batches):
  runner = effjax.Runner(mode)
  setup = trainer.build(config, runner=runner)
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  fn = runner.compile(steps.train_step)
  history = []
  for b in batches:
    state, m = fn(state, runner.shard_batch(b))
    history.append(runner.to_host(m))
  return jax.device_get(runner.unreplicate(state).items()), history


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_shard_map_equals_pmap(data_dir, norm):
  config = tiny_config(data_dir, **{"model.norm": norm})
  setup = trainer.build(config, runner=effjax.Runner("shard_map"))
  batches = _global_batches(setup, 6)
  s_items, s_hist = _run("shard_map", config, batches)
  p_items, p_hist = _run("pmap", config, batches)
  assert_trees_close(s_items, p_items, rtol=1e-6, atol=1e-6)
  for hs, hp in zip(s_hist, p_hist):
    for k in hs:
      np.testing.assert_allclose(hs[k], hp[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert int(s_items["step"]) == 6


def test_eight_replicas_equal_one_device_on_the_global_batch(data_dir):
  """Sync BN + pmean'd gradients on 8 devices == plain BN and grad on the whole batch."""
  config = tiny_config(data_dir, **{"model.norm": "sync_batch"})
  setup = trainer.build(config, runner=effjax.Runner("shard_map"))
  batches = _global_batches(setup, 3)
  items, hist = _run("shard_map", config, batches)

  ref_model = effjax.models.create_model(
      tiny_config(data_dir, **{"model.norm": "batch"}).model, setup.spec.num_classes)
  # The reference optimizer follows the schedule by its own update count (optax's way);
  # effjax's step sets the same schedule's LR inside the optimizer (inject_hyperparams).
  tx, _ = effjax.optim.create_optimizer(config, config.num_train_steps)
  state = setup.state.replace(apply_fn=ref_model.apply, tx=tx,
                              opt_state=tx.init(setup.state.params))

  @jax.jit
  def ref_step(state, batch):
    def loss_fn(p):
      logits, new = state.apply_fn(state.variables(p), batch["input"], train=True,
                                   mutable=["batch_stats"])
      return steps.cross_entropy(logits, batch["label"]).mean(), new["batch_stats"]
    (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    upd, opt = state.tx.update(g, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, upd), batch_stats=bs,
                         opt_state=opt, step=state.step + 1), loss

  for k, b in enumerate(batches):
    state, loss = ref_step(state, b)
    np.testing.assert_allclose(hist[k]["train/loss"], loss, rtol=1e-5)
  assert_trees_close(items["params"], state.params, rtol=1e-4, atol=1e-5)
  assert_trees_close(items["batch_stats"], state.batch_stats, rtol=1e-4, atol=1e-5)
  # Not vacuous: per-device BN on the 8 devices (local statistics) ends elsewhere.
  local, _ = _run("shard_map", tiny_config(data_dir, **{"model.norm": "batch"}), batches)
  assert not np.allclose(local["batch_stats"]["BatchNorm_0"]["var"],
                         state.batch_stats["BatchNorm_0"]["var"], rtol=1e-3)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eval_covers_partial_last_batch(data_dir, mode):
  # digits: 359 test examples; 64 per global batch -> 5 full batches and one of 39.
  config = tiny_config(data_dir, **{"dataset.name": "digits", "dataset.num_train_examples": 1438,
                                    "model.name": "mlp", "model.widths": (32,),
                                    "eval_batch_size": 64})
  runner = effjax.Runner(mode)
  setup = trainer.build(config, runner=runner)
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  # Random parameters would give chance accuracy; take a few steps so the check has teeth.
  fn = runner.compile(steps.train_step)
  for b in _global_batches(setup, 20):
    state, _ = fn(state, runner.shard_batch(b))
  result = trainer.evaluate(setup, state)
  assert result["eval/count"] == 359

  host = jax.device_get(runner.unreplicate(state))
  x = setup.eval_source.arrays["input"].astype(np.float32) / 16.0
  logits = setup.model.apply(host.variables(), x, train=False)
  labels = setup.eval_source.arrays["label"]
  np.testing.assert_allclose(result["eval/accuracy"], np.mean(np.argmax(logits, -1) == labels),
                             atol=1e-6)
  np.testing.assert_allclose(result["eval/loss"],
                             steps.cross_entropy(logits, labels).mean(), rtol=1e-5)
  assert result["eval/accuracy"] > 0.5


def test_replication_check_names_an_output_left_unreduced():
  """With check_vma=False nothing stops a per-replica function from returning a value it
  forgot to reduce (out_specs=P() returns device 0's copy); the debug check, on in the
  tests, catches it and names the output."""
  runner = effjax.Runner("shard_map")
  x = runner.shard_batch({"x": np.arange(16, dtype=np.float32)})
  forgot = lambda state, b: {"mean": jax.lax.pmean(b["x"].mean(), "data"),
                             "local": b["x"].mean()}
  with pytest.raises(effjax.parallel.ReplicationError, match=r"\['local'\]"):
    runner.compile(forgot, donate_state=False, check_replicated=True)({}, x)
  unchecked = runner.compile(forgot, donate_state=False, check_replicated=False)({}, x)
  assert float(runner.to_host(unchecked)["local"]) == 0.5  # Device 0's rows 0 and 1.
  # The host-side naming compares copies of the same part only: the batch, split over
  # the devices, differs shard to shard and is not named.
  assert effjax.parallel.differing_outputs({**unchecked, "batch": x}) == ["['local']"]
  reduced = lambda state, b: {"mean": jax.lax.pmean(b["x"].mean(), "data")}
  out = runner.compile(reduced, donate_state=False, check_replicated=True)({}, x)
  assert float(runner.to_host(out)["mean"]) == 7.5
  # Under pmap the outputs carry a leading device axis; the same output is named.
  pmapped = effjax.Runner("pmap")
  xp = pmapped.shard_batch({"x": np.arange(16, dtype=np.float32)})
  with pytest.raises(effjax.parallel.ReplicationError, match=r"\['local'\]$"):
    pmapped.compile(forgot, donate_state=False, check_replicated=True)({}, xp)
  out = pmapped.compile(reduced, donate_state=False, check_replicated=True)({}, xp)
  assert float(pmapped.to_host(out)["mean"]) == 7.5


@pytest.mark.parametrize("check_vma", [True, False])
def test_train_step_in_a_users_shard_map_with_either_check_vma(data_dir, check_vma):
  """effjax.train_step inside a user's own shard_map gives the same state and metrics
  with check_vma on (the default) or off as effjax's Runner. With check_vma on, autodiff
  already sums the gradient of a replicated input over the axis, so a step that
  differentiates the replicated params and then takes the pmean gets n times the
  gradient (the defect this guards against; shown on the side)."""
  config = tiny_config(data_dir, **{"model.norm": "sync_batch"})
  runner = effjax.Runner("shard_map")
  setup = trainer.build(config, runner=runner)
  batches = _global_batches(setup, 2)
  ref_items, ref_hist = _run("shard_map", config, batches)

  mesh = runner.mesh
  step = jax.jit(jax.shard_map(steps.train_step, mesh=mesh,
                               in_specs=(P(), P("data")), out_specs=(P(), P()),
                               check_vma=check_vma))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  for k, b in enumerate(batches):
    old = jax.device_get(state.params)
    state, m = step(state, runner.shard_batch(b))
    for key in ("train/loss", "grad_norm", "update_norm", "param_norm"):
      np.testing.assert_allclose(np.asarray(m[key]), ref_hist[k][key], rtol=1e-5, err_msg=key)
    # The logged norms are those of the new parameters and of the update applied
    # (from one psum of per-device slices).
    new = jax.device_get(state.params)
    np.testing.assert_allclose(float(m["param_norm"]), float(optax.tree.norm(new)), rtol=1e-5)
    np.testing.assert_allclose(float(m["update_norm"]),
                               float(optax.tree.norm(jax.tree.map(np.subtract, new, old))),
                               rtol=1e-3)
  assert_trees_close(jax.device_get(state.items()), ref_items, rtol=1e-5, atol=1e-6)

  def naive(w, x):
    g = jax.grad(lambda w: jnp.mean(x * w))(w)
    return jax.lax.pmean(g, "data")
  naive_g = jax.jit(jax.shard_map(naive, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=P(), check_vma=check_vma))(
      jnp.float32(1.0), runner.shard_batch({"x": np.arange(16, dtype=np.float32)})["x"])
  assert float(naive_g) == pytest.approx(7.5 * (8 if check_vma else 1))


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_logged_norms_are_the_new_parameters_and_the_update_applied(mode):
  """``param_norm`` is the norm of the parameters after the step and ``update_norm`` of
  what was added to them, with the gradient's, from one psum of per-device slices
  (``steps._norms``; the new norm as |w|^2 + 2<w, u> + |u|^2). The step is large here
  (SGD, LR 3), so the norm before the step, the wrong one, is far off."""
  c = effjax.config.base_config().model
  c.name, c.widths, c.norm = "mlp", (64,), "none"
  model = effjax.models.create_model(c, 3, jnp.float32)
  state = steps.create_train_state(jax.random.key(0), model, optax.sgd(3.0),
                                   optax.constant_schedule(3.0), (40,))
  runner = effjax.Runner(mode)
  rng = np.random.default_rng(0)
  batch = runner.shard_batch({"input": rng.normal(size=(16, 40)).astype(np.float32),
                              "label": rng.integers(0, 3, 16).astype(np.int32)})
  old = jax.device_get(state.params)
  state, m = runner.compile(steps.train_step)(
      state.replace(**runner.replicate(state.items())), batch)
  m = runner.to_host(m)
  new = jax.device_get(runner.unreplicate(state.params))
  norm = lambda t: float(optax.tree.norm(t))
  np.testing.assert_allclose(m["param_norm"], norm(new), rtol=1e-5)
  np.testing.assert_allclose(m["update_norm"], norm(jax.tree.map(np.subtract, new, old)),
                             rtol=1e-4)
  np.testing.assert_allclose(m["update_norm"], 3.0 * m["grad_norm"], rtol=1e-5)
  assert abs(norm(new) - norm(old)) > 0.05 * norm(old)


def test_replication_flags_find_one_differing_element_in_any_dtype():
  """The check compares bits: one element changed on one replica flags exactly that
  leaf, whatever its dtype; NaNs equal on every replica pass, and 0.0 against -0.0
  (equal as numbers) does not. An empty leaf passes. ``replicas_agree`` is their
  conjunction."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  runner = effjax.Runner("shard_map")
  leaves = {"f32": jnp.full((3, 5), jnp.nan), "bf16": jnp.ones((7,), jnp.bfloat16),
            "i32": jnp.arange(4), "u8": jnp.arange(6, dtype=jnp.uint8),
            "bool": jnp.ones((2,), bool), "empty": jnp.zeros((0, 3)),
            "key": jax.random.key(1)}

  def flags_with(change, **base):
    def per_replica(b):
      tree = {**leaves, **base}
      if change:
        name, fn = change
        tree[name] = jnp.where(jax.lax.axis_index("data") == 5, fn(tree[name]), tree[name])
      return (effjax.parallel.replication_flags(tree),
              effjax.parallel.replicas_agree(tree))
    f = jax.jit(jax.shard_map(per_replica, mesh=runner.mesh, in_specs=P("data"),
                              out_specs=P(), check_vma=False))
    names = sorted(leaves)  # jax.tree.leaves orders dict keys.
    flags, agree = f(jnp.zeros(8))
    assert bool(agree) == bool(np.all(flags))  # The compiled steps' one-flag form.
    return dict(zip(names, np.asarray(flags)))

  assert all(flags_with(None).values())
  changes = {"f32": lambda x: x.at[2, 4].set(1.0), "bf16": lambda x: x.at[3].add(1),
             "i32": lambda x: x.at[0].add(1), "u8": lambda x: x.at[5].add(1),
             "bool": lambda x: x.at[1].set(False)}
  for name, fn in changes.items():
    flags = flags_with((name, fn))
    assert [k for k, ok in flags.items() if not ok] == [name], (name, flags)
  zeros = jnp.zeros((3, 5))
  assert flags_with(("f32", lambda x: x.at[0, 0].set(0.0)), f32=zeros)["f32"]
  assert not flags_with(("f32", lambda x: x.at[0, 0].set(-0.0)), f32=zeros)["f32"]


def test_global_sq_norm_is_numpys_with_one_reduction_for_the_small_leaves():
  """``global_sq_norm`` over float32, bfloat16 and int leaves, small and large, equals
  numpy's float64 sum of squares; the small leaves are reduced in one ``reduce``, where a
  reduction per leaf (``optax.tree.norm``) has one per leaf."""
  rng = np.random.RandomState(0)
  tree = {"w": rng.randn(70, 3).astype(np.float32), "b": rng.randn(3).astype(np.float32),
          "scale": rng.randn(2, 5).astype(jnp.bfloat16), "n": np.arange(4, dtype=np.int32),
          "emb": rng.randn(65).astype(jnp.bfloat16), "s": np.float32(1.5)}
  want = sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in tree.values())
  f = jax.jit(functools.partial(effjax.parallel.global_sq_norm, max_size=64))
  np.testing.assert_allclose(float(f(tree)), want, rtol=1e-6)
  assert float(f(tree)) != pytest.approx(want - 1.5 ** 2, rel=1e-6)  # Every leaf counts.
  reductions = lambda fn: fn.lower(tree).as_text().count("stablehlo.reduce")
  assert reductions(f) == 3  # "w", "emb", and the four small leaves together.
  assert reductions(jax.jit(optax.tree.norm)) == 6
  assert float(effjax.parallel.global_sq_norm({})) == 0.0


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_packed_psum_is_psum_bit_for_bit_with_one_operand_for_the_small_leaves(mode):
  """``packed_psum`` over 8 replicas of a tree of scalars, small arrays of three dtypes
  and one leaf above ``max_size``: every leaf equals ``lax.psum``'s bit for bit and the
  numpy sum over the replicas, not this replica's own values (the wrong variant); the
  compiled all-reduce carries one operand per dtype of small leaves plus the large one,
  where ``psum`` carries one per leaf. By default (``max_size=None``) on CPU, the large
  leaf (120 elements) is packed too."""
  rng = np.random.RandomState(0)
  local = {"loss": rng.randn(8).astype(np.float32),
           "stats": {"mean": rng.randn(8, 3, 4).astype(np.float32),
                     "var": rng.rand(8, 5).astype(np.float32)},
           "count": rng.randint(0, 9, (8, 2)).astype(np.int32),
           "half": rng.randn(8, 6).astype(jnp.bfloat16),
           "big": rng.randn(8, 40, 3).astype(np.float32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))

  def compiled(reduce):
    def per_replica(tree):
      tree = jax.tree.map(lambda x: x[0], tree)
      return jax.tree.map(lambda x: x[None], reduce(tree))
    if mode == "pmap":
      f = jax.pmap(reduce, axis_name="data")
    else:
      f = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=P("data"),
                                out_specs=P("data"), check_vma=False))
    return f, f.lower(local).compile().as_text()

  packed, packed_hlo = compiled(lambda t: effjax.parallel.packed_psum(t, "data", max_size=64))
  plain, plain_hlo = compiled(lambda t: jax.lax.psum(t, "data"))
  got, want = packed(local), plain(local)
  for k, (g, w, x) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                    jax.tree.leaves(local))):
    tol = 2e-2 if x.dtype == jnp.bfloat16 else 1e-5
    g, w, x = (np.asarray(v, np.float64 if v.dtype != np.int32 else np.int64)
               for v in (g, w, x))
    np.testing.assert_array_equal(g, w, err_msg=str(k))
    np.testing.assert_allclose(g[0], x.sum(0), rtol=tol, atol=tol)
    assert all(np.array_equal(g[0], g[i]) for i in range(8))
    assert not np.allclose(g[0], x[0])
  operands = lambda hlo: sum(
      c.count("%") for c in re.findall(r" all-reduce(?:-start)?\((.*?)\), ", hlo))
  assert operands(plain_hlo) == 6
  assert operands(packed_hlo) == 4  # float32, int32, bfloat16 vectors, and "big".
  # The default on CPU packs leaves up to 2^18 elements, "big" too: one operand per dtype.
  default, default_hlo = compiled(lambda t: effjax.parallel.packed_psum(t, "data"))
  assert effjax.parallel.pack_max_size() == effjax.parallel.CPU_PACK_MAX_SIZE
  assert operands(default_hlo) == 3
  for g, w in zip(jax.tree.leaves(default(local)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))
