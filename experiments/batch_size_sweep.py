r"""Steps-to-target against batch size (Shallue et al.), with the noise scale measured.

  python -m experiments.batch_size_sweep --config=configs/sweep_mnist1d.py --workdir=DIR

Trains ``config.sweep.batch_sizes`` x ``config.sweep.lr_multipliers`` runs (each stops
at ``config.target.accuracy``, or at an eval loss of at most ``config.target.loss``),
``config.sweep.workers`` at a time in separate processes, and writes ``sweep.csv``, ``sweep.json`` and ``steps_vs_batch.png`` to DIR: the best LR's
steps per batch size, the fit of S = S_min (1 + B_noise / B) and its B_crit, and the
measured B_simple. Re-running skips finished runs and resumes unfinished ones.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
flags.DEFINE_string("workdir", None, "Directory for the runs and the sweep's outputs.")


def main(argv):
  if len(argv) > 1 or FLAGS.config is None or not FLAGS.workdir:
    sys.exit("error: use --config=... --workdir=...")
  logging.set_verbosity(logging.WARNING)
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import sweep  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    label, _ = sweep.config_target(config)
    runs = sweep.plan(config)
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    sys.exit(f"error: --workdir={FLAGS.workdir!r} is a file, not a directory")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  print(f"{len(runs)} runs: batch sizes {tuple(config.sweep.batch_sizes)} x LR multipliers "
        f"{tuple(config.sweep.lr_multipliers)}, target {label}, "
        f"{config.sweep.workers} at a time", flush=True)
  rows = sweep.run(runs, FLAGS.workdir, workers=config.sweep.workers,
                   devices=config.sweep.devices_per_worker,
                   log=lambda m: print(m, flush=True))
  best = sweep.best_per_batch(rows)
  fitted = sweep.fit_steps_model([r["batch_size"] for r in best],
                                 [r["steps"] for r in best]) if len(best) >= 2 else None
  b_simple = sweep.measured_b_simple(best)
  sweep.write(FLAGS.workdir, rows, best, fitted, b_simple, label)
  per = best[0]["tokens"] // best[0]["examples"] if best and "tokens" in best[0] else 1
  unit = " (tokens)" if per > 1 else ""
  print(f"| batch | best LR (x rule) | steps to target | examples to target{unit} | "
        "B_simple at target |")
  print("|---|---|---|---|---|")
  for r in best:
    used = f"{r['examples']}" + (f" ({r['tokens']})" if per > 1 else "")
    print(f"| {r['batch_size']} | {r['learning_rate']:.4g} ({r['lr_multiplier']:g}) | "
          f"{r['steps']} | {used} | {r['b_simple']:.0f} |")
  if fitted:
    print(f"fit S = S_min (1 + B_noise / B): S_min = {fitted['s_min']:.1f} steps, "
          f"E_min = {fitted['e_min']:.0f} examples, B_crit = B_noise = {fitted['b_noise']:.0f} "
          f"(rmse {fitted['rmse_log']:.3f} in log steps)")
    if per > 1:
      print(f"in tokens ({per} per example): E_min = {fitted['e_min'] * per:.3g}, "
            f"B_crit = {fitted['b_noise'] * per:.3g}")
    print(f"measured B_simple (median at target) = {b_simple:.0f}; B_crit / B_simple = "
          f"{fitted['b_noise'] / b_simple:.2f}")
  else:
    print("fewer than 2 batch sizes reached the target: no fit")


if __name__ == "__main__":
  app.run(main)
