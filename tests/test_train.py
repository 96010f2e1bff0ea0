"""The training loop end to end: outputs, accuracy, resume, non-finite stop."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

import effjax
from effjax import checkpoint as ckpt_lib
from effjax.metrics import read_jsonl
from tests.helpers import assert_trees_close, tiny_config


def _final_params(workdir, config):
  setup = effjax.trainer.build(config)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  items, data_state = ck.restore(ck.latest_step(),
                                 ckpt_lib.abstract_like(setup.state.items(),
                                                        setup.runner.replicated))
  ck.close()
  return jax.device_get(items), data_state


def test_train_writes_metrics_and_summary_and_learns(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=8.0, eval_every_epochs=4.0, log_every=10)
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == sorted(list(range(10, 250, 10)) + [124, 248])
  for key in ("train/loss", "train/accuracy", "lr", "grad_norm", "param_norm", "update_norm",
              "examples_per_sec", "steps_per_sec"):
    assert all(np.isfinite(r[key]) for r in rows), key
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [124, 248]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  with open(tmp_path / "summary.json") as f:
    saved = json.load(f)
  assert saved["eval/count"] == 1000 and saved["final_step"] == 248
  assert saved["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
  # The mnist1d paper's CNN reaches 94% on this split; a few epochs of a small one get 85%+.
  assert summary["eval/accuracy"] > 0.85
  assert os.listdir(tmp_path / "tensorboard")
  # Warmup then cosine: LR peaks at the end of warmup (step 7 = 0.25 epoch of 31 steps).
  lrs = [r["lr"] for r in rows]
  assert max(lrs) <= config.optimizer.learning_rate + 1e-7


def test_resume_equals_uninterrupted(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=2.0, **{"checkpoint.every_steps": 7,
                                                    "ema.enabled": True})
  full = effjax.train_and_evaluate(config, str(tmp_path / "a"), verbose=False)
  part = effjax.train_and_evaluate(config, str(tmp_path / "b"), verbose=False, stop_after=23)
  assert part == {"final_step": 23, "stopped": True}
  resumed = effjax.train_and_evaluate(config, str(tmp_path / "b"), verbose=False)
  assert resumed["final_step"] == full["final_step"] == 62
  a, a_data = _final_params(str(tmp_path / "a"), config)
  b, b_data = _final_params(str(tmp_path / "b"), config)
  assert a_data == b_data
  assert_trees_close(a, b, rtol=0, atol=0)  # Bitwise on CPU.
  assert resumed["eval/accuracy"] == full["eval/accuracy"]
  assert resumed["eval_ema/accuracy"] == full["eval_ema/accuracy"]
  assert len(jax.tree.leaves(a["ema_params"])) == len(jax.tree.leaves(a["params"]))
  rows_a = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  rows_b = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  loss = lambda rows, s: [r["train/loss"] for r in rows if r["step"] == s]
  assert loss(rows_a, 30) == loss(rows_b, 30) and loss(rows_a, 60) == loss(rows_b, 60)


def test_nonfinite_loss_stops_with_the_step_and_keeps_finite_params(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"optimizer.name": "sgd",
                                    "optimizer.base_learning_rate": 1e30,
                                    "checkpoint.every_steps": 1, "schedule.warmup_epochs": 0.0})
  with pytest.raises(effjax.NonFiniteError) as e:
    effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  bad = e.value.step
  assert 0 <= bad < config.log_every
  assert f"step {bad}" in str(e.value)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  latest = ck.latest_step()
  ck.close()
  assert latest is None or latest <= bad
  assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("name", ["lars", "lamb", "tvlars"])
def test_layerwise_optimizers_train_and_log_trust_ratios(data_dir, tmp_path, name):
  lr = {"lars": 2.0, "lamb": 4e-2, "tvlars": 2.0}[name]
  config = tiny_config(data_dir, num_epochs=3.0, **{"optimizer.name": name,
                                                    "optimizer.base_learning_rate": lr,
                                                    "log_every": 31})
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  for r in rows:
    assert 0 < r["trust_ratio/min"] <= r["trust_ratio/median"] <= r["trust_ratio/max"]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert summary["eval/accuracy"] > 0.6


def test_parameter_ema_follows_its_recurrence_with_the_scaled_decay(data_dir):
  """The EMA of the parameters, with the decay scaled to the batch ("How to Scale Your
  EMA"), against a hand-written one-device loop: optax's update on the global batch and
  the EMA recurrence over those parameters (LayerNorm, so one device holding the global
  batch computes what the 8 replicas do)."""
  config = tiny_config(data_dir, batch_size=1024, **{"ema.enabled": True, "ema.decay": 0.9,
                                                     "ema.base_batch_size": 256,
                                                     "model.norm": "layer"})
  assert config.ema.scaled_decay == pytest.approx(0.9 ** 4)
  setup = effjax.trainer.build(config)
  runner = setup.runner
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  fn = runner.compile(functools.partial(effjax.train_step, ema_decay=config.ema.scaled_decay))
  pre, _ = effjax.trainer.preprocess_fns(config, setup.spec)
  it = iter(effjax.data.train_dataset(setup.train_source, pre, global_batch_size=1024, seed=0))
  d = 0.9 ** 4
  tx, _ = effjax.optim.create_optimizer(config, config.num_train_steps)
  params = jax.device_get(setup.state.params)
  opt, ema = tx.init(params), params
  grad = jax.jit(jax.grad(lambda p, x, y: effjax.steps.cross_entropy(
      setup.model.apply({"params": p}, x, train=True), y).mean()))
  for _ in range(3):
    batch = next(it)
    state, _ = fn(state, runner.shard_batch(batch))
    u, opt = tx.update(grad(params, batch["input"], batch["label"]), opt, params)
    params = optax.apply_updates(params, u)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
  assert_trees_close(runner.to_host(state.params), params, rtol=1e-5, atol=1e-6)
  assert_trees_close(runner.to_host(state.ema_params), ema, rtol=1e-5, atol=1e-6)
  # The decay matters: the unscaled 0.9 gives another average.
  assert not np.allclose(jax.tree.leaves(runner.to_host(state.ema_params))[0],
                         jax.tree.leaves(params)[0], rtol=1e-3)

@pytest.mark.parametrize("overrides", [
    {"model.norm": "group_batch", "model.bn_group_size": 4},
    {"batch_schedule": "adaptive", "noise_scale.enabled": True},
    {"model.norm": "sync_batch", "noise_scale.enabled": True, "accum_steps": 2}])
def test_dry_run_sizes_grouped_and_adaptive_configs_for_n_devices(data_dir, overrides):
  """--dry_run validates and sizes for dry_run_devices, not for the one device it
  compiles on (a group of 4 replicas or the noise scale's two batch sizes need N)."""
  config = tiny_config(data_dir, dry_run_devices=8, **overrides)
  out = effjax.trainer.dry_run(config)
  assert out["num_devices"] == 8 and out["per_device_batch"] == 16
  assert out["memory_per_device_bytes"] > 0 and out["flops_per_step"] > 0


def test_a_finished_target_run_does_not_hide_later_requests(data_dir, tmp_path):
  """A run that stopped at its target returns its summary again for the same config only:
  restore='ignore' starts afresh, and a config whose model differs is refused by the
  checkpoint check, not answered with the old summary."""
  config = tiny_config(data_dir, **{"target.accuracy": 0.3, "target.first_eval_step": 2})
  first = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert first["target_step"] is not None
  assert effjax.train_and_evaluate(config, str(tmp_path), verbose=False) == first
  again = tiny_config(data_dir, restore="ignore", **{"target.accuracy": 0.3,
                                                      "target.first_eval_step": 2})
  fresh = effjax.train_and_evaluate(again, str(tmp_path), verbose=False)
  assert fresh["wall_time_sec"] != first["wall_time_sec"]
  assert (tmp_path / "checkpoints.replaced").is_dir()
  wider = tiny_config(data_dir, **{"target.accuracy": 0.3, "target.first_eval_step": 2,
                                   "model.widths": (16, 48)})
  with pytest.raises(effjax.config.ConfigError, match="does not match the config"):
    effjax.train_and_evaluate(wider, str(tmp_path), verbose=False)
