"""Contrastive losses with global negatives (NT-Xent, SigLIP's sigmoid loss and its ring),
the mnist1d views, and the contrastive task end to end (8 simulated devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import effjax
from effjax import losses, steps, trainer
from effjax.data import preprocess
from effjax.parallel import DATA_AXIS, Runner
from effjax.tasks import contrastive
from tests.helpers import assert_trees_close, contrastive_config

B, D, E = 64, 12, 8  # Global batch, input and embedding widths of the loss tests.


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return ({"w": jax.random.normal(k[0], (D, E)), "scale": jnp.log(10.0),
           "bias": jnp.asarray(-10.0)},
          jax.random.normal(k[1], (B, D)), jax.random.normal(k[2], (B, D)))


def _mean_loss(p, x1, x2, loss, axis_name, impl="ring"):
  """This replica's mean loss of a linear encoder ``w`` on the two sides."""
  z1, z2 = x1 @ p["w"], x2 @ p["w"]
  if loss == "nt_xent":
    return jnp.mean(losses.nt_xent(z1, z2, 0.2, axis_name=axis_name))
  return jnp.mean(losses.sigmoid_loss(z1, z2, p["scale"], p["bias"], axis_name=axis_name,
                                      impl=impl))


def _per_replica(launcher, loss, impl, axis_name):
  """``(loss, grads)`` pmean-ed over 8 replicas, each differentiating its own mean.
  ``shard_map_vma``: with ``check_vma=True``, the parameters made per-replica first (as
  ``steps.as_per_replica`` does)."""
  vma = launcher == "shard_map_vma"

  def f(p, x1, x2):
    if vma:
      p = jax.tree.map(lambda v: jax.lax.pcast(v, DATA_AXIS, to="varying"), p)
    out = jax.value_and_grad(_mean_loss)(p, x1, x2, loss, axis_name, impl)
    return jax.lax.pmean(out, DATA_AXIS)
  if launcher == "pmap":
    fn = jax.pmap(f, axis_name=DATA_AXIS, in_axes=(None, 0, 0))
    return lambda p, x1, x2: jax.tree.map(lambda v: v[0], fn(
        p, x1.reshape(8, -1, D), x2.reshape(8, -1, D)))
  mesh = jax.make_mesh((8,), (DATA_AXIS,))
  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                             out_specs=P(), check_vma=vma))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS)))
  return lambda p, x1, x2: fn(p, put(x1), put(x2))


@pytest.mark.parametrize("loss, impl", [("nt_xent", "ring"), ("sigmoid", "ring"),
                                        ("sigmoid", "all_gather")])
@pytest.mark.parametrize("launcher", ["shard_map", "shard_map_vma", "pmap"])
def test_global_negatives_equal_one_device_holding_the_batch(launcher, loss, impl):
  """Loss and gradients (encoder, SigLIP's scale and bias) on 8 replicas equal those of
  one device holding the global batch; with each replica's own negatives they differ."""
  params, x1, x2 = _params()
  ref_loss, ref_grads = jax.value_and_grad(_mean_loss)(params, x1, x2, loss, None)
  got_loss, got_grads = _per_replica(launcher, loss, impl, DATA_AXIS)(params, x1, x2)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  assert_trees_close(got_grads, ref_grads, f"{launcher} {loss} {impl}", rtol=2e-4, atol=1e-6)
  local_loss, local_grads = _per_replica(launcher, loss, impl, None)(params, x1, x2)
  assert abs(float(local_loss) - float(ref_loss)) > 0.1
  assert float(jnp.max(jnp.abs(local_grads["w"] - ref_grads["w"]))) > 1e-3


def test_losses_match_numpy_definitions():
  """NT-Xent and the sigmoid loss re-derived in numpy from the papers' formulas."""
  params, x1, x2 = _params()
  z1, z2 = np.asarray(x1 @ params["w"]), np.asarray(x2 @ params["w"])
  n1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  n2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  z = np.concatenate([n1, n2])
  sim = z @ z.T / 0.2
  expect = []
  for i in range(2 * B):
    j = (i + B) % (2 * B)
    others = [sim[i, k] for k in range(2 * B) if k != i]
    expect.append(-sim[i, j] + np.log(np.sum(np.exp(others))))
  np.testing.assert_allclose(losses.nt_xent(z1, z2, 0.2), expect, rtol=1e-5)
  logits = 10.0 * n1 @ n2.T - 10.0
  labels = 2 * np.eye(B) - 1
  expect = np.sum(np.log1p(np.exp(-labels * logits)), axis=1)
  np.testing.assert_allclose(losses.sigmoid_loss(z1, z2, np.log(10.0), -10.0), expect,
                             rtol=1e-5)


def _ring_temp_bytes(n, b, impl):
  """Temporary bytes per device of the compiled sigmoid-loss gradient on ``n`` devices."""
  mesh = jax.make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n])
  fn = lambda p, x1, x2: jax.lax.pmean(jax.grad(_mean_loss)(p, x1, x2, "sigmoid", DATA_AXIS,
                                                            impl), DATA_AXIS)
  arg = jax.ShapeDtypeStruct((n * b, 32), jnp.float32,
                             sharding=NamedSharding(mesh, P(DATA_AXIS)))
  params = {"w": jnp.zeros((32, 32)), "scale": 0.0, "bias": 0.0}
  compiled = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                                   out_specs=P(), check_vma=False)).lower(params, arg, arg).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_sigmoid_ring_memory_grows_with_b_not_with_the_global_batch():
  """From the compiled step's memory analysis: at b = 256 per device, the ring's
  temporaries are the same on 4 and 8 devices (B = 1024, 2048) and grow when b doubles;
  the all-gather version's grow with B."""
  ring4, ring8, ring4_2b = (_ring_temp_bytes(4, 256, "ring"), _ring_temp_bytes(8, 256, "ring"),
                            _ring_temp_bytes(4, 512, "ring"))
  assert ring8 <= 1.05 * ring4, (ring4, ring8)
  assert ring4_2b > 2.5 * ring4, (ring4, ring4_2b)  # b x b blocks: ~4x.
  gather4, gather8 = _ring_temp_bytes(4, 256, "all_gather"), _ring_temp_bytes(8, 256, "all_gather")
  assert gather8 > 1.7 * gather4, (gather4, gather8)
  assert ring8 < 0.5 * gather8, (ring8, gather8)


def test_mnist1d_views_are_mnist1d_transforms_and_replay_per_row():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 40)).astype(np.float32)
  gens = lambda: [np.random.default_rng([7, i]) for i in range(6)]
  a1, a2 = [preprocess.mnist1d_view(x, g) for g in [gens()] * 2]
  b1 = preprocess.mnist1d_view(x, gens())
  np.testing.assert_array_equal(a1, b1)          # Same generators, same view.
  assert np.abs(a1 - a2).mean() > 0.05           # The second draw is another view.
  # A row's view depends on its own generator only, not on the rest of the batch.
  alone = preprocess.mnist1d_view(x[3:4], [np.random.default_rng([7, 3])])
  np.testing.assert_array_equal(alone[0], b1[3])
  # With the noise and scale off, a view is mnist1d's circular translation and shear.
  view = preprocess.mnist1d_view(x, gens(), scale_coeff=0.0, corr_noise_scale=0.0,
                                 iid_noise_scale=0.0, shear_scale=0.0)
  for i, g in enumerate(gens()):
    shift = int(np.asarray([g.random(), g.integers(-8, 9)])[1])
    np.testing.assert_allclose(view[i], np.roll(x[i], shift), rtol=1e-6)


def _setup(data_dir, runner, **overrides):
  config = contrastive_config(data_dir, **overrides)
  return trainer.build(config, runner=runner, with_data=False), config


def _two_steps(setup, config, runner, batch):
  fn = runner.compile(trainer.make_train_step(config, task=setup.task))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  for _ in range(2):
    state, metrics = fn(state, runner.shard_batch(batch))
  return runner.to_host(metrics), jax.device_get(runner.unreplicate(state).params)


@pytest.mark.parametrize("loss", ["nt_xent", "sigmoid"])
def test_contrastive_step_on_8_replicas_equals_one_device(data_dir, loss):
  """Two LARS steps of the contrastive task with sync BN: 8 replicas equal one device
  holding the global batch (parameters, loss, alignment); local negatives differ."""
  one = Runner("shard_map", jax.sharding.Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,)))
  eight = Runner("shard_map")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 40)).astype(np.float32)
  setup, config = _setup(data_dir, eight, **{"contrastive.loss": loss})
  batch = setup.task.preprocess({"input": x}, [np.random.default_rng(i) for i in range(64)],
                                True)
  m8, p8 = _two_steps(setup, config, eight, batch)
  setup1, config1 = _setup(data_dir, one, **{"contrastive.loss": loss})
  m1, p1 = _two_steps(setup1, config1, one, batch)
  assert_trees_close(p8, p1, f"{loss}: 8 replicas vs one device", rtol=2e-4, atol=2e-6)
  for k in ("train/loss", "train/alignment", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  local, config_l = _setup(data_dir, eight, **{"contrastive.loss": loss,
                                               "contrastive.negatives": "local"})
  ml, _ = _two_steps(local, config_l, eight, batch)
  assert abs(ml["train/loss"] - m1["train/loss"]) > 0.05


def test_probes_fit_labels_they_can_and_not_others():
  """The linear probe and kNN: near-perfect on separable features, chance on noise."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 800)
  centers = rng.standard_normal((4, 16)) * 4
  feats = centers[y] + rng.standard_normal((800, 16))
  args = (feats[:600], y[:600], feats[600:], y[600:])
  assert contrastive.linear_probe_accuracy(*args) > 0.97
  assert contrastive.knn_accuracy(*args) > 0.97
  noise = rng.standard_normal((800, 16))
  args = (noise[:600], y[:600], noise[600:], y[600:])
  assert contrastive.linear_probe_accuracy(*args) < 0.45
  assert contrastive.knn_accuracy(*args) < 0.45


def test_simclr_small_beats_the_raw_signal_probe(data_dir, tmp_path):
  """A short SimCLR run end to end: the frozen features' linear probe beats the same probe
  on the raw signals, kNN is well above chance, and labels never reach a train batch."""
  config = contrastive_config(data_dir, num_epochs=4.0,
                              **{"optimizer.base_learning_rate": 4.8})  # The tuned LR.
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  raw = summary["baseline/raw_linear_probe_accuracy"]
  assert summary["eval/linear_probe_accuracy"] > raw + 0.3, summary  # 0.778 vs 0.303.
  assert summary["eval/knn_accuracy"] > 0.5, summary  # 0.676; chance is 0.1.
  assert summary["eval/count"] == 1000
  setup = trainer.build(config, runner=Runner("shard_map"))
  train_pre, _ = trainer.preprocess_fns(config, setup.spec, setup.task)
  batch = train_pre(setup.train_source.gather(np.arange(8)),
                    [np.random.default_rng(i) for i in range(8)])
  assert sorted(batch) == ["view1", "view2"]


def test_contrastive_config_errors_are_one_line(data_dir):
  for overrides, needle in [({"contrastive.negatives": "nearby"}, "contrastive.negatives"),
                            ({"contrastive.loss": "triplet"}, "contrastive.loss"),
                            ({"contrastive.probe_examples": 10**6}, "probe_examples"),
                            ({"model.name": "cnn1d"}, "cnn1d_contrastive"),
                            ({"noise_scale.enabled": True}, "accum_steps >= 2")]:
    with pytest.raises(effjax.ConfigError, match=needle) as e:
      effjax.validate(contrastive_config(data_dir, **overrides), 8)
    assert "\n" not in str(e.value)
