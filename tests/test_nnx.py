"""effjax.nnx: the NNX batch-statistics layers against flax.nnx.BatchNorm and effjax's linen
modules, on 8 simulated devices under shard_map."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import effjax
import effjax.nnx
from effjax.parallel import DATA_AXIS
from tests.helpers import REPO, assert_trees_close

N, PER, C = 8, 8, 6  # Devices, examples per device, features.
MESH = jax.make_mesh((N,), (DATA_AXIS,))


def _x():
  # Feature means far from 0 and a spatial axis.
  x = np.random.default_rng(0).standard_normal((N * PER, 3, C)).astype(np.float32)
  return (x * np.arange(1, C + 1) + 5.0).astype(np.float32)


def _shard_map_train(module, x):
  """One train-mode call of an NNX module on 8 replicas: the global output, and each
  replica's running statistics stacked ``[N, ...]``."""
  graphdef, state = nnx.split(module)

  def f(state, x):
    m = nnx.merge(graphdef, state)
    y = m(x)
    stats = nnx.state(m, nnx.BatchStat)
    return y, jax.tree.map(lambda s: s[None], stats)

  fn = jax.jit(jax.shard_map(f, mesh=MESH, in_specs=(P(), P(DATA_AXIS)),
                             out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False))
  y, stats = fn(state, jax.device_put(x, NamedSharding(MESH, P(DATA_AXIS))))
  return np.asarray(y), jax.tree.map(np.asarray, nnx.to_pure_dict(stats))


def _flax_reference(x, chunk):
  """flax.nnx.BatchNorm run separately on each chunk of ``chunk`` consecutive examples:
  the outputs, and the mean of the chunks' running statistics."""
  ys, means, vars_ = [], [], []
  for start in range(0, len(x), chunk):
    bn = nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    ys.append(np.asarray(bn(x[start:start + chunk])))
    means.append(np.asarray(bn.mean[...]))
    vars_.append(np.asarray(bn.var[...]))
  return np.concatenate(ys), {"mean": np.mean(means, 0), "var": np.mean(vars_, 0)}


@pytest.mark.parametrize("kind, options, chunk", [
    ("sync", {"axis_name": DATA_AXIS}, N * PER),
    ("grouped", {"axis_name": DATA_AXIS, "group_size": 2}, 2 * PER),
    ("ghost", {"axis_name": DATA_AXIS, "virtual_batch_size": 4}, 4),
])
def test_nnx_batchnorm_equals_flax_nnx_on_the_matching_slices(kind, options, chunk):
  """Outputs equal flax.nnx.BatchNorm over the global batch / each group's examples /
  each ghost chunk; the running statistics are the same on every replica and equal the
  count-weighted mean of those slices' statistics; without axis_name (per-device BN) the
  outputs differ."""
  x = _x()
  y, stats = _shard_map_train(effjax.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0),
                                                   **options), x)
  ref_y, ref_stats = _flax_reference(x, chunk)
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4, err_msg=kind)
  for name in ("mean", "var"):
    per_replica = stats[name]
    assert per_replica.shape == (N, C)
    np.testing.assert_array_equal(per_replica, np.broadcast_to(per_replica[0], (N, C)))
    np.testing.assert_allclose(per_replica[0], ref_stats[name], rtol=1e-5, err_msg=name)
  local_y, _ = _shard_map_train(effjax.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0)), x)
  if kind != "ghost":  # (Ghost chunks are within a device; there the wrong one is sync.)
    assert np.abs(local_y - y).max() > 0.05
  else:
    assert np.abs(_flax_reference(x, N * PER)[0] - y).max() > 0.05


@pytest.mark.parametrize("options", [{"axis_name": DATA_AXIS},
                                     {"axis_name": DATA_AXIS, "group_size": 4},
                                     {"axis_name": DATA_AXIS, "virtual_batch_size": 2}])
def test_nnx_batchnorm_equals_effjax_linen_batchnorm(options):
  x = _x()
  y, stats = _shard_map_train(effjax.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0),
                                                   **options), x)
  linen = effjax.nn.BatchNorm(use_running_average=False, momentum=0.9, **options)
  variables = linen.init(jax.random.key(0), x[:1])

  def f(v, xs):
    out, new = linen.apply(v, xs, mutable=["batch_stats"])
    return out, jax.tree.map(lambda s: s[None], new["batch_stats"])

  fn = jax.jit(jax.shard_map(f, mesh=MESH, in_specs=(P(), P(DATA_AXIS)),
                             out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False))
  ly, lstats = fn(variables, jax.device_put(x, NamedSharding(MESH, P(DATA_AXIS))))
  np.testing.assert_allclose(y, ly, rtol=1e-6, atol=1e-6)
  assert_trees_close(stats, jax.tree.map(np.asarray, dict(lstats)), "stats", rtol=1e-6)


def test_nnx_state_filters_and_eval_mode():
  """``scale``/``bias`` are nnx.Param, ``mean``/``var`` nnx.BatchStat (as nnx.BatchNorm);
  a ``mask`` keeps rows out of the statistics as nnx.BatchNorm's does; ``eval()`` normalizes with the running averages and leaves them unchanged."""
  bn = effjax.nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  ref = nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  for f in (nnx.Param, nnx.BatchStat):
    assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(bn, f))) ==
            jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(ref, f))))
  x = _x()[:16]
  mask = np.broadcast_to((np.arange(16) % 3 != 0)[:, None, None], x.shape)
  np.testing.assert_allclose(bn(x, mask=mask), ref(x, mask=mask), rtol=1e-4, atol=1e-4)
  assert_trees_close(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)),
                     nnx.to_pure_dict(nnx.state(ref, nnx.BatchStat)), "masked", rtol=1e-5)
  bn.eval(), ref.eval()
  before = nnx.to_pure_dict(nnx.clone(nnx.state(bn, nnx.BatchStat)))
  np.testing.assert_allclose(bn(x), ref(x), rtol=1e-4, atol=1e-4)
  assert_trees_close(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)), before, "eval", rtol=0)


def test_nnx_wsconv_and_bcn_equal_the_linen_modules():
  """Given the same parameters, effjax.nnx.WSConv and BatchChannelNorm (both statistics
  modes, over the global batch on 8 replicas) compute what the linen modules do."""
  x = _x()
  conv = effjax.nnx.WSConv(C, 4, 3, scaled=True, rngs=nnx.Rngs(1))
  lconv = effjax.nn.WSConv(4, (3,), scaled=True)
  lparams = {"params": {"kernel": conv.kernel[...], "bias": conv.bias[...],
                        "gain": conv.gain[...]}}
  np.testing.assert_allclose(conv(x), lconv.apply(lparams, x), rtol=1e-5, atol=1e-5)
  for estimated in (True, False):
    bcn = effjax.nnx.BatchChannelNorm(C, num_groups=3, estimated_statistics=estimated,
                                      axis_name=DATA_AXIS, rngs=nnx.Rngs(0))
    y, stats = _shard_map_train(bcn, x)
    linen = effjax.nn.BatchChannelNorm(num_groups=3, estimated_statistics=estimated,
                                       axis_name=DATA_AXIS, use_running_average=False)
    v = linen.init(jax.random.key(0), x[:1])
    fn = jax.jit(jax.shard_map(
        lambda v, xs: linen.apply(v, xs, mutable=["batch_stats"])[0], mesh=MESH,
        in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS), check_vma=False))
    ly = fn(v, jax.device_put(x, NamedSharding(MESH, P(DATA_AXIS))))
    np.testing.assert_allclose(y, ly, rtol=1e-5, atol=1e-5, err_msg=f"estimated={estimated}")
    leaves = jax.tree.leaves(stats)
    assert leaves and all(np.array_equal(s, np.broadcast_to(s[0], s.shape)) for s in leaves)


def test_import_effjax_does_not_import_nnx():
  code = ("import sys, effjax; assert 'effjax.nnx' not in sys.modules; "
          "assert 'flax.nnx' not in sys.modules, 'flax.nnx'; import effjax.nnx; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert out.stdout.strip() == "ok", out.stderr[-2000:]
