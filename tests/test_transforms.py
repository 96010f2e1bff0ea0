"""LARS, LAMB, TVLARS and the trust ratio: optax equivalence, the papers' equations in
numpy, masks, clipping, zero norms and parameters sharded over devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax import models, optim

from tests.helpers import assert_trees_close


@functools.lru_cache(maxsize=None)
def _resnet_tree():
  """A ResNet-20 parameter tree: conv kernels, BN scales/biases, a dense head."""
  model = models.resnet20(10, norm="batch")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                             train=False))["params"]
  # Values drawn in numpy (the model's own init compiles a program per shape): kernels at
  # LeCun scale, BN scales near 1, biases small but non-zero, so that every trust ratio
  # is exercised and the ratios differ from layer to layer.
  rng = np.random.default_rng(1)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      x = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    else:
      x = (name == "scale") + 0.05 * rng.standard_normal(s.shape)
    return jnp.asarray(x, jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _grads(params, step):
  """Random float32 gradients for ``step``, drawn in numpy (an eager ``jax.random`` draw
  per leaf compiled one program per shape and dispatched 65 per step)."""
  rng = np.random.default_rng([2, step])
  return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                      params)


def _run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
  return params, state


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  assert_trees_close(a, b, rtol=rtol, atol=atol)


def test_lars_all_masks_true_equals_optax_over_50_steps():
  params = _resnet_tree()
  sched = optax.linear_schedule(0.0, 2.0, 10)
  ours, _ = _run(optim.lars(sched, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3,
                            nesterov=True, weight_decay_mask=True, trust_ratio_mask=True),
                 params, 50)
  ref, _ = _run(optax.lars(sched, weight_decay=1e-4, trust_coefficient=1e-3, momentum=0.9,
                           nesterov=True), params, 50)
  _assert_trees_close(ours, ref)


def test_lamb_all_masks_true_equals_optax_over_50_steps():
  params = _resnet_tree()
  ours, _ = _run(optim.lamb(1e-2, weight_decay=1e-2, weight_decay_mask=True,
                            trust_ratio_mask=True), params, 50)
  ref, _ = _run(optax.lamb(1e-2, weight_decay=1e-2), params, 50)
  _assert_trees_close(ours, ref)


def _numpy_lars(params, steps, lr, m, wd, eta):
  """You et al. 2017, Algorithm 1, with the ratio eta*||w||/||g + wd*w||; layers with
  ndim <= 1 get plain momentum SGD (no decay, no ratio)."""
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for t in range(steps):
    g = {k: np.asarray(x, np.float64) for k, x in _flat(_grads(_unflat(w), t)).items()}
    for k in w:
      if w[k].ndim > 1:
        u = g[k] + wd * w[k]
        local = eta * np.linalg.norm(w[k]) / np.linalg.norm(u)
      else:
        u, local = g[k], 1.0
      v[k] = m * v[k] + lr * local * u
      w[k] = w[k] - v[k]
  return w


def _numpy_lamb(params, steps, lr, b1, b2, eps, wd):
  """You et al. 2019, Algorithm 2 (phi = identity); ndim <= 1 layers: plain Adam step."""
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(x) for k, x in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for t in range(1, steps + 1):
    g = {k: np.asarray(x, np.float64) for k, x in _flat(_grads(_unflat(w), t - 1)).items()}
    for k in w:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if w[k].ndim > 1:
        u = r + wd * w[k]
        ratio = np.linalg.norm(w[k]) / np.linalg.norm(u)
      else:
        u, ratio = r, 1.0
      w[k] = w[k] - lr * ratio * u
  return w


_TREEDEF = None


def _flat(tree):
  global _TREEDEF
  paths, _TREEDEF = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): v for p, v in paths}


def _unflat(flat):
  return jax.tree.unflatten(_TREEDEF, [jnp.asarray(v, jnp.float32) for v in flat.values()])


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_update_stores_no_parameter_sized_temporary(name):
  """Jitted and donated, the LARS or LAMB update of three same-shape weights needs less
  temporary memory than one of them. LARS: XLA neither stores a broadcast of the weight
  decay shared by the three norms (it did while ``wd`` was a bare constant: one more
  array for each norm to read) nor the decayed gradient. LAMB: the Adam direction, read
  by the norm and by the scaled update, is recomputed by each rather than stored."""
  shape = (64, 64, 16)  # 256 KiB per array.
  keys = jax.random.split(jax.random.key(0), 6)
  params = {f"w{i}": jax.random.normal(keys[i], shape) for i in range(3)}
  grads = {f"w{i}": jax.random.normal(keys[3 + i], shape) for i in range(3)}
  nbytes = np.prod(shape) * 4

  def temp_bytes(tx):
    def step(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    compiled = jax.jit(step, donate_argnums=0).lower((params, tx.init(params)), grads).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  if name == "lars":
    ours = optim.lars(0.1, weight_decay=1e-4, weight_decay_mask=True, trust_ratio_mask=True)
    # The decayed gradient, read by optax's trust-ratio norm and by its scaling.
    stored = [optax.lars(0.1, weight_decay=1e-4)]
  else:
    ours = optim.lamb(1e-3, weight_decay=1e-2, weight_decay_mask=True, trust_ratio_mask=True)
    # The direction, formed by Adam and read twice by the ratio after it: optax's chain,
    # and the same chain with effjax's own ``scale_by_trust_ratio``.
    stored = [optax.lamb(1e-3, weight_decay=1e-2),
              optax.chain(optax.scale_by_adam(eps=1e-6), optax.add_decayed_weights(1e-2),
                          optim.scale_by_trust_ratio(), optax.scale_by_learning_rate(1e-3))]
  assert temp_bytes(ours) < nbytes
  # The bound is not vacuous: a chain that must store a parameter-sized array exceeds it.
  for tx in stored:
    assert temp_bytes(tx) >= nbytes


def test_lars_default_masks_follow_the_paper_in_numpy():
  params = _resnet_tree()
  ours, _ = _run(optim.lars(5.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3),
                 params, 10)
  ref = _numpy_lars(_flat(params), 10, 5.0, 0.9, 5e-4, 1e-3)
  for k, x in _flat(ours).items():
    np.testing.assert_allclose(np.asarray(x), ref[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_lamb_default_masks_follow_the_paper_in_numpy():
  params = _resnet_tree()
  ours, _ = _run(optim.lamb(1e-2, eps=1e-6, weight_decay=1e-2), params, 10)
  ref = _numpy_lamb(_flat(params), 10, 1e-2, 0.9, 0.999, 1e-6, 1e-2)
  for k, x in _flat(ours).items():
    np.testing.assert_allclose(np.asarray(x), ref[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_default_masks_exclude_biases_and_norm_parameters():
  params = _resnet_tree()
  tx = optim.lars(1.0, weight_decay=0.1)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  u, state = tx.update(zero, state, params)
  for path, x in jax.tree_util.tree_flatten_with_path(u)[0]:
    p = dict(jax.tree_util.tree_flatten_with_path(params)[0])[path]
    if p.ndim <= 1:
      np.testing.assert_array_equal(x, 0.0)      # No weight decay on biases / BN.
    else:
      assert float(jnp.abs(x).max()) > 0          # Decay (scaled by the ratio) on weights.
  n_weights = sum(p.ndim > 1 for p in jax.tree.leaves(params))
  assert len(optim.trust_ratios(state)) == n_weights


def test_trust_ratio_state_clip_and_zero_norm_policy():
  params = {"w": jnp.full((4, 4), 2.0), "z": jnp.zeros((3, 3)), "u0": jnp.ones((2, 2))}
  grads = {"w": jnp.full((4, 4), 0.5), "z": jnp.ones((3, 3)), "u0": jnp.zeros((2, 2))}
  tx = optim.scale_by_trust_ratio(trust_coefficient=1.0)
  u, s = tx.update(grads, tx.init(params), params)
  assert float(s.trust_ratio["w"]) == pytest.approx(4.0)  # ||w|| / ||g|| = 8 / 2.
  assert float(s.trust_ratio["z"]) == 1.0   # Zero-norm parameter: ratio 1, it can move.
  assert float(s.trust_ratio["u0"]) == 1.0  # Zero update: stays zero.
  np.testing.assert_allclose(u["z"], grads["z"])
  clipped = optim.scale_by_trust_ratio(max_trust_ratio=1.5)
  u, s = clipped.update(grads, clipped.init(params), params)
  assert float(s.trust_ratio["w"]) == 1.5
  np.testing.assert_allclose(u["w"], 1.5 * grads["w"])
  stats = optim.trust_ratio_stats(s)
  assert float(stats["trust_ratio/max"]) == 1.5 and float(stats["trust_ratio/min"]) == 1.0


def test_lamb_grad_prenorm_divides_by_the_global_norm_above_one():
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((2, 4))}
  big = {"a": jnp.full((3, 3), 3.0), "b": jnp.full((2, 4), 4.0)}
  norm = float(jnp.sqrt(9 * 9.0 + 8 * 16.0))
  scaled = jax.tree.map(lambda g: g / norm, big)
  with_pre, _ = _run_once(optim.lamb(0.1, grad_prenorm=True, trust_ratio_mask=True), params, big)
  manual, _ = _run_once(optim.lamb(0.1, trust_ratio_mask=True), params, scaled)
  _assert_trees_close(with_pre, manual)
  small = jax.tree.map(lambda g: g / (10 * norm), big)  # Norm < 1: untouched.
  u, _ = optim.clip_by_global_norm(1.0).update(small, optax.EmptyState())
  _assert_trees_close(u, small, rtol=0, atol=0)


def _run_once(tx, params, grads):
  u, s = tx.update(grads, tx.init(params), params)
  return u, s


def test_tvlars_factor_and_update():
  f = lambda t: float(optim.tvlars_factor(t, decay_rate=0.1, delay_steps=50, alpha=1.0,
                                          min_factor=0.01))
  assert f(0) == pytest.approx(1 / (1 + np.exp(-5)) + 0.01)
  assert f(50) == pytest.approx(0.5 + 0.01)
  assert f(1000) == pytest.approx(0.01, abs=1e-6)
  params = _resnet_tree()
  g = _grads(params, 0)
  tv = optim.tvlars(1.0, decay_rate=0.1, delay_steps=50, momentum=0.0, trust_ratio_mask=True)
  la = optim.lars(1.0, momentum=0.0, trust_ratio_mask=True)
  u_tv, _ = _run_once(tv, params, g)
  u_la, _ = _run_once(la, params, g)
  _assert_trees_close(u_tv, jax.tree.map(lambda x: f(0) * x - 0.01 * x, u_la), rtol=1e-5)


def _sharded_case():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(64, 16)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(32, 8)) * 3, jnp.float32)}
  grads = {"w1": jnp.asarray(rng.normal(size=(64, 16)) * 0.1, jnp.float32),
           "w2": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}
  return mesh, params, grads


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_sharded_params_under_shard_map_with_axis_name(name):
  mesh, params, grads = _sharded_case()
  make = lambda axis: (optim.lars(1.0, weight_decay=1e-3, axis_name=axis) if name == "lars"
                       else optim.lamb(1e-2, weight_decay=1e-2, axis_name=axis))
  ref = optax.apply_updates(params, _run_once(make(None), params, grads)[0])

  def fsdp(tx):
    def step(p, g):
      u, _ = tx.update(g, tx.init(p), p)
      return optax.apply_updates(p, u)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P("data")),
                                 out_specs=P("data")))

  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))
  _assert_trees_close(fsdp(make("data"))(put(params), put(grads)), ref, rtol=1e-6, atol=1e-7)
  # Without the axis each shard uses its own norms: the optax behaviour the issue measured.
  wrong = fsdp(make(None))(put(params), put(grads))
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b, p: float(jnp.abs(a - b).max() / jnp.abs(b - p).max()), wrong, ref, params))
  assert max(diffs) > 0.05


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_sharded_global_arrays_under_jit_need_no_axis(name):
  mesh, params, grads = _sharded_case()
  tx = (optim.lars(1.0, weight_decay=1e-3) if name == "lars"
        else optim.lamb(1e-2, weight_decay=1e-2))
  ref = optax.apply_updates(params, _run_once(tx, params, grads)[0])
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))

  @jax.jit
  def step(p, g):
    u, _ = tx.update(g, tx.init(p), p)
    return optax.apply_updates(p, u)

  out = step(put(params), put(grads))
  assert out["w1"].sharding.spec == P("data")
  _assert_trees_close(out, ref, rtol=1e-6, atol=1e-7)


def test_ema_decay_for_batch():
  assert optim.ema_decay_for_batch(0.999, 4096, 256) == pytest.approx(0.999 ** 16)
  assert optim.ema_decay_for_batch(0.99, 256, 256) == pytest.approx(0.99)
  with pytest.raises(ValueError, match="EMA decay=1.5"):
    optim.ema_decay_for_batch(1.5, 256, 256)
