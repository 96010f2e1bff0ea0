r"""The cost of estimating the gradient noise scale in the train step, side by side.

  python benchmarks/noise_scale.py --steps=20 --repeats=5

For each config (the mnist1d CNN at batch 1024 and ResNet-18 at 32x32, batch 64, both on
8 simulated CPU devices unless XLA_FLAGS says otherwise), times effjax's train step with
``noise_scale.enabled`` off and on, in interleaved repeats, and prints the median step
times and ``(noise_scale)/(off)``, the step-time ratio. With accumulation
(``--accum_steps``) the small batches are the microbatches.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "Steps timed per measurement.")
flags.DEFINE_integer("repeats", 5, "Interleaved repeats (medians).")
flags.DEFINE_integer("accum_steps", 1, "Microbatches per step.")
flags.DEFINE_list("configs", ["mnist1d_large_batch", "cifar10_resnet18"], "Configs to time.")

BATCH = {"mnist1d_large_batch": 1024, "cifar10_resnet18": 64}


def main(_):
  logging.set_verbosity(logging.WARNING)
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax import grid  # pylint: disable=g-import-not-at-top

  print(f"devices={jax.device_count()} steps={FLAGS.steps} repeats={FLAGS.repeats} "
        f"accum_steps={FLAGS.accum_steps}")
  print("| config | batch | off (ms) | noise scale (ms) | ratio |")
  print("|---|---|---|---|---|")
  ratios = []
  for name in FLAGS.configs:
    base = importlib.import_module(f"configs.{name}").get_config()
    batch_size = BATCH.get(name, base.batch_size)
    runs = {on: compiled_step(grid.with_overrides(
        base, {"batch_size": batch_size, "noise_scale.enabled": on,
               "accum_steps": FLAGS.accum_steps})) for on in (False, True)}
    med = time_interleaved(runs, FLAGS.steps, FLAGS.repeats)
    off, on = med[False], med[True]
    ratios.append((name, on / off))
    print(f"| {name} | {batch_size} | {1e3 * off:.2f} | {1e3 * on:.2f} | {on / off:.3f} |")
  for name, ratio in ratios:
    print(f"{name}: (noise_scale)/(off) {ratio:.3f}")


if __name__ == "__main__":
  app.run(main)
