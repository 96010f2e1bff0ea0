r"""Contrastive pretraining experiments: linear probe against batch size, global against
local negatives, and the supervised CNN on the same labels.

  python -m experiments.contrastive --config=configs/simclr_mnist1d.py:small --workdir=DIR \
      [--batch_sizes=128,256,512,1024,2048,4096] [--lr_multipliers=0.5,1,2] \
      [--local_batch_sizes=128,512,4096] [--supervised]

(a) For each batch size and LR multiplier, SimCLR with the config's epochs and
    ``optimizer.base_learning_rate`` times the multiplier (the linear rule from there).
(b) For each of ``--local_batch_sizes`` and ``--local_lr_multipliers``, the same run
    with ``contrastive.negatives='local'``.
(c) With ``--supervised``: the same trunk trained as a classifier (``cnn1d``, LARS, the
    dataset's shift-and-noise augmentation, the same epochs and batch) on the probe's
    labelled rows only, and on all train labels.
Writes ``runs.csv``, ``summary.md`` and ``probe_vs_batch.png`` to DIR; re-running skips
finished runs (``effjax.grid``).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A contrastive config (task='contrastive').")
flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
flags.DEFINE_list("batch_sizes", ["128", "256", "512", "1024", "2048", "4096"],
                  "(a) global batch sizes.")
flags.DEFINE_list("lr_multipliers", ["0.5", "1", "2"], "(a) times the config's base LR.")
flags.DEFINE_list("local_batch_sizes", ["128", "512", "4096"],
                  "(b) batch sizes also run with negatives='local'.")
flags.DEFINE_list("local_lr_multipliers", ["1"], "(b) LR multipliers of the local runs.")
flags.DEFINE_bool("supervised", True, "(c) the supervised CNN on the same labels.")

COLUMNS = [("linear probe", "eval/linear_probe_accuracy", ".4f"),
           ("kNN", "eval/knn_accuracy", ".4f"),
           ("supervised test acc", "eval/accuracy", ".4f"),
           ("raw-signal probe", "baseline/raw_linear_probe_accuracy", ".4f"),
           ("LR", "learning_rate", ".3g"), ("batch", "batch_size", ".0f"),
           ("steps", "final_step", ".0f"), ("wall time (s)", "wall_time_sec", ".0f")]


def _supervised(config, labelled: int) -> dict:
  """The trunk as a supervised classifier (the LARS recipe of mnist1d_large_batch.py)."""
  out = {"task": "classification", "model.name": "cnn1d", "model.norm": "batch",
         "input.augment": "default", "optimizer.base_learning_rate": 2.0,
         "optimizer.weight_decay": 5e-4, "schedule.decay": "poly"}
  if labelled < config.dataset.num_train_examples:
    out.update({"dataset.train_split": f"train[:{labelled}]",
                "dataset.num_train_examples": labelled})
  return out


def variants(config) -> dict:
  out = {}
  base_lr = config.optimizer.base_learning_rate
  for b in map(int, FLAGS.batch_sizes):
    for m in FLAGS.lr_multipliers:
      out[f"b{b}_lr_x{m}"] = {"batch_size": b, "optimizer.base_learning_rate": base_lr * float(m)}
  for b in map(int, FLAGS.local_batch_sizes):
    for m in FLAGS.local_lr_multipliers:
      name = f"b{b}_local" + ("" if float(m) == 1 else f"_x{m}")
      out[name] = {"batch_size": b, "contrastive.negatives": "local",
                   "optimizer.base_learning_rate": base_lr * float(m)}
  if FLAGS.supervised:
    probe = config.contrastive.probe_examples
    out[f"supervised_{probe}_labels"] = _supervised(config, probe)
    out["supervised_all_labels"] = _supervised(config, config.dataset.num_train_examples)
  return out


def main(argv):
  if len(argv) > 1 or FLAGS.config is None or not FLAGS.workdir:
    sys.exit("error: use --config=... --workdir=...")
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from effjax import grid  # pylint: disable=g-import-not-at-top
  if FLAGS.config.task != "contrastive":
    sys.exit(f"error: --config has task={FLAGS.config.task!r}; this needs task='contrastive'")
  try:
    rows = grid.run_experiment(FLAGS.config, variants(FLAGS.config), FLAGS.workdir, COLUMNS,
                               jax.device_count())
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  plot(rows, os.path.join(FLAGS.workdir, "probe_vs_batch.png"))


def plot(rows, path: str) -> None:
  """Linear-probe accuracy against batch size: global negatives at the best LR, global
  and local negatives at each ``--local_lr_multipliers``, and the supervised references;
  the raw-signal probe is in the title."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from effjax import plot as effjax_plot  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  probe = lambda r: r["eval/linear_probe_accuracy"]
  best = {}
  for r in rows:
    if "_lr_x" in r["variant"] and "_local" not in r["variant"]:
      best[r["batch_size"]] = max(best.get(r["batch_size"], 0.0), probe(r))
  if best:
    ax.semilogx(*zip(*sorted(best.items())), "o-", base=2, c="k", label="global, best LR")
  for i, m in enumerate(FLAGS.local_lr_multipliers):
    suffix = "" if float(m) == 1 else f"_x{m}"
    glob = sorted((r["batch_size"], probe(r)) for r in rows if r["variant"].endswith(f"_lr_x{m}"))
    local = sorted((r["batch_size"], probe(r)) for r in rows
                   if r["variant"].endswith("_local" + suffix))
    if glob:
      ax.semilogx(*zip(*glob), "o-", base=2, c=f"C{i}", lw=1, label=f"global, LR x{m}")
    if local:
      ax.semilogx(*zip(*local), "s--", base=2, c=f"C{i}", label=f"local, LR x{m}")
  for r, style in zip([r for r in rows if r["variant"].startswith("supervised")], ["-.", ":"]):
    ax.axhline(r["eval/accuracy"], ls=style, c="gray",
               label=f"{r['variant'].replace('_', ' ')} (test acc)")
  raw = next((r["baseline/raw_linear_probe_accuracy"] for r in rows
              if "baseline/raw_linear_probe_accuracy" in r), None)
  if raw is not None:
    ax.set_title(f"SimCLR linear probe (probe on the raw signal: {raw:.3f})", fontsize=10)
  effjax_plot.finish(fig, ax, path, "global batch size", "test accuracy")


if __name__ == "__main__":
  app.run(main)
