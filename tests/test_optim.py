"""Batch-size scaling rules and warmup schedules at their boundaries."""

import math

import ml_collections
import numpy as np
import pytest

from effjax import optim


def test_scale_learning_rate_rules():
  assert optim.scale_learning_rate(0.1, 8192, 256, "linear") == pytest.approx(3.2)  # Goyal
  assert optim.scale_learning_rate(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
  assert optim.scale_learning_rate(0.1, 1024, 256, "none") == pytest.approx(0.1)
  with pytest.raises(ValueError, match="'cube' is not one of"):
    optim.scale_learning_rate(0.1, 1024, 256, "cube")


def test_scale_learning_rate_follows_config_overrides():
  c = ml_collections.ConfigDict({"batch_size": 512, "lr": 0.1})
  c.scaled = optim.scale_learning_rate(c.get_ref("lr"), c.get_ref("batch_size"), 256, "sqrt")
  assert c.scaled == pytest.approx(0.1 * math.sqrt(2))
  c.batch_size = 4096
  assert c.scaled == pytest.approx(0.4)


@pytest.mark.parametrize("decay", ["cosine", "poly", "linear", "constant"])
def test_warmup_then_decay_boundaries(decay):
  s = optim.warmup_schedule(2.0, total_steps=100, warmup_steps=10, decay=decay, init_value=0.0)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(1.0)          # Linear warmup.
  assert float(s(10)) == pytest.approx(2.0)         # Peak at the end of warmup.
  end = {"cosine": 0.0, "poly": 0.0, "linear": 0.0, "constant": 2.0}[decay]
  assert float(s(100)) == pytest.approx(end, abs=1e-6)
  mid = float(s(55))  # Halfway through the decay phase.
  expected = {"cosine": 1.0, "poly": 2.0 * 0.5 ** 2, "linear": 1.0, "constant": 2.0}[decay]
  assert mid == pytest.approx(expected, rel=1e-5)


def test_warmup_stable_decay_boundaries():
  s = optim.warmup_schedule(1.0, total_steps=100, warmup_steps=10, decay="wsd",
                            decay_fraction=0.2, end_value=0.1)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(80)) == pytest.approx(1.0)    # End of the stable phase.
  assert float(s(90)) == pytest.approx(0.55)   # Halfway through the 20-step decay.
  assert float(s(100)) == pytest.approx(0.1)
  assert np.all(np.diff([float(s(t)) for t in range(10, 81)]) == 0)


def test_warmup_longer_than_training_is_an_error():
  with pytest.raises(ValueError, match="warmup_steps=20 must be in"):
    optim.warmup_schedule(1.0, total_steps=10, warmup_steps=20)


def test_weight_decay_mask_skips_biases_and_norm_params():
  import jax.numpy as jnp
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
            "bn": {"scale": jnp.ones(4)}}
  mask = optim.decay_mask("ndim>1")(params)
  assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False}}
  assert optim.decay_mask("all") is None
