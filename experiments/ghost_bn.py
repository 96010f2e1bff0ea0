r"""Per-device vs sync vs ghost BatchNorm at a large batch, with a small-batch baseline.

  python -m experiments.ghost_bn --config=configs/mnist1d_ghost_bn.py --workdir=/tmp/ghost_bn

Every variant overrides the config (which sets the large batch) and runs for each seed in
``WORKDIR/<variant>/seed<k>``. Writes ``runs.csv`` (one row per run), ``summary.csv`` and
``summary.md`` (mean ± std over seeds), and prints the table. Re-running skips finished
runs and resumes unfinished ones.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
flags.DEFINE_string("workdir", None, "Directory for the runs and the tables.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run each variant with.")
flags.DEFINE_list("variants", [], "Variants to run (default: all of VARIANTS).")

# Statistics spans: small_batch_128 normalizes over its whole batch of 128 (what ghost BN
# with v = 128 imitates); per_device_bn over 4096 / 8 = 512; sync_bn over 4096.
VARIANTS = {
    "small_batch_128": {"batch_size": 128, "model.norm": "sync_batch",
                        "schedule.warmup_epochs": 0.0},
    "per_device_bn": {"model.norm": "batch"},
    "sync_bn": {"model.norm": "sync_batch"},
    "ghost_bn_v32": {"model.norm": "ghost_batch", "model.virtual_batch_size": 32},
    "ghost_bn_v64": {"model.norm": "ghost_batch", "model.virtual_batch_size": 64},
    "ghost_bn_v128": {"model.norm": "ghost_batch", "model.virtual_batch_size": 128},
}
COLUMNS = [("test accuracy", "eval/accuracy", ".4f"), ("test loss", "eval/loss", ".4f"),
           ("train loss (last 10 steps)", "train/loss", ".4f"),
           ("steps", "final_step", ".0f"), ("wall time (s)", "wall_time_sec", ".0f")]


def main(argv):
  if len(argv) > 1 or FLAGS.config is None or not FLAGS.workdir:
    sys.exit("error: use --config=... --workdir=... [--seeds=0,1,2] [--variants=a,b]")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO.
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import grid  # pylint: disable=g-import-not-at-top
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    sys.exit(f"error: --variants={unknown[0]!r} is not one of {tuple(VARIANTS)}")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    sys.exit(f"error: --seeds={','.join(FLAGS.seeds)!r} must be integers")
  variants = {k: VARIANTS[k] for k in (FLAGS.variants or VARIANTS)}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    runs = grid.expand(FLAGS.config, variants, seeds, jax.device_count())
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  rows = grid.run(runs, FLAGS.workdir)
  summary = grid.summarize(rows, [m for _, m, _ in COLUMNS])
  grid.write_csv(rows, os.path.join(FLAGS.workdir, "runs.csv"))
  grid.write_csv(summary, os.path.join(FLAGS.workdir, "summary.csv"))
  table = grid.markdown_table(summary, COLUMNS)
  with open(os.path.join(FLAGS.workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
