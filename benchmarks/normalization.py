r"""Train-step time of sync, grouped and ghost BatchNorm against per-device BN, side by side.

  python benchmarks/normalization.py --batch_size=64 --steps=5 --repeats=3

Runs effjax's full train step (configs/cifar10_resnet18.py: ResNet-18 at 32x32, Nesterov
SGD) on CIFAR-shaped random batches, on all devices (8 simulated CPU devices unless
XLA_FLAGS says otherwise), once per ``model.norm`` variant. The variants are timed in
interleaved repeats; the table gives the median step time and examples/s, and one line
per variant gives ``(variant)/(batch)``, its step time over per-device BN's.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/cifar10_resnet18.py", "Config file.")
flags.DEFINE_integer("batch_size", 64, "Global batch.")
flags.DEFINE_integer("steps", 5, "Steps timed per measurement.")
flags.DEFINE_integer("repeats", 3, "Interleaved repeats (medians).")
flags.DEFINE_list("variants", ["batch", "sync_batch", "group_batch:2", "group_batch:4",
                               "ghost_batch:4", "ghost_batch:2", "batch_channel"],
                  "model.norm variants; group_batch:G sets bn_group_size, ghost_batch:V "
                  "virtual_batch_size. The first is the reference.")


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax import grid  # pylint: disable=g-import-not-at-top

  base = grid.with_overrides(FLAGS.config, {"batch_size": FLAGS.batch_size})
  runs = {}
  for variant in FLAGS.variants:
    norm, _, size = variant.partition(":")
    overrides = {"model.norm": norm}
    if norm == "group_batch" and size:
      overrides["model.bn_group_size"] = int(size)
    if norm == "ghost_batch" and size:
      overrides["model.virtual_batch_size"] = int(size)
    runs[variant] = compiled_step(grid.with_overrides(base, overrides))
  med = time_interleaved(runs, FLAGS.steps, FLAGS.repeats)

  ref = FLAGS.variants[0]
  n = jax.device_count()
  print(f"config: model={base.model.name} input=32x32x3 batch={FLAGS.batch_size} "
        f"({FLAGS.batch_size // n} per device) devices={n} steps={FLAGS.steps} "
        f"repeats={FLAGS.repeats}")
  print(f"| norm | step (ms) | examples/s | step / {ref} |")
  print("|---|---|---|---|")
  for v in runs:
    print(f"| {v} | {1e3 * med[v]:.1f} | {FLAGS.batch_size / med[v]:.0f} | "
          f"{med[v] / med[ref]:.3f} |")
  for v in runs:
    if v != ref:
      print(f"({v})/({ref}) {med[v] / med[ref]:.3f}")


if __name__ == "__main__":
  app.run(main)
