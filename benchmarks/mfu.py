r"""Model FLOPs utilisation of effjax's ResNet-50 train step.

  python benchmarks/mfu.py --batch=256 --dtype=bfloat16          # on a GPU
  python benchmarks/mfu.py --batch=16 --dtype=float32 --devices=1  # on this CPU

MFU = (FLOPs of one train step, from XLA's cost analysis of the lowered step) /
(measured step time) / (the device's measured matmul peak: the best FLOP/s of a large
square matmul in the same dtype, timed in the same process). Against a measured peak
rather than the datasheet's, so the number says how close the step gets to what this
device actually sustains. Prints both, and the datasheet ratio where known.
"""

import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 256, "Global batch.")
flags.DEFINE_string("dtype", "bfloat16", "compute_dtype.")
flags.DEFINE_integer("devices", 0, "Simulated CPU devices (0: all real devices).")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("matmul", 8192, "Side of the square matmul for the peak.")
flags.DEFINE_bool("flops_only", False, "Print the step's FLOPs (lowered) and exit.")

DATASHEET = {"H100": {"bfloat16": 989e12, "float32": 67e12},   # dense, SXM
             "H200": {"bfloat16": 989e12, "float32": 67e12}}


def _step_flops(fn, state, batch) -> float:
  """FLOPs of one step on all devices, from XLA's cost analysis of the lowered step.

  The lowered (unoptimized) step, because on GPU the compiled one does not count the
  convolutions, which run as cuDNN custom calls (it printed 110 GFLOPs for a 256-image
  ResNet-50 step on an H100; about 6.2 TFLOPs is right). Where the backend gives no
  cost analysis before compiling (XLA:GPU), the same step is lowered for the CPU in a
  subprocess: the FLOPs are the program's, not the device's.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cost = fn.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = len(jax.devices())
  if cost and cost.get("flops"):
    return float(cost["flops"]) * n  # Per device program -> all devices.
  out = subprocess.run(
      [sys.executable, __file__, "--flops_only", f"--batch={FLAGS.batch}",
       f"--dtype={FLAGS.dtype}", f"--devices={n}"], check=True, capture_output=True,
      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  return float(out.split("FLOPS ")[1].split()[0])


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax.config import base_config, derive  # pylint: disable=g-import-not-at-top

  c = base_config()
  c.dataset.name = "imagenet2012"
  c.dataset.num_train_examples = 1_281_167
  c.model.name = "resnet50"
  c.model.norm = "sync_batch"
  c.optimizer.name = "lars"
  c.noise_scale.enabled = len(jax.devices()) > 1
  c.compute_dtype = FLAGS.dtype
  c.batch_size = c.eval_batch_size = FLAGS.batch
  config = derive(c)
  if FLAGS.flops_only:  # Lowered only: nothing compiled or run.
    from benchmarks.common import random_batch  # pylint: disable=g-import-not-at-top
    from effjax import trainer  # pylint: disable=g-import-not-at-top
    setup = trainer.build(config, with_data=False)
    fn = setup.runner.compile(trainer.make_train_step(config), check_replicated=False)
    batch = random_batch(setup.runner, setup.spec, config.batch_size)
    print(f"FLOPS {_step_flops(fn, setup.runner.place_state(setup.state), batch)!r}")
    return
  fn, state, batch, _ = run = compiled_step(config)
  flops = _step_flops(fn, state, batch)
  num_devices = len(jax.devices())
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  n = FLAGS.matmul if jax.default_backend() != "cpu" else min(FLAGS.matmul, 2048)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # Not ones: zeros/ones run faster.
  mm = jax.jit(lambda x: (x @ x).astype(dtype))
  jax.block_until_ready(mm(a))
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(10):
      out = mm(a)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / 10)
  peak = 2 * n ** 3 / best

  step = time_interleaved({"step": run}, FLAGS.steps, 3)["step"]
  device = jax.devices()[0].device_kind
  achieved = flops / step
  print(f"device={device} x{num_devices} backend={jax.default_backend()} "
        f"dtype={FLAGS.dtype} batch={FLAGS.batch}")
  print(f"matmul peak ({n}x{n}, measured): {peak / 1e12:.2f} TFLOP/s per device")
  print(f"ResNet-50 step: {flops / 1e9:.1f} GFLOPs (XLA cost analysis, lowered), "
        f"{step * 1e3:.1f} ms, {FLAGS.batch / step:.0f} examples/s")
  print(f"MFU vs measured peak: {achieved / (peak * num_devices):.3f}")
  for name, peaks in DATASHEET.items():
    if name in device and FLAGS.dtype in peaks:
      print(f"MFU vs {name} datasheet ({peaks[FLAGS.dtype] / 1e12:.0f} TFLOP/s): "
            f"{achieved / (peaks[FLAGS.dtype] * num_devices):.3f}")


if __name__ == "__main__":
  for arg in sys.argv[1:]:
    if arg.startswith("--devices=") and arg != "--devices=0":
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={arg.split('=')[1]}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
