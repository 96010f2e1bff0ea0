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
  import jax
  import jax.numpy as jnp
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
            "bn": {"scale": jnp.ones(4)}, "embed": {"position": jnp.ones((1, 8, 4))}}
  mask = optim.decay_mask("ndim>1")(params)
  assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False},
                  "embed": {"position": False}}
  # 'all' is an explicit mask, never None (which optax reads as "all" and effjax's
  # lars/lamb as "weights only").
  every = optim.decay_mask("all")
  assert every is not None and all(jax.tree.leaves(every(params)))
  assert optim.default_mask(params) == mask


def test_position_embeddings_get_no_weight_decay():
  """The transformer's learned positions (2-D) are excluded like biases, as in big_vision."""
  import jax
  import jax.numpy as jnp
  import optax
  params = {"position": jnp.ones((1, 8, 4)), "kernel": jnp.ones((4, 4))}
  zero = jax.tree.map(jnp.zeros_like, params)
  for tx in (optim.lars(1.0, weight_decay=0.1, momentum=0.0),
             optim.lamb(1.0, weight_decay=0.1)):
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["position"]).max()) == 0.0
    assert float(jnp.abs(updates["kernel"]).max()) > 0.0


def test_lamb_eps_defaults_to_the_papers_1e6():
  from effjax.config import base_config
  from effjax.optim import factory
  c = base_config()
  c.optimizer.name = "lamb"
  assert c.optimizer.eps is None
  g = {"w": jnp_ones((2,)) * 1e-7}  # A bias: no trust ratio, so eps shows.
  got = _first_update(factory._build(c.optimizer, 1.0), g)
  ref = _first_update(optim.lamb(1.0, eps=1e-6), g)
  wrong = _first_update(optim.lamb(1.0, eps=1e-8), g)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert not np.allclose(got, wrong, rtol=1e-3)
  c.optimizer.eps = 1e-8  # An explicit value still wins.
  np.testing.assert_allclose(_first_update(factory._build(c.optimizer, 1.0), g), wrong,
                             rtol=1e-6)


def jnp_ones(shape):
  import jax.numpy as jnp
  return jnp.ones(shape)


def _first_update(tx, grads):
  import jax
  params = jax.tree.map(lambda g: g * 0 + 1.0, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  return np.asarray(updates["w"])
