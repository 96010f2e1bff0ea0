r"""LAMB against AdamW at a large batch on the LM, each with its LR swept, same tokens.

  python -m experiments.lm_optimizers --config=configs/lm_python_stdlib_lamb.py:small \
      --workdir=DIR [--lr_multipliers=0.5,1,2] [--reference_batch=32]

For each optimizer in ``--optimizers`` and each multiplier, trains the config with
``optimizer.base_learning_rate`` times the multiplier (each optimizer's LR follows the
square-root rule from the same base), and with ``--reference_batch`` one AdamW run at
that small batch on the same token budget (the config's LR). Writes ``runs.csv`` and
``summary.md`` (eval bits per byte, the bigram baseline, steps, time) to DIR; re-running
skips finished runs (``effjax.grid``).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "An LM config (task='lm').")
flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
flags.DEFINE_list("optimizers", ["adamw", "lamb"], "Optimizers to compare.")
flags.DEFINE_list("lr_multipliers", ["0.5", "1", "2"], "Times the config's base LR.")
flags.DEFINE_integer("reference_batch", 0, "Also AdamW at this batch (0: none).")

# Each optimizer's usual settings (the LAMB paper's weight decay 0.01; AdamW's 0.1 with
# b2 = 0.95, as in GPT-style LM recipes).
OPTIMIZERS = {"adamw": {"optimizer.name": "adamw", "optimizer.weight_decay": 0.1,
                        "optimizer.b2": 0.95},
              "lamb": {"optimizer.name": "lamb", "optimizer.weight_decay": 0.01,
                       "optimizer.b2": 0.999}}
COLUMNS = [("eval bits/byte", "eval/bits_per_byte", ".4f"),
           ("bigram bits/byte", "baseline/bigram_bits_per_byte", ".4f"),
           ("eval loss", "eval/loss", ".4f"), ("LR", "learning_rate", ".4g"),
           ("batch", "batch_size", ".0f"), ("steps", "final_step", ".0f"),
           ("tokens", "tokens", ".3g"), ("wall time (s)", "wall_time_sec", ".0f")]


def variants(config) -> dict:
  out = {}
  for name in FLAGS.optimizers:
    if name not in OPTIMIZERS:
      sys.exit(f"error: --optimizers={name!r} is not one of {tuple(OPTIMIZERS)}")
    for m in FLAGS.lr_multipliers:
      out[f"{name}_lr_x{m}"] = {**OPTIMIZERS[name], "optimizer.base_learning_rate":
                                config.optimizer.base_learning_rate * float(m)}
  if FLAGS.reference_batch:
    b = FLAGS.reference_batch
    out[f"adamw_batch{b}"] = {**OPTIMIZERS["adamw"], "batch_size": b,
                              "eval_batch_size": config.eval_batch_size,
                              "log_every": 50}
  return out


def main(argv):
  if len(argv) > 1 or FLAGS.config is None or not FLAGS.workdir:
    sys.exit("error: use --config=... --workdir=...")
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import grid  # pylint: disable=g-import-not-at-top
  try:
    rows = grid.run_experiment(FLAGS.config, variants(FLAGS.config), FLAGS.workdir, COLUMNS,
                               jax.device_count())
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  plot(rows, os.path.join(FLAGS.workdir, "bits_per_byte_vs_lr.png"))


def plot(rows, path: str) -> None:
  """Eval bits per byte against LR per optimizer, with the small-batch reference and the
  bigram baseline as horizontal lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from effjax import plot as effjax_plot  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in FLAGS.optimizers:
    pts = sorted((r["learning_rate"], r["eval/bits_per_byte"]) for r in rows
                 if r["variant"].startswith(f"{name}_lr_x"))
    if pts:
      b = next(r["batch_size"] for r in rows if r["variant"].startswith(f"{name}_lr_x"))
      ax.semilogx(*zip(*pts), "o-", label=f"{name}, batch {b}")
  for r in rows:
    if r["variant"].startswith("adamw_batch"):
      ax.axhline(r["eval/bits_per_byte"], ls="--", c="gray",
                 label=f"adamw, batch {r['batch_size']} (same tokens)")
  ax.axhline(rows[0]["baseline/bigram_bits_per_byte"], ls=":", c="k", label="bigram")
  effjax_plot.finish(fig, ax, path, "learning rate", "eval bits per byte")


if __name__ == "__main__":
  app.run(main)
