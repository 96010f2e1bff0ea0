"""Process start-up: ``jax.distributed.initialize`` when the config or environment asks,
and a pooled host allocator for the CPU backend."""

import ctypes
import os
import sys
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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_TOP_PAD = -2


def pool_host_memory(threshold_bytes: int = 1 << 30) -> bool:
  """Has glibc's malloc keep freed memory for reuse instead of returning it to the OS.

  XLA:CPU allocates each execution's temporary buffer (and its outputs) with ``malloc``.
  glibc serves a block above its mmap threshold (128 KiB, rising to at most 32 MiB) with
  a fresh ``mmap`` and unmaps it on ``free``, so every step faults its whole temporary
  buffer in again, page by page. The hand-written LM step of ``benchmarks/train_step.py``
  (39 MB of temporaries per device) took 77k page faults and 130 ms of kernel time per
  260 ms step on 8 simulated devices; pooled, about 1k and 16 ms, in 184-198 ms steps
  (BENCHMARKS.md, seventh pass). GPU and TPU runtimes pool device memory already; this
  does the same for the host.

  Call once, early, in a process that runs JAX on CPU (the trainer's main, the tests,
  the benchmarks); blocks already allocated keep their way. It sets the mmap and trim thresholds to
  ``threshold_bytes``: blocks below it come from the heap and are reused, and the heap
  is only trimmed when that much lies free at its top. It also pads each heap's growth by
  64 MiB: glibc gives threads other than the main one heaps of at most 64 MiB, and
  unmaps such a heap whenever it is wholly free, whatever the thresholds, unless the pad
  says to keep it. (Putting every thread on the main heap instead, ``M_ARENA_MAX=1``,
  made the 8 device threads wait on its lock: 10% slower.) A block larger than such a
  heap, allocated on a thread other than the main one, is still mapped and unmapped at
  every call, whatever this sets: ResNet-18's 111 MB of temporaries per device, on 8
  simulated devices, are faulted in at every step. The numbers a step computes do not
  change.

  Args:
    threshold_bytes: the new mmap and trim thresholds.

  Returns:
    Whether all three were set (False off glibc, e.g. on macOS, where nothing changes).
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # Not glibc (e.g. musl).
    return False
  return all([libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)),
              libc.mallopt(_M_TRIM_THRESHOLD, int(threshold_bytes)),
              libc.mallopt(_M_TOP_PAD, 64 << 20)])
