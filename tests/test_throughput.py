"""Throughput defaults: bfloat16 compute that still trains, and a loop with no implicit
host-device transfers (``jax.transfer_guard('disallow')`` around the step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effjax
from effjax import trainer
from tests.helpers import tiny_config


def test_bfloat16_computes_in_bf16_and_keeps_state_in_float32(data_dir):
  """Activations and matmuls in bf16; params, optimizer state, BN statistics, EMA and the
  noise-scale sums stay float32 after a step."""
  config = tiny_config(data_dir, compute_dtype="bfloat16", **{
      "model.norm": "sync_batch", "ema.enabled": True, "noise_scale.enabled": True,
      "optimizer.name": "lars", "accum_steps": 2})
  setup = trainer.build(config, with_data=False)
  runner = setup.runner
  fn = runner.compile(trainer.make_train_step(config))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  rng = np.random.RandomState(0)
  batch = runner.shard_batch({"input": rng.rand(128, 40).astype(np.float32),
                              "label": rng.randint(0, 10, 128).astype(np.int32)})
  hlo = fn.lower(state, batch).as_text()
  convs = [l for l in hlo.splitlines() if "stablehlo.convolution" in l]
  assert convs and all("xbf16>" in l.split("->")[-1] for l in convs), convs[:2]
  state, metrics = fn(state, batch)
  for name in ("params", "opt_state", "batch_stats", "ema_params", "noise_scale"):
    dtypes = {x.dtype for x in jax.tree.leaves(getattr(state, name))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
  assert np.isfinite(float(np.asarray(metrics["train/loss"].addressable_shards[0].data)))


def test_bfloat16_trains_mnist1d_within_one_point_of_float32(data_dir, tmp_path):
  """Same seed, data and schedule; bf16 compute ends within 1 point of float32."""
  acc = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(data_dir, num_epochs=4.0, compute_dtype=dtype, log_every=31,
                         **{"dataset.num_examples": 10000, "dataset.num_train_examples": 8000,
                            "model.widths": (32, 64), "eval_batch_size": 2000})
    acc[dtype] = effjax.train_and_evaluate(config, str(tmp_path / dtype),
                                           verbose=False)["eval/accuracy"]
  assert acc["float32"] > 0.9, acc
  assert abs(acc["bfloat16"] - acc["float32"]) <= 0.01, acc


def test_loop_runs_under_the_transfer_guard_and_the_guard_bites(data_dir, tmp_path,
                                                                monkeypatch):
  config = tiny_config(data_dir, num_epochs=0.5)
  assert config.transfer_guard == "disallow"
  summary = effjax.train_and_evaluate(config, str(tmp_path / "ok"), verbose=False)
  assert summary["final_step"] == 15
  # A batch that is still on the host reaches the step: the guard turns the implicit
  # transfer into an error instead of a silent stall.
  monkeypatch.setattr(effjax.Runner, "concat_batches",
                      lambda self, batches: jax.device_get(batches[0]))
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    effjax.train_and_evaluate(config, str(tmp_path / "bad"), verbose=False)
