"""Test set-up: 8 simulated CPU devices, and one shared data dir built once per session."""

import os

# Must precede any JAX import: every test runs on 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every compiled per-replica function checks that its outputs agree across replicas
# (effjax.parallel.Runner.compile); the CLI tests' subprocesses inherit it.
os.environ.setdefault("EFFJAX_CHECK_REPLICATED", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir holding the embedded datasets the tests use, built once."""
  from effjax import data  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("mnist1d", d)
  data.get_builder("digits", d)
  data.get_builder("python_stdlib", d)
  return d
