"""The model zoo: reference parameter counts, every norm, zero-initialised residuals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax.sharding import Mesh, PartitionSpec as P

from effjax import models
from effjax.parallel import DATA_AXIS


def _count(model, shape):
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))


def test_resnet_parameter_counts_match_the_references():
  assert _count(models.resnet50(1000), (224, 224, 3)) == 25_557_032  # torchvision resnet50
  assert _count(models.resnet18(10), (32, 32, 3)) == 11_173_962     # CIFAR ResNet-18
  # ResNet-20 (He et al. 2016: 0.27M) with 1x1-conv projection shortcuts.
  assert 0.26e6 < _count(models.resnet20(10), (32, 32, 3)) < 0.28e6


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("name, shape", [("mlp", (8, 8, 1)), ("cnn1d", (40,)),
                                         ("transformer", (40,)), ("resnet20", (16, 16, 3))])
def test_every_model_takes_every_norm(name, norm, shape):
  """Init on one device, then a train-mode and an eval-mode forward pass on 8 replicas."""
  cfg = ml_collections.ConfigDict(dict(name=name, norm=norm, widths=(8, 8), kernel_size=3,
                                      num_layers=1, num_heads=2, virtual_batch_size=2,
                                      norm_groups=4))
  model = models.create_model(cfg, 10)
  x = jax.random.normal(jax.random.key(1), (32,) + shape)
  variables = model.init(jax.random.key(0), x[:4], train=False)
  assert ("batch_stats" in variables) == (norm in models.BATCH_NORMS)

  def fwd(v, xl):
    logits, new = model.apply(v, xl, train=True, mutable=["batch_stats"])
    return logits, jax.tree.map(lambda a: a[None], new), model.apply(new | {
        "params": v["params"]}, xl, train=False)

  mesh = Mesh(np.array(jax.devices()), (DATA_AXIS,))
  logits, new, eval_logits = jax.jit(jax.shard_map(
      fwd, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS),
      check_vma=False))(variables, x)
  assert logits.shape == (32, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(eval_logits))
  if norm in models.BATCH_NORMS and norm != "batch":
    # The norm layers average their running statistics over the replicas themselves.
    for leaf in jax.tree.leaves(new):
      np.testing.assert_allclose(leaf, np.broadcast_to(leaf[:1], leaf.shape), atol=1e-6)


def test_residual_blocks_start_as_identity():
  """Goyal et al.: the last BN scale of each block is 0, so a block passes x through."""
  model = models.resnet20(10, norm="batch")
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  v = model.init(jax.random.key(0), x, train=False)
  for name, block in v["params"].items():
    if "block" in name:
      np.testing.assert_array_equal(block["norm2"]["scale"], 0.0)
  block = models.resnet.BasicBlock(16, 1, models.make_norm("batch", train=False), jnp.float32)
  h = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 8, 8, 16)))
  bv = block.init(jax.random.key(3), h)
  np.testing.assert_allclose(block.apply(bv, h), h, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  cfg = ml_collections.ConfigDict(dict(name="cnn1d", norm="batch", widths=(8,), kernel_size=3))
  model = models.create_model(cfg, 10, dtype=jnp.bfloat16)
  v = model.init(jax.random.key(0), jnp.zeros((2, 40)), train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  assert model.apply(v, jnp.zeros((2, 40)), train=False).dtype == jnp.float32
