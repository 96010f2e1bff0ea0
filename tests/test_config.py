"""Shipped configs validate; derived values follow overrides; bad values are refused."""

import importlib.util
import os

import pytest

from effjax import config as config_lib
from tests.helpers import REPO


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("name, devices", [("mnist1d_sgd", 8), ("mnist1d_large_batch", 8),
                                           ("mnist1d_lamb", 8),
                                           ("cifar10_resnet18", 32), ("imagenet_resnet50", 256)])
def test_shipped_configs_validate(name, devices):
  c = _load(name)
  config_lib.validate(c, devices)
  power = {"linear": 1.0, "sqrt": 0.5}[c.optimizer.scaling_rule]
  assert c.optimizer.learning_rate == pytest.approx(
      c.optimizer.base_learning_rate * (c.batch_size / c.optimizer.base_batch_size) ** power)


def test_imagenet_config_derives_goyal_numbers():
  c = _load("imagenet_resnet50")
  assert c.optimizer.learning_rate == pytest.approx(3.2)  # 0.1 * 8192 / 256.
  assert c.steps_per_epoch == 1_281_167 // 8192
  assert c.schedule.warmup_steps == 5 * (1_281_167 // 8192)
  assert c.num_train_steps == 90 * (1_281_167 // 8192)


def test_large_batch_config_is_large_and_overrides_rescale():
  c = _load("mnist1d_large_batch")
  assert c.batch_size >= 1024 and c.dataset.num_train_examples == 80_000
  steps, lr = c.num_train_steps, c.optimizer.learning_rate
  c.batch_size = 2048
  assert c.optimizer.learning_rate == pytest.approx(2 * lr)
  assert c.num_train_steps == pytest.approx(steps / 2, abs=20)
  c.dataset.num_examples = 200_000
  assert c.dataset.num_train_examples == 160_000


def test_small_size_shrinks():
  full, small = _load("mnist1d_large_batch"), _load("mnist1d_large_batch", "small")
  assert small.dataset.num_examples < full.dataset.num_examples
  assert small.num_train_steps < full.num_train_steps
  with pytest.raises(ValueError, match="size='huge'"):
    _load("mnist1d_large_batch", "huge")


@pytest.mark.parametrize("key, value, message", [
    ("compute_dtype", "float16", "compute_dtype='float16' is not one of"),
    ("model.norm", "weight", "model.norm='weight' is not one of"),
    ("eval_batch_size", 1000, "eval_batch_size=1000 is not divisible by the 16 devices"),
    ("label_smoothing", 1.5, "label_smoothing=1.5 must be in [0, 1)"),
    ("optimizer.weight_decay", -1.0, "optimizer.weight_decay=-1.0 must be >= 0"),
    ("num_epochs", 0.0, "num_epochs=0.0 must be a positive number"),
    ("mesh.fsdp", 3, "mesh.fsdp=3 does not divide the 16 devices"),
    ("mesh.fsdp", 0, "mesh.fsdp=0 must be a positive"),
    ({"mesh.fsdp": 2, "parallel": "pmap"}, None, "mesh.fsdp=2 needs parallel='shard_map'"),
    ({"mesh.fsdp": 2, "noise_scale.enabled": True}, None,
     "noise_scale.enabled with mesh.fsdp=2 needs accum_steps >= 2"),
])
def test_bad_values_are_named(key, value, message):
  c = _load("mnist1d_large_batch")
  for k, v in (key.items() if isinstance(key, dict) else [(key, value)]):
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 16)
  assert message in str(e.value) and "\n" not in str(e.value)
