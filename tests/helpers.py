"""Shared helpers for the tests."""

import os
import subprocess
import sys

from effjax import parallel
from effjax.config import base_config, derive
from effjax.grid import with_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  """A seconds-long mnist1d (canonical split) config with a small CNN."""
  c = base_config()
  c.dataset.name = "mnist1d"
  c.dataset.data_dir = data_dir
  c.dataset.num_examples = 5000
  c.dataset.num_train_examples = 4000
  c.model.name = "cnn1d"
  c.model.widths = (16, 32)
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 1.0
  c.optimizer.name = "nesterov"
  c.optimizer.base_learning_rate = 0.2
  c.optimizer.weight_decay = 5e-4
  c.schedule.warmup_epochs = 0.25
  c.log_every = 5
  c.curves = False  # The plot has its own tests (test_plot.py).
  return with_overrides(derive(c), overrides)


def lm_config(data_dir, **overrides):
  """A seconds-long byte-level LM on python_stdlib: 32-token sequences, a 1-layer width-32
  decoder (tests of stacked layers ask for 2), AdamW, 16 base steps of 16 sequences, eval
  on 2% of the validation split."""
  c = base_config()
  c.task = "lm"
  c.dataset.name = "python_stdlib"
  c.dataset.data_dir = data_dir
  c.dataset.seq_len = 32
  c.dataset.num_train_examples = 16 * 16
  c.dataset.eval_split = "validation[:2%]"
  c.model.name = "decoder_lm"
  c.model.widths = (32,)
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_epochs = 1.0
  c.optimizer.name = "adamw"
  c.optimizer.base_learning_rate = 3e-3
  c.optimizer.base_batch_size = 16
  c.optimizer.scaling_rule = "sqrt"
  c.optimizer.weight_decay = 0.1
  c.schedule.warmup_epochs = 0.125
  c.log_every = 4
  c.curves = False
  return with_overrides(derive(c), overrides)


def contrastive_config(data_dir, **overrides):
  """A seconds-long SimCLR config: mnist1d (4000 train rows), a (8, 16) trunk, a 32-16
  head, sync BN, LARS, batch 128 (16 per device), the probe on 1000 train rows."""
  c = base_config()
  c.task = "contrastive"
  c.dataset.name = "mnist1d"
  c.dataset.data_dir = data_dir
  c.dataset.num_examples = 5000
  c.dataset.num_train_examples = 4000
  c.input.augment = "none"
  c.model.name = "cnn1d_contrastive"
  c.model.norm = "sync_batch"
  c.model.widths = (8, 16)
  c.model.projection_widths = (32, 16)
  c.contrastive.temperature = 0.2
  c.contrastive.probe_examples = 1000
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 1.0
  c.optimizer.name = "lars"
  c.optimizer.base_learning_rate = 0.3
  c.optimizer.weight_decay = 1e-6
  c.schedule.warmup_epochs = 0.5
  c.log_every = 10
  c.curves = False
  return with_overrides(derive(c), overrides)


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a subprocess of the suite: the suite's own (conftest.py), with
  ``devices`` simulated CPU devices."""
  return parallel.with_cpu_device_count(os.environ.get("XLA_FLAGS", ""), devices)


def run_cli(args, env_extra=None, devices=8, timeout=600, module="experiments.train"):
  """Runs ``python -m MODULE ARGS`` from the repo root; returns the process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module] + list(args), cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(path):
  """Every file under ``path`` with its bytes and mtime: equal snapshots mean untouched."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = (fh.read(), os.stat(p).st_mtime_ns)
  return out


def assert_trees_close(actual, expected, err_msg="", **tolerances):
  """Leaf-by-leaf ``assert_allclose`` of two pytrees whose structures must be equal.

  Zipping ``jax.tree.leaves`` of both would silently truncate a structure mismatch;
  ``jax.tree.map`` over both raises on one. Each leaf's error names its path.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sa, se = jax.tree.structure(actual), jax.tree.structure(expected)
  assert sa == se, f"{err_msg}: tree structures differ:\n{sa}\n{se}"

  def check(path, a, e):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e),
                               err_msg=f"{err_msg} {jax.tree_util.keystr(path)}", **tolerances)
  jax.tree_util.tree_map_with_path(check, actual, expected)
