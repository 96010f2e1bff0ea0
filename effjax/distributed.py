"""Multi-host start-up: ``jax.distributed.initialize`` when the config or environment asks."""

import os
from typing import Any

import jax

INITIALIZE_MODES = ("auto", "yes", "no")


def detect_cluster() -> str | None:
  """Names the cluster environment JAX can auto-configure from, or None."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return "slurm"
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "tpu_pod"
  if "JAX_COORDINATOR_ADDRESS" in env:
    return "env"
  return None


def maybe_initialize(dist: Any) -> bool:
  """Calls ``jax.distributed.initialize`` if ``config.distributed`` or the environment says so.

  Must run before anything touches a JAX backend.

  Args:
    dist: ``config.distributed`` with ``initialize`` (``'auto'``: when a coordinator
      address is configured or a SLURM/TPU-pod/JAX environment is detected; ``'yes'``;
      ``'no'``), ``coordinator_address``, ``num_processes``, ``process_id`` and
      ``cpu_collectives`` (the CPU collectives implementation, e.g. ``'gloo'``).

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  mode = dist.initialize
  if mode not in INITIALIZE_MODES:
    raise ValueError(f"distributed.initialize={mode!r} is not one of {INITIALIZE_MODES}")
  wanted = mode == "yes" or (mode == "auto" and (dist.coordinator_address or detect_cluster()))
  if not wanted:
    return False
  if dist.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address,
                  num_processes=int(dist.num_processes), process_id=int(dist.process_id))
  jax.distributed.initialize(**kwargs)
  return True
