"""The gradient noise scale (McCandlish et al., arXiv:1812.06162) and gradient
accumulation, on 8 simulated devices."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import effjax
from effjax import data as data_lib
from effjax import stats, steps, trainer
from tests.helpers import tiny_config


def test_noise_scale_matches_least_squares_in_closed_form():
  """Least squares on Gaussian data, l = (x.w - y)^2 / 2 with x ~ N(0, I_d) and
  y = x.w* + N(0, s^2): at w = w* + r the per-example gradient x(x.r - e) has mean r and
  covariance r r^T + (|r|^2 + s^2) I, so B_simple = (|r|^2 + d(|r|^2 + s^2)) / |r|^2.
  Replicas hold the small batches, the all-reduce gives the big one, as in train_step."""
  d, s, per_replica, n, num_steps, decay = 10, 0.5, 16, 8, 300, 0.99
  r = jnp.ones((d,)) / np.sqrt(d)  # |r| = 1.
  expected = (1.0 + d * (1.0 + s ** 2)) / 1.0
  mesh = Mesh(np.array(jax.devices()), ("data",))

  def per_replica_step(state, key):
    key = jax.random.fold_in(key[0], jax.lax.axis_index("data"))
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (per_replica, d))
    e = s * jax.random.normal(ke, (per_replica,))
    grad = jax.grad(lambda r: 0.5 * jnp.mean((x @ r - e) ** 2))(r)
    small = jax.lax.pmean(jnp.sum(grad ** 2), "data")
    big = jnp.sum(jax.lax.pmean(grad, "data") ** 2)
    g2, trace = stats.noise_scale_from_norms(small, big, per_replica, per_replica * n)
    return stats.update_noise_scale(state, g2, trace, decay)

  step = jax.jit(jax.shard_map(per_replica_step, mesh=mesh, in_specs=(P(), P()),
                               out_specs=P(), check_vma=False))
  state = stats.init_noise_scale()
  keys = jax.random.split(jax.random.key(0), num_steps)
  trace_sum = g2_sum = 0.0
  for i, k in enumerate(keys):
    state = step(state, k[None])
    if i >= 100:  # After the EMA has warmed up.
      m = stats.noise_scale_metrics(state, decay)
      trace_sum += float(m["noise_scale/trace_sigma"])
      g2_sum += float(m["noise_scale/g2"])
  m = stats.noise_scale_metrics(state, decay)
  assert float(m["noise_scale/b_simple"]) == pytest.approx(expected, rel=0.1)
  assert trace_sum / g2_sum == pytest.approx(expected, rel=0.1)
  assert g2_sum / 200 == pytest.approx(1.0, rel=0.1)  # |G|^2 = |r|^2.


def test_estimates_are_unbiased_for_exact_norms():
  """With the expected squared norms |G|^2 + tr/B plugged in, the formulas invert exactly."""
  g2, tr = 2.5, 40.0
  small, big = g2 + tr / 8, g2 + tr / 256
  got = stats.noise_scale_from_norms(small, big, 8, 256)
  np.testing.assert_allclose(got, (g2, tr), rtol=1e-12)
  with pytest.raises(ValueError, match="0 < batch_small < batch_big"):
    stats.noise_scale_from_norms(small, big, 8, 8)


def _setup_and_batches(config, n_steps, runner=None):
  setup = trainer.build(config, runner=runner)
  pre, _ = trainer.preprocess_fns(config, setup.spec)
  it = iter(data_lib.train_dataset(setup.train_source, pre,
                                   global_batch_size=config.batch_size, seed=0))
  return setup, [next(it) for _ in range(n_steps)]


def _train(config, batches, setup=None):
  setup = setup or trainer.build(config)
  runner = setup.runner
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  fn = runner.compile(trainer.make_train_step(config))
  history = []
  for b in batches:
    state, m = fn(state, runner.shard_batch(b))
    history.append(runner.to_host(m))
  return jax.device_get(runner.unreplicate(state).items()), history


@pytest.mark.parametrize("norm, loop", [("layer", "scan"), ("layer", "unroll"),
                                        ("none", "scan")])
def test_accumulation_equals_one_step_on_the_whole_batch(data_dir, norm, loop):
  base = tiny_config(data_dir, **{"model.norm": norm})
  _, batches = _setup_and_batches(base, 3)
  one, h1 = _train(base, batches)
  acc, h4 = _train(tiny_config(data_dir, accum_steps=4, accum_loop=loop,
                               **{"model.norm": norm}), batches)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(acc["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h1[0]["train/loss"], h4[0]["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(h1[0]["grad_norm"], h4[0]["grad_norm"], rtol=1e-6)


def test_accumulation_with_sync_bn_normalizes_each_global_microbatch(data_dir):
  """accum_steps=2, sync BN, 8 replicas of 16: microbatch j is rows [8j, 8j+8) of every
  replica; its statistics span those 64 examples, and the running averages are updated
  once per microbatch, in order. Reference: plain BN on one device, microbatch by
  microbatch, gradients averaged."""
  config = tiny_config(data_dir, accum_steps=2, **{"model.norm": "sync_batch"})
  setup, batches = _setup_and_batches(config, 1)
  got, _ = _train(config, batches, setup)

  ref_model = effjax.models.create_model(tiny_config(data_dir).model, setup.spec.num_classes)
  state = setup.state
  batch = batches[0]
  rows = np.arange(128).reshape(8, 2, 8)  # replica, microbatch, row
  stats_, grads = state.batch_stats, []
  for j in range(2):
    mb = jax.tree.map(lambda x, j=j: x[rows[:, j].reshape(-1)], batch)

    def loss_fn(p, bs=stats_, mb=mb):
      logits, new = ref_model.apply({"params": p, "batch_stats": bs}, mb["input"], train=True,
                                    mutable=["batch_stats"])
      return steps.cross_entropy(logits, mb["label"]).mean(), new["batch_stats"]
    (_, stats_), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads.append(g)
  g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  upd, _ = state.tx.update(g, state.opt_state, state.params)
  params = optax.apply_updates(state.params, upd)
  for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(stats_)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_train_step_noise_scale_is_the_estimator_on_its_gradients(data_dir, accum_steps):
  """The step's noise_scale metrics equal the estimator applied to per-replica (and
  per-microbatch) gradients computed here on one device."""
  config = tiny_config(data_dir, accum_steps=accum_steps,
                       **{"model.norm": "layer", "noise_scale.enabled": True,
                          "noise_scale.decay": 0.5})
  setup, batches = _setup_and_batches(config, 2)
  _, hist = _train(config, batches, setup)

  state = setup.state
  grad_fn = jax.jit(jax.grad(lambda p, x, y: steps.cross_entropy(
      state.apply_fn({"params": p}, x, train=True), y).mean()))
  ema = stats.init_noise_scale()
  params = state.params
  for k, batch in enumerate(batches):
    small = []
    for rows in np.arange(128).reshape(8 * accum_steps, -1):
      g = grad_fn(params, batch["input"][rows], batch["label"][rows])
      small.append(float(optax.tree.norm(g, squared=True)))
    big_grad = grad_fn(params, batch["input"], batch["label"])
    g2, tr = stats.noise_scale_from_norms(np.mean(small),
                                          float(optax.tree.norm(big_grad, squared=True)),
                                          128 // (8 * accum_steps), 128)
    ema = stats.update_noise_scale(ema, g2, tr, 0.5)
    want = stats.noise_scale_metrics(ema, 0.5)
    for key, value in want.items():
      np.testing.assert_allclose(hist[k][key], value, rtol=2e-3, err_msg=f"step {k} {key}")
    upd, opt = state.tx.update(big_grad, state.opt_state, params)
    params = optax.apply_updates(params, upd)
    state = state.replace(opt_state=opt)


def test_noise_scale_is_disabled_once_on_one_device_without_microbatches(data_dir, caplog):
  config = tiny_config(data_dir, **{"noise_scale.enabled": True})
  runner = effjax.Runner("shard_map", effjax.make_mesh(jax.devices()[:1]))
  with caplog.at_level(logging.WARNING):
    setup = trainer.build(config, runner=runner)
  assert setup.state.noise_scale == {}
  assert sum("noise_scale.enabled is ignored" in r.getMessage() for r in caplog.records) == 1
  # With microbatches one device has two batch sizes, and the estimate is on.
  setup = trainer.build(tiny_config(data_dir, accum_steps=2, **{"noise_scale.enabled": True}),
                        runner=runner)
  assert isinstance(setup.state.noise_scale, stats.NoiseScaleState)


def test_next_multiplier_grows_by_powers_of_two_within_bounds():
  nm = effjax.adaptive.next_multiplier
  assert nm(1, 300.0, 128, 1.0, 4096) == 2      # 300 / 128 -> 2
  assert nm(1, 1100.0, 128, 1.0, 4096) == 8     # 1100 / 128 -> 8
  assert nm(1, 1100.0, 128, 2.0, 4096) == 16    # the multiple
  assert nm(1, 1e6, 128, 1.0, 1000) == 4        # 4 * 128 <= 1000 < 8 * 128
  assert nm(8, 300.0, 128, 1.0, 4096) == 8      # never shrinks
  for bad in (float("nan"), float("inf"), -5.0, 0.0):
    assert nm(2, bad, 128, 1.0, 4096) == 2
  assert effjax.adaptive.lr_factor(4, "linear") == 4.0
  assert effjax.adaptive.lr_factor(4, "sqrt") == 2.0


def _adaptive_config(data_dir, **overrides):
  return tiny_config(data_dir, num_epochs=3.0, log_every=1, batch_schedule="adaptive",
                     **{"noise_scale.enabled": True, "noise_scale.decay": 0.9,
                        "adaptive.multiple": 10.0, "adaptive.max_batch_size": 512,
                        "adaptive.max_learning_rate": 0.3,
                        "checkpoint.every_steps": 16, **overrides})


def _final_items(workdir, config):
  setup = trainer.build(config)
  ck = effjax.checkpoint.Checkpointer(f"{workdir}/checkpoints")
  items, _ = ck.restore(ck.latest_step(), effjax.checkpoint.abstract_like(
      setup.state.items(), setup.runner.replicated))
  ck.close()
  return jax.device_get(items)


def test_adaptive_batch_follows_the_noise_scale_and_resumes_with_the_same_batch(data_dir,
                                                                                tmp_path):
  """Every logged step: the batch is the one the previous decisions chose from the logged
  noise scale, the LR is schedule(base step) times the linear rule's factor (capped at
  0.3), and the batch
  grows as the noise scale grows. A run stopped after growing and resumed takes the same
  batch sizes and ends bitwise-equal."""
  config = _adaptive_config(data_dir)
  full = effjax.train_and_evaluate(config, str(tmp_path / "a"), verbose=False)
  rows = effjax.metrics.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  schedule = trainer.build(config, with_data=False).state.schedule
  m = 1
  for row in rows:
    used = int(row["batch_size"]) // 128
    assert used == min(m, effjax.adaptive.max_multiplier(1, 93 - (row["step"] - used)))
    np.testing.assert_allclose(row["lr"], min(float(schedule(row["step"] - used)) * used, 0.3),
                               rtol=1e-6)
    if "adaptive/b_simple" in row:
      m = effjax.adaptive.next_multiplier(m, row["adaptive/b_simple"], 128, 10.0, 512)
  sizes = [r["batch_size"] for r in rows]
  assert sizes[0] == 128 and max(sizes) >= 256 and sizes == sorted(sizes[:-2]) + sizes[-2:]
  grew_at = next(r for r in rows if r["batch_size"] > 128)
  first = next(r for r in rows if "adaptive/b_simple" in r)
  assert grew_at["noise_scale/b_simple"] > first["noise_scale/b_simple"]
  assert full["final_batch_size"] == m * 128 and full["examples"] == 93 * 128
  assert full["optimizer_steps"] == len(rows) < 93

  stop = grew_at["step"] + 5
  part = effjax.train_and_evaluate(config, str(tmp_path / "b"), verbose=False,
                                   stop_after=stop)
  assert part["stopped"]
  resumed = effjax.train_and_evaluate(config, str(tmp_path / "b"), verbose=False)
  assert resumed["final_batch_size"] == full["final_batch_size"]
  assert resumed["optimizer_steps"] == full["optimizer_steps"]
  after = [r for r in effjax.metrics.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
           if r["step"] > part["final_step"]]
  assert [r["batch_size"] for r in after] == [r["batch_size"] for r in rows
                                              if r["step"] > part["final_step"]]
  a, b = _final_items(str(tmp_path / "a"), config), _final_items(str(tmp_path / "b"), config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
