"""Test set-up: 8 simulated CPU devices, and one shared data dir built once per session."""

import gc
import os
import shutil
import tempfile

# Must precede any JAX import: every test runs on 8 simulated CPU devices (subprocesses
# keep the suite's XLA flags: tests.helpers.xla_flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every compiled per-replica function checks that its outputs agree across replicas
# (effjax.parallel.Runner.compile); the CLI tests' subprocesses inherit it.
os.environ.setdefault("EFFJAX_CHECK_REPLICATED", "1")
# Shared compiled fixtures: many tests (and the CLI tests' subprocesses, which inherit the
# environment) compile the very same steps; JAX's persistent compilation cache, in a
# directory fresh for each run of the suite (xdist's workers share the run's id), lets
# them compile each once. Its keys hash the program, options and JAX version, so a hit is
# the same executable: bitwise results are unchanged.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_CACHE = os.path.join(tempfile.gettempdir(), f"effjax-test-jax-cache-{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from effjax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA:CPU mallocs each execution's temporaries; pooled, they are not faulted in anew.
distributed.pool_host_memory()

# Tracing allocates many short-lived objects, and Python's collector then scans the worker's
# whole heap often (gc_collect_main was 3-4% of a test step's compile under perf). With
# the imported modules frozen out of the scans and fewer, larger young collections,
# test_contrastive.py + test_tasks.py took 5% less CPU (A/B, alternated, twice each). It
# changes when garbage is freed, not any number a test computes.
gc.freeze()
gc.set_threshold(50_000, 20, 20)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir holding the embedded datasets the tests use, built once."""
  from effjax import data  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("mnist1d", d)
  data.get_builder("digits", d)
  data.get_builder("python_stdlib", d)
  return d


def pytest_sessionfinish(session):  # pylint: disable=unused-argument
  """The run's compilation cache goes with the run (it held 5-40 MB per run of the suite):
  removed by the process that made the run's id, xdist's controller or a plain pytest."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(_CACHE, ignore_errors=True)
