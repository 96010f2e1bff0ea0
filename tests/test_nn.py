"""effjax.nn on 8 simulated devices: sync, grouped and ghost BatchNorm against flax's own
BatchNorm on the examples each statistic should span; BCN and WS against numpy
re-derivations of Qiao et al.'s equations."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from effjax import nn
from effjax.nn import functional as F
from tests.helpers import assert_trees_close

AXIS = "data"
MOMENTUM = 0.9


def _replicas(fn, mode, n, params, x, *extra):
  """Runs ``fn(params, x_local, *extra_local)`` on n replicas; outputs are stacked [n, ...].

  ``x`` and ``extra`` are split along axis 0; ``params`` is replicated.
  """
  if mode == "pmap":
    split = lambda a: a.reshape((n, -1) + a.shape[1:])
    return jax.pmap(fn, axis_name=AXIS, in_axes=(None,) + (0,) * (1 + len(extra)),
                    devices=jax.devices()[:n])(params, split(x), *map(split, extra))
  mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
  stacked = lambda *a: jax.tree.map(lambda t: t[None], fn(*a))
  return jax.jit(jax.shard_map(stacked, mesh=mesh, in_specs=(P(),) + (P(AXIS),) * (
      1 + len(extra)), out_specs=P(AXIS), check_vma=False))(params, x, *extra)


def _data(batch, shape=(3, 5), seed=0):
  rng = np.random.RandomState(seed)
  x = (rng.randn(batch, *shape) * rng.uniform(0.5, 3, shape[-1]) +
       rng.uniform(-2, 2, shape[-1])).astype(np.float32)
  w = rng.randn(batch, *shape).astype(np.float32)  # Weights of a linear loss.
  return x, w


def _variables(c):
  rng = np.random.RandomState(1)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                     "bias": jnp.asarray(rng.randn(c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.randn(c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}


def _effjax_bn_step(module):
  """Per replica: train-mode output, updated stats, grads of sum(w * y) wrt x and params.

  Parameter gradients are psummed, as a train step's pmean of the per-replica loss
  gradients does (up to the 1/n of the mean)."""
  def fn(variables, x, w):
    def loss(params, x):
      y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(w * y), (y, new["batch_stats"])
    (_, (y, stats)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    return y, stats, jax.lax.psum(gp, AXIS), gx
  return fn


def _flax_reference(variables, chunks, ws):
  """flax.linen.BatchNorm on each chunk on one device: outputs, stats, grads (summed)."""
  ref = fnn.BatchNorm(momentum=MOMENTUM)

  def loss(params, x, w):
    y, new = ref.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                       use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(w * y), (y, new["batch_stats"])
  outs = [jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x, w)
          for x, w in zip(chunks, ws)]
  y = np.concatenate([o[0][1][0] for o in outs])
  stats = jax.tree.map(lambda *s: np.mean(s, 0), *[o[0][1][1] for o in outs])
  gp = jax.tree.map(lambda *g: np.sum(g, 0), *[o[1][0] for o in outs])
  gx = np.concatenate([o[1][1] for o in outs])
  return y, stats, gp, gx


def _check(got, want, n):
  y, stats, gp, gx = got
  ry, rstats, rgp, rgx = want
  np.testing.assert_allclose(y.reshape(ry.shape), ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx.reshape(rgx.shape), rgx, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    # Running averages: equal to the reference and identical on every replica.
    assert stats[k].shape[0] == n
    np.testing.assert_array_equal(stats[k], np.broadcast_to(stats[k][:1], stats[k].shape))
    np.testing.assert_allclose(stats[k][0], rstats[k], rtol=1e-5, atol=1e-5)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(gp[k][0], rgp[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_sync_bn_equals_flax_on_the_global_batch(mode):
  x, w = _data(64)
  v = _variables(5)
  got = _replicas(_effjax_bn_step(nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM)), mode, 8,
                  v, x, w)
  _check(got, _flax_reference(v, [x], [w]), 8)


def test_sync_bn_two_pass_variance_and_feature_axes():
  x, w = _data(32, shape=(4, 6))
  v = _variables(6)
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM, use_fast_variance=False)
  _check(_replicas(_effjax_bn_step(module), "shard_map", 8, v, x, w),
         _flax_reference(v, [x], [w]), 8)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
@pytest.mark.parametrize("n, group_size", [(8, 1), (8, 2), (8, 4), (6, 3), (6, 2)])
def test_grouped_bn_equals_flax_per_group(mode, n, group_size):
  """Power-of-two groups take the ppermute butterfly, 3 of 6 the one-hot psum path."""
  x, w = _data(8 * n)
  v = _variables(5)
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM, group_size=group_size)
  got = _replicas(_effjax_bn_step(module), mode, n, v, x, w)
  size = 8 * group_size
  want = _flax_reference(v, np.split(x, len(x) // size), np.split(w, len(x) // size))
  _check(got, want, n)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
@pytest.mark.parametrize("virtual_batch_size", [2, 4, 8])
def test_ghost_bn_equals_flax_per_chunk(mode, virtual_batch_size):
  x, w = _data(128)
  v = _variables(5)
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM,
                        virtual_batch_size=virtual_batch_size)
  got = _replicas(_effjax_bn_step(module), mode, 8, v, x, w)
  k = len(x) // virtual_batch_size
  _check(got, _flax_reference(v, np.split(x, k), np.split(w, k)), 8)


def test_ghost_bn_without_axis_name_on_one_device():
  x, w = _data(24)
  v = _variables(5)
  y, new = nn.BatchNorm(momentum=MOMENTUM, virtual_batch_size=6).apply(
      v, x, use_running_average=False, mutable=["batch_stats"])
  ry, rstats, _, _ = _flax_reference(v, np.split(x, 4), np.split(w, 4))
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(new["batch_stats"][k], rstats[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_unequal_per_replica_batches_are_weighted_by_count(mode):
  """Replicas with 1..8 real examples of 8 (flax #2417): the statistics are those of the
  concatenated real examples, not an average of per-replica means."""
  x, w = _data(64)
  counts = np.arange(1, 9)
  mask = (np.arange(8)[None, :] < counts[:, None]).reshape(64)
  v = _variables(5)
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM)

  def fn(variables, xl, ml):
    y, new = module.apply(variables, xl, use_running_average=False, mask=ml[:, None, None],
                          mutable=["batch_stats"])
    return y, new["batch_stats"]
  y, stats = _replicas(fn, mode, 8, v, x, mask)
  ry, rnew = fnn.BatchNorm(momentum=MOMENTUM).apply(v, x[mask], use_running_average=False,
                                                    mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(x.shape)[mask], ry, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], np.broadcast_to(rnew["batch_stats"][k], (8, 5)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eval_mode_uses_identical_running_averages(mode):
  """Three train steps of sync BN, then eval: every replica normalizes with the same
  running averages, equal to flax's after the same steps on the global batch."""
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM)
  ref = fnn.BatchNorm(momentum=MOMENTUM)
  v = r = _variables(5)
  for seed in range(3):
    x, _ = _data(64, seed=seed)
    _, stats = _replicas(lambda vv, xl: module.apply(vv, xl, use_running_average=False,
                                                     mutable=["batch_stats"]), mode, 8, v, x)
    np.testing.assert_array_equal(stats["batch_stats"]["var"],
                                  np.broadcast_to(stats["batch_stats"]["var"][:1], (8, 5)))
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a[0],
                                                            stats["batch_stats"])}
    _, rnew = ref.apply(r, x, use_running_average=False, mutable=["batch_stats"])
    r = {"params": r["params"], "batch_stats": rnew["batch_stats"]}
  x, _ = _data(64, seed=9)
  y = _replicas(lambda vv, xl: module.apply(vv, xl, use_running_average=True), mode, 8, v, x)
  np.testing.assert_allclose(y.reshape(x.shape), ref.apply(r, x, use_running_average=True),
                             rtol=1e-5, atol=1e-5)


def test_sync_bn_under_shard_map_with_check_vma():
  """Users' own shard_map (check_vma=True, the default) gives the same outputs."""
  x, w = _data(64)
  v = _variables(5)
  module = nn.BatchNorm(axis_name=AXIS, momentum=MOMENTUM, group_size=2)
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  y = jax.jit(jax.shard_map(lambda vv, xl: module.apply(vv, xl, use_running_average=False,
                                                        mutable=["batch_stats"])[0],
                            mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))(v, x)
  want = _flax_reference(v, np.split(x, 4), np.split(w, 4))[0]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_group_psum_matches_per_group_sums():
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
  for g in (1, 2, 4, 8):
    got = _replicas(lambda _, xl, g=g: nn.group_psum(xl, AXIS, g), "shard_map", 8, 0.0, x)
    want = np.repeat(x.reshape(8 // g, g, 3).sum(1), g, axis=0)
    np.testing.assert_allclose(got.reshape(8, 3), want, rtol=1e-6)
    # Bitwise-identical within a group, so replicas never drift apart.
    for grp in got.reshape(8 // g, g, 3):
      np.testing.assert_array_equal(grp, np.broadcast_to(grp[:1], grp.shape))


def test_bad_sizes_are_clear_errors():
  x = jnp.ones((12, 4))
  with pytest.raises(ValueError, match=r"virtual_batch_size=5 must be a positive divisor of "
                                       r"the per-replica batch of 12"):
    # Init forms no ghost batches (any batch initializes); the first train step checks.
    bn = nn.BatchNorm(virtual_batch_size=5)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  with pytest.raises(ValueError, match=r"group_size=3 must be a positive divisor of the 8"):
    _replicas(lambda v, xl: nn.group_psum(xl, AXIS, 3), "shard_map", 8, 0.0, np.ones((8, 2)))
  with pytest.raises(ValueError, match="not both"):
    F.batch_norm(x, axis_name=AXIS, group_size=2, virtual_batch_size=2)


# ---- Batch-Channel Norm and Weight Standardization (Qiao et al., arXiv:1903.10520) ----

def _np_channel_norm(y, groups, eps):
  n, c = y.shape[0], y.shape[-1]
  yg = y.reshape(n, -1, groups, c // groups)
  mu = yg.mean(axis=(1, 3), keepdims=True)
  var = yg.var(axis=(1, 3), keepdims=True)
  return ((yg - mu) / np.sqrt(var + eps)).reshape(y.shape)


def test_micro_batch_bcn_follows_algorithm_1():
  """Two training steps on 2-example batches, re-derived in numpy: estimates move by r
  toward the batch mean and the squared deviation from the current estimate, x is
  normalized with the updated estimates, affine, then channel-normalized per group."""
  rng = np.random.RandomState(0)
  c, groups, r, eps = 8, 4, 0.1, 1e-5
  module = nn.BatchChannelNorm(num_groups=groups, momentum=1 - r, epsilon=eps)
  x0 = rng.randn(2, 5, 5, c).astype(np.float32)
  v = module.init(jax.random.key(0), x0, use_running_average=False)
  params = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32),
                        v["params"])
  v = {"params": params, "batch_stats": v["batch_stats"]}
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(c))  # init updates nothing
  mu_hat, var_hat = np.zeros(c), np.ones(c)
  p = jax.tree.map(np.asarray, params)
  for step in range(2):
    x = (rng.randn(2, 5, 5, c) * 2 + 1).astype(np.float32)
    y, new = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    mu = x.mean(axis=(0, 1, 2))
    s2 = ((x - mu_hat) ** 2).mean(axis=(0, 1, 2))
    mu_hat = mu_hat + r * (mu - mu_hat)
    var_hat = var_hat + r * (s2 - var_hat)
    xb = (x - mu_hat) / np.sqrt(var_hat + eps) * p["batch_scale"] + p["batch_bias"]
    want = (_np_channel_norm(xb, groups, eps) * np.repeat(p["channel_scale"], c // groups) +
            np.repeat(p["channel_bias"], c // groups))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    np.testing.assert_allclose(new["batch_stats"]["mean"], mu_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], var_hat, rtol=1e-5, atol=1e-6)
    v = {"params": params, "batch_stats": new["batch_stats"]}
  # Eval normalizes with the estimates and leaves them alone.
  y_eval = module.apply(v, x, use_running_average=True)
  xb = (x - mu_hat) / np.sqrt(var_hat + eps) * p["batch_scale"] + p["batch_bias"]
  want = (_np_channel_norm(xb, groups, eps) * np.repeat(p["channel_scale"], c // groups) +
          np.repeat(p["channel_bias"], c // groups))
  np.testing.assert_allclose(y_eval, want, rtol=1e-4, atol=1e-4)


def test_micro_batch_bcn_estimates_average_over_replicas():
  """With axis_name, 8 replicas of 1 example update the estimates as 1 device with 8."""
  rng = np.random.RandomState(3)
  x = (rng.randn(8, 4, 4, 8) + 2).astype(np.float32)
  module = nn.BatchChannelNorm(num_groups=2, axis_name=AXIS)
  v = module.init(jax.random.key(0), x[:1], use_running_average=False)
  y, new = _replicas(lambda vv, xl: module.apply(vv, xl, use_running_average=False,
                                                 mutable=["batch_stats"]), "shard_map", 8, v, x)
  ry, rnew = nn.BatchChannelNorm(num_groups=2).apply(v, x, use_running_average=False,
                                                     mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(x.shape), ry, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(new["batch_stats"][k],
                               np.broadcast_to(rnew["batch_stats"][k], (8, 8)), rtol=1e-5)


def test_large_batch_bcn_is_bn_then_group_norm():
  rng = np.random.RandomState(4)
  x = rng.randn(16, 3, 3, 8).astype(np.float32)
  module = nn.BatchChannelNorm(num_groups=4, estimated_statistics=False)
  v = module.init(jax.random.key(0), x, use_running_average=False)
  y, _ = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  bn = fnn.BatchNorm(use_running_average=False).apply(
      {"params": v["params"]["batch_norm"], "batch_stats": v["batch_stats"]["batch_norm"]}, x,
      mutable=["batch_stats"])[0]
  gn = fnn.GroupNorm(num_groups=4, use_scale=False, use_bias=False).apply({}, bn)
  np.testing.assert_allclose(y, gn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(F.channel_norm(bn, 4), gn, rtol=1e-5, atol=1e-5)


def test_weight_standardization_equation():
  """Eq. 5 of Qiao et al.: per output channel, W' = (W - mean) / sqrt(var + eps) over the
  fan-in; NF-ResNet scaling divides by sqrt(fan_in * var) instead."""
  w = np.random.RandomState(5).randn(3, 3, 4, 6).astype(np.float32) * 0.3 + 0.1
  flat = w.reshape(-1, 6)
  mu, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(F.standardize_weight(w), (w - mu) / np.sqrt(var + 1e-5),
                             rtol=1e-5, atol=1e-6)
  ws = np.asarray(F.standardize_weight(w)).reshape(-1, 6)
  np.testing.assert_allclose(ws.mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(ws.var(0), 1, rtol=1e-3)
  scaled = np.asarray(F.standardize_weight(w, scaled=True))
  np.testing.assert_allclose(scaled, (w - mu) / np.sqrt(np.maximum(36 * var, 1e-4)),
                             rtol=1e-5, atol=1e-6)
  # Scaled WS keeps the variance of unit-variance inputs: sum of squares per output == 1.
  np.testing.assert_allclose((scaled.reshape(-1, 6) ** 2).sum(0), 1, rtol=1e-3)


@pytest.mark.parametrize("kw", [dict(), dict(strides=2), dict(padding="VALID"),
                                dict(padding=[(2, 0), (1, 1)], kernel_dilation=2),
                                dict(feature_group_count=2), dict(scaled=True)])
def test_ws_conv_equals_conv_with_the_standardized_kernel(kw):
  rng = np.random.RandomState(6)
  x = rng.randn(2, 9, 9, 4).astype(np.float32)
  ws = nn.WSConv(6, (3, 3), **kw)
  v = ws.init(jax.random.key(0), x)
  conv_kw = {k: a for k, a in kw.items() if k != "scaled"}
  conv = fnn.Conv(6, (3, 3), **conv_kw)

  def ref(params, x):
    kernel = F.standardize_weight(params["kernel"], scaled=kw.get("scaled", False))
    if "gain" in params:
      kernel = kernel * params["gain"]
    return conv.apply({"params": {"kernel": kernel, "bias": params["bias"]}}, x)
  np.testing.assert_allclose(ws.apply(v, x), ref(v["params"], x), rtol=1e-5, atol=1e-5)
  # Gradients flow through the standardization to the raw kernel.
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))
  g = jax.grad(loss(lambda p, x: ws.apply({"params": p}, x)))(v["params"])
  g_ref = jax.grad(loss(ref))(v["params"])
  assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-5)
  # The standardized kernel makes the layer invariant to the raw kernel's scale and shift.
  moved = dict(v["params"], kernel=v["params"]["kernel"] * 7.0 + 0.5)
  np.testing.assert_allclose(ws.apply({"params": moved}, x), ws.apply(v, x), rtol=1e-3,
                             atol=1e-3)


def _collectives(jaxpr) -> int:
  text = str(jaxpr)
  return sum(text.count(f" {p}[") for p in ("psum", "psum_invariant", "ppermute",
                                            "all_gather", "all_reduce"))


@pytest.mark.parametrize("group_size", [None, 2])
def test_bn_variance_is_accurate_at_mean_over_std_2000(group_size):
  """x = 100 + 0.05 N(0, 1) (|mean|/std = 2000) on 8 replicas of 8 rows: once the running
  mean has tracked the activations (200 train steps from init), the batch variance that
  feeds the running average is within 1e-3 of the float64 value, under sync and grouped
  statistics, with the same number of collectives as before. The plain one-pass
  E[x^2] - E[x]^2 (flax's, and effjax's with use_running_mean_shift=False) is far off."""
  rng = np.random.RandomState(0)
  x = (100.0 + 0.05 * rng.randn(64, 4)).astype(np.float32)
  def tracked(shift: bool):
    bn = nn.BatchNorm(axis_name=AXIS, group_size=group_size, momentum=MOMENTUM,
                      use_running_mean_shift=shift)
    variables = bn.init(jax.random.key(0), x[:8], use_running_average=False)

    def track(v, xl):
      def body(_, stats):
        _, new = bn.apply({"params": v["params"], "batch_stats": stats}, xl,
                          use_running_average=False, mutable=["batch_stats"])
        return new["batch_stats"]
      return jax.lax.fori_loop(0, 200, body, v["batch_stats"])
    return _replicas(track, "shard_map", 8, variables, x)
  stats = tracked(shift=True)
  x64 = x.astype(np.float64).reshape(8 // (group_size or 8), -1, 4)
  want = x64.var(axis=1).mean(0)  # Each group's variance; equal group sizes.
  np.testing.assert_array_equal(stats["var"], np.broadcast_to(stats["var"][:1], (8, 4)))
  np.testing.assert_allclose(stats["var"][0], want, rtol=1e-3)

  def one_pass(xl, shift):
    return F.batch_norm(xl, axis_name=AXIS, group_size=group_size, shift=shift)[2]
  plain = _replicas(lambda _, xl: one_pass(xl, None), "shard_map", 8, {}, x)[0]
  assert np.max(np.abs(plain / want - 1)) > 1e-2  # The defect the shift removes.
  # Without the shift the module keeps that defect in its running variance.
  assert np.max(np.abs(tracked(shift=False)["var"][0] / want - 1)) > 1e-2
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  count = lambda shift: _collectives(jax.make_jaxpr(jax.shard_map(
      lambda xl: one_pass(xl, shift), mesh=mesh, in_specs=P(AXIS), out_specs=P(),
      check_vma=False))(x))
  assert count(stats["mean"][0]) == count(None) >= 1


def test_ghost_bn_initializes_in_train_mode_with_any_batch():
  """Ghost BN's chunks are not formed during init, so one example initializes it, with
  the variables flax's BatchNorm would make."""
  for bn in (nn.BatchNorm(use_running_average=False, virtual_batch_size=4),
             nn.BatchNorm(use_running_average=False, virtual_batch_size=4, axis_name=AXIS)):
    v = bn.init(jax.random.key(0), jnp.zeros((1, 3)))
    ref = fnn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.zeros((1, 3)))
    assert jax.tree.structure(v) == jax.tree.structure(ref)
    jax.tree.map(np.testing.assert_array_equal, v, ref)
