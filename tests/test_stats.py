"""The gradient noise scale (McCandlish et al., arXiv:1812.06162) and gradient
accumulation, on 8 simulated devices."""

import functools
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
from tests.helpers import assert_trees_close, tiny_config


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
  assert_trees_close(one["params"], acc["params"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h1[0]["train/loss"], h4[0]["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(h1[0]["grad_norm"], h4[0]["grad_norm"], rtol=1e-6)


def _numpy_noise_scale(small_sq, big_sq, b_small, b_big):
  """McCandlish et al. (arXiv:1812.06162, Appendix A.1), re-derived in numpy."""
  g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
  trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
  return g2, trace


def test_sync_bn_microbatches_and_noise_scale_equal_one_device(data_dir):
  """accum_steps=2, sync BN, 8 replicas of 16: microbatch j is rows [8j, 8j+8) of every
  replica; its statistics span those 64 examples, and the running averages are updated
  once per microbatch, in order. Reference: plain BN on one device, microbatch by
  microbatch, gradients averaged.

  The noise scale under sync BN takes its small batch from those global microbatches
  (64 examples) and equals the estimator computed here on one device from the same
  examples. The per-replica estimate (the old behaviour) is off: the transpose of the
  statistics' psum puts every replica's loss into each replica's gradient."""
  config = tiny_config(data_dir, accum_steps=2, **{
      "model.norm": "sync_batch", "noise_scale.enabled": True, "noise_scale.decay": 0.5})
  setup, batches = _setup_and_batches(config, 1)
  got, hist = _train(config, batches, setup)

  ref_model = effjax.models.create_model(tiny_config(data_dir).model, setup.spec.num_classes)
  state = setup.state
  batch = batches[0]
  rows = np.arange(128).reshape(8, 2, 8)  # replica, microbatch, row
  stats_, grads = state.batch_stats, []

  def loss_fn(p, bs, mb):
    logits, new = ref_model.apply({"params": p, "batch_stats": bs}, mb["input"], train=True,
                                  mutable=["batch_stats"])
    return steps.cross_entropy(logits, mb["label"]).mean(), new["batch_stats"]
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # Jitted: not op by op.
  for j in range(2):
    mb = jax.tree.map(lambda x, j=j: x[rows[:, j].reshape(-1)], batch)
    (_, stats_), g = grad_fn(state.params, stats_, mb)
    grads.append(g)
  g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  tx, _ = effjax.optim.create_optimizer(config, config.num_train_steps)
  upd, _ = jax.jit(tx.update)(g, jax.jit(tx.init)(state.params), state.params)
  params = optax.apply_updates(state.params, upd)
  assert_trees_close(got["params"], params, rtol=1e-4, atol=1e-5)
  assert_trees_close(got["batch_stats"], stats_, rtol=1e-4, atol=1e-5)

  sq = lambda t: float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(t)))
  g2, trace = _numpy_noise_scale(np.mean([sq(x) for x in grads]), sq(g), 64, 128)
  # One update of an EMA with decay 0.5 from 0, bias-corrected: the estimate itself.
  np.testing.assert_allclose(hist[0]["noise_scale/g2"], g2, rtol=2e-3)
  np.testing.assert_allclose(hist[0]["noise_scale/trace_sigma"], trace, rtol=2e-3)
  np.testing.assert_allclose(hist[0]["noise_scale/b_simple"], trace / g2, rtol=4e-3)
  # Not vacuous: the per-replica small batch (each replica's 8-row microbatch gradient)
  # gives another tr(Sigma) under sync BN.
  runner = setup.runner
  wrong = runner.compile(functools.partial(trainer.make_train_step(config),
                                           noise_small_batch="replica"))
  _, m = wrong(setup.state.replace(**runner.replicate(setup.state.items())),
               runner.shard_batch(batch))
  wrong_trace = float(runner.to_host(m)["noise_scale/trace_sigma"])
  assert abs(wrong_trace - trace) > 0.05 * abs(trace), (wrong_trace, trace)


def test_noise_scale_with_sync_bn_and_no_microbatches_is_refused(data_dir):
  config = tiny_config(data_dir, **{"model.norm": "sync_batch", "noise_scale.enabled": True})
  with pytest.raises(effjax.config.ConfigError, match=(
      r"noise_scale.enabled with model.norm='sync_batch' needs accum_steps >= 2")):
    effjax.config.validate(config, 8)


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
  tx, _ = effjax.optim.create_optimizer(config, config.num_train_steps)
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  ema_g2 = ema_tr = 0.0
  params = state.params
  for k, batch in enumerate(batches):
    small = []
    for rows in np.arange(128).reshape(8 * accum_steps, -1):
      g = grad_fn(params, batch["input"][rows], batch["label"][rows])
      small.append(float(optax.tree.norm(g, squared=True)))
    big_grad = grad_fn(params, batch["input"], batch["label"])
    g2, tr = _numpy_noise_scale(np.mean(small),
                                float(optax.tree.norm(big_grad, squared=True)),
                                128 // (8 * accum_steps), 128)
    ema_g2, ema_tr = 0.5 * ema_g2 + 0.5 * g2, 0.5 * ema_tr + 0.5 * tr
    correction = 1.0 - 0.5 ** (k + 1)  # Adam-style bias correction of the averages.
    want = {"noise_scale/g2": ema_g2 / correction,
            "noise_scale/trace_sigma": ema_tr / correction,
            "noise_scale/b_simple": ema_tr / ema_g2}
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
  noise scale, and the batch grows as the noise scale grows (the LR that goes with it is
  checked against a hand-written loop in test_adaptive_lars_equals_a_loop_that_sets_the_lr). A run stopped after growing and resumed takes the same
  batch sizes and ends bitwise-equal."""
  config = _adaptive_config(data_dir)
  full = effjax.train_and_evaluate(config, str(tmp_path / "a"), verbose=False)
  rows = effjax.metrics.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  m = 1
  for row in rows:
    used = int(row["batch_size"]) // 128
    assert used == min(m, effjax.adaptive.max_multiplier(1, 93 - (row["step"] - used)))
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
  assert_trees_close(a, b, rtol=0, atol=0)


def _lars_loop(config, batches, multipliers, lr_inside=True):
  """A hand-written one-device loop: LARS on the global batch of ``m`` base batches, the
  LR set inside the optimizer through ``optax.inject_hyperparams`` to
  ``min(schedule(base_step) * m, cap)``; or (``lr_inside=False``, the old adaptive step)
  LARS at LR 1 with its output multiplied by that LR."""
  o = config.optimizer
  schedule = effjax.optim.warmup_schedule(o.learning_rate, config.num_train_steps,
                                          config.schedule.warmup_steps, config.schedule.decay)
  make = lambda learning_rate: effjax.optim.lars(
      learning_rate, momentum=o.momentum, weight_decay=o.weight_decay,
      trust_coefficient=o.trust_coefficient)
  tx = optax.inject_hyperparams(make)(learning_rate=0.0) if lr_inside else make(1.0)
  model = effjax.models.create_model(config.model, 10)
  params = trainer.build(config, with_data=False).state.params
  opt = tx.init(params)
  grad_fn = jax.jit(jax.grad(lambda p, x, y: steps.cross_entropy(
      model.apply({"params": p}, x, train=True), y).mean()))
  base, i = 0, 0
  for m in multipliers:
    x = np.concatenate([b["input"] for b in batches[i:i + m]])
    y = np.concatenate([b["label"] for b in batches[i:i + m]])
    lr = min(float(schedule(base)) * m, config.adaptive.max_learning_rate)
    if lr_inside:
      opt.hyperparams["learning_rate"] = jnp.float32(lr)
    upd, opt = tx.update(grad_fn(params, x, y), opt, params)
    if not lr_inside:
      upd = jax.tree.map(lambda u: u * lr, upd)
    params = optax.apply_updates(params, upd)
    base, i = base + m, i + m
  return params


def test_adaptive_lars_equals_a_loop_that_sets_the_lr_inside_the_optimizer(data_dir):
  """Adaptive batch with LARS over two doublings (1, 1, 2, 2, 4, 4 base batches), with a
  rising LR (warmup), the linear rule and the cap: equal to a hand-written loop that sets
  the LR inside LARS, before its momentum. Applying it to LARS's output instead (the old
  step) rescales the momentum buffer backwards in time and differs."""
  config = tiny_config(data_dir, batch_schedule="adaptive", **{
      "optimizer.name": "lars", "optimizer.base_learning_rate": 2.0,
      "model.norm": "layer", "noise_scale.enabled": True, "num_epochs": 2.0,
      "schedule.warmup_epochs": 1.0, "adaptive.max_learning_rate": 1.0})
  multipliers = [1, 1, 2, 2, 4, 4]
  setup, batches = _setup_and_batches(config, sum(multipliers))
  runner = setup.runner
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  fns, i, lrs = {}, 0, []
  for m in multipliers:
    fns.setdefault(m, runner.compile(trainer.make_train_step(config, m)))
    batch = runner.concat_batches([runner.shard_batch(b) for b in batches[i:i + m]])
    state, metrics = fns[m](state, batch)
    lrs.append(float(runner.to_host(metrics)["lr"]))
    i += m
  got = jax.device_get(runner.to_host(state.params))
  assert lrs[-1] == pytest.approx(1.0) and lrs[0] < lrs[2] < lrs[4]  # Warmup, then the cap.
  ref = _lars_loop(config, batches, multipliers)
  assert_trees_close(got, ref, rtol=2e-5, atol=1e-6)
  old = _lars_loop(config, batches, multipliers, lr_inside=False)
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(old), jax.tree.leaves(ref)))
  assert diff > 1e-3, diff


def test_skipped_steps_advance_the_schedule_and_the_logged_lr_is_the_applied_one():
  """nonfinite='skip' with the adaptive batch: a skipped step still consumes its base
  batches, so the base step (and the LR schedule) follow the data, and the LR logged is
  the LR the optimizer applied. Reference: hand-written SGD steps on the finite batches,
  at the LRs of the base steps they were taken at."""
  model = effjax.models.create_model(_mlp_model_config(), 3, jnp.float32)
  schedule = lambda s: 0.01 * (jnp.asarray(s, jnp.float32) + 1.0)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)
  runner = effjax.Runner("shard_map")
  fn = runner.compile(functools.partial(steps.train_step, nonfinite="skip",
                                        batch_multiplier=2, lr_factor=2.0))
  rng = np.random.default_rng(0)
  batches = []
  for bad in (False, True, False):
    x = rng.normal(size=(16, 4)).astype(np.float32)
    x[3, 1] = np.nan if bad else x[3, 1]
    batches.append({"input": x, "label": rng.integers(0, 3, 16).astype(np.int32)})
  for adaptive in (True, False):
    host_state = steps.create_train_state(jax.random.key(0), model, tx, schedule, (4,),
                                          adaptive_batch=adaptive)
    state = host_state.replace(**runner.replicate(host_state.items()))
    ref_params, ref_opt = host_state.params, tx.init(host_state.params)
    for i, batch in enumerate(batches):
      state, m = fn(state, runner.shard_batch(batch))
      m, s = runner.to_host(m), jax.device_get(runner.unreplicate(state))
      want_lr = float(schedule(2 * i)) * 2 if adaptive else float(schedule(i))
      assert float(m["lr"]) == pytest.approx(want_lr, rel=1e-6), (adaptive, i)
      if adaptive:
        assert int(s.batch_size_state.base_step) == 2 * (i + 1)  # Also after the skip.
      if i != 1:  # Finite: the applied LR is the logged one.
        assert float(s.opt_state.hyperparams["learning_rate"]) == pytest.approx(want_lr)
        g = jax.grad(lambda p: steps.cross_entropy(
            model.apply({"params": p}, batch["input"], train=True), batch["label"]).mean())(
                ref_params)
        ref_opt.hyperparams["learning_rate"] = jnp.float32(want_lr)
        u, ref_opt = tx.update(g, ref_opt, ref_params)
        ref_params = optax.apply_updates(ref_params, u)
    assert int(s.skips.total) == 1
    assert_trees_close(s.params, ref_params, rtol=1e-5, atol=1e-7, err_msg=str(adaptive))


def _mlp_model_config():
  c = effjax.config.base_config().model
  c.name, c.widths, c.norm = "mlp", (8,), "none"
  return c
