r"""Where effjax's extra step time goes: an attribution by ablation and collective count.

  python benchmarks/step_profile.py --model=resnet18 --devices=8 --repeats=5

Times, side by side (interleaved repeats, medians), effjax's train step with the extras
switched on one at a time, against the minimal flax+optax step (b) of
``benchmarks/train_step.py``, and counts the all-reduces in each compiled program
(every one is a rendezvous of all replicas):

  lean        per-device BN, no noise scale          (a0 of train_step.py)
  +bn_shift   lean + BN's variance around the running mean (``model.bn_shift``)
  +noise      lean + the gradient noise scale
  +sync_bn    lean + sync BN over all devices
  full        (a) of train_step.py: sync BN, and the noise scale for models without BN
              (with sync BN it needs microbatches, other maths)
"""

import os
import re
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18", "A model of benchmarks/train_step.py.")
# --devices and --repeats are train_step.py's flags (imported below).


def main(_):
  logging.set_verbosity(logging.WARNING)
  from benchmarks import train_step as ts  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib, trainer  # pylint: disable=g-import-not-at-top
  from effjax import distributed  # pylint: disable=g-import-not-at-top
  from effjax.grid import with_overrides  # pylint: disable=g-import-not-at-top

  if FLAGS.pool_host_memory:  # train_step.py's flag.
    distributed.pool_host_memory()

  dataset, batch, steps, overrides = ts.MODELS[FLAGS.model]
  spec = data_lib.get_spec(dataset)
  lean = ts._config(FLAGS.model, dataset, batch, overrides, False, "float32")  # pylint: disable=protected-access
  variants = {"lean": lean,
              "+bn_shift": with_overrides(lean, {"model.bn_shift": True}),
              "+noise": with_overrides(lean, {"noise_scale.enabled": True}),
              "+sync_bn": with_overrides(lean, {"model.norm": "sync_batch"}),
              "full": ts._config(FLAGS.model, dataset, batch, overrides, True, "float32")}  # pylint: disable=protected-access
  runs = {k: compiled_step(c) for k, c in variants.items()}
  runs["b"], _ = ts._minimal_flax_step(lean, trainer.Runner(lean.parallel), spec)  # pylint: disable=protected-access
  count = lambda run: len(re.findall(r"all-reduce(?:-start)?\(",
                                     run[0].lower(run[1], run[2]).compile().as_text()))
  collectives = {k: count(r) for k, r in runs.items()}
  times = time_interleaved(runs, steps, FLAGS.repeats)
  print(f"{FLAGS.model}: global batch {batch}, {FLAGS.devices} devices, {FLAGS.repeats} repeats")
  print("| step | ms/step | /(b) | all-reduces |\n|---|---|---|---|")
  for k, t in times.items():
    print(f"| {k} | {t * 1e3:.1f} | {t / times['b']:.3f} | {collectives[k]} |")


if __name__ == "__main__":
  n = next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top,unused-import
  app.run(main)
