"""The training loop end to end: outputs, accuracy, resume, non-finite stop."""

import functools
import json
import os

import jax
import numpy as np
import pytest

import effjax
from effjax import checkpoint as ckpt_lib
from effjax.metrics import read_jsonl
from tests.helpers import tiny_config


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
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # Bitwise on CPU.
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
  config = tiny_config(data_dir, batch_size=1024, **{"ema.enabled": True, "ema.decay": 0.9,
                                                     "ema.base_batch_size": 256})
  assert config.ema.scaled_decay == pytest.approx(0.9 ** 4)  # "How to Scale Your EMA".
  setup = effjax.trainer.build(config)
  runner = setup.runner
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  fn = runner.compile(functools.partial(effjax.train_step, ema_decay=config.ema.scaled_decay))
  pre, _ = effjax.trainer.preprocess_fns(config, setup.spec)
  it = iter(effjax.data.train_dataset(setup.train_source, pre, global_batch_size=1024, seed=0))
  d = config.ema.scaled_decay
  expected = jax.device_get(setup.state.params)
  for _ in range(3):
    state, _ = fn(state, runner.shard_batch(next(it)))
    params = jax.device_get(runner.to_host(state.params))
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, params)
  for x, y in zip(jax.tree.leaves(runner.to_host(state.ema_params)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
