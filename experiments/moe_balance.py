r"""The MoE LM with the load-balancing loss over each replica's tokens ('micro') against
the global batch ('global'), at the same budget; validation loss, expert load and how
routing differs between classes of bytes in Python source.

  python -m experiments.moe_balance --config=configs/lm_python_stdlib.py:small \
      --workdir=DIR [--num_experts=4] [--top_k=1] [--steps=800]

Trains the config with ``model.moe.num_experts`` experts in every block, once per
balance scope (``effjax.grid``; re-running skips finished runs). Then, on the first
``--analysis_sequences`` validation sequences, it routes every real token with the final
parameters and reports per layer: each expert's share of tokens (load), and for the byte
classes whitespace, identifier characters (letters, ``_``), digits, punctuation and other
bytes, the share of each class's tokens on each expert, with the mutual information
I(class; expert) in bits as the specialisation measure (0: routing ignores the class).
Writes ``summary.md``, ``routing.json`` and ``routing.png`` to DIR.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "An LM config (task='lm').")
flags.DEFINE_string("workdir", None, "Directory for the runs and the tables.")
flags.DEFINE_integer("num_experts", 4, "Experts per MoE layer.")
flags.DEFINE_integer("top_k", 1, "Experts per token.")
flags.DEFINE_integer("steps", 800, "Train steps of each run (the same budget).")
flags.DEFINE_float("balance_coef", 0.01, "alpha of the balance loss.")
flags.DEFINE_integer("analysis_sequences", 256, "Validation sequences routed for the tables.")

CLASSES = ("whitespace", "identifier", "digit", "punctuation", "other")


def byte_class(tokens: np.ndarray) -> np.ndarray:
  """The class index (``CLASSES``) of each byte token (effjax.data.text: byte + 2)."""
  b = tokens.astype(np.int64) - 2
  ch = np.clip(b, 0, 255).astype(np.uint8)
  is_ws = np.isin(ch, list(b" \t\n\r"))
  is_id = ((ch >= ord("a")) & (ch <= ord("z"))) | ((ch >= ord("A")) & (ch <= ord("Z"))) | (
      ch == ord("_"))
  is_digit = (ch >= ord("0")) & (ch <= ord("9"))
  is_punct = np.isin(ch, list(b"!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"))
  out = np.full(b.shape, 4)
  for i, m in enumerate((is_ws, is_id, is_digit, is_punct)):
    out = np.where(m & (out == 4), i, out)
  return out


def mutual_information_bits(classes: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
  joint = np.zeros((len(CLASSES), num_experts))
  np.add.at(joint, (classes, experts), 1.0)
  joint /= joint.sum()
  pc, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log2(joint[nz] / (pc @ pe)[nz])))


def routing_table(config, workdir: str) -> dict:
  """Per layer: loads, class-by-expert shares and I(class; expert) of the final model."""
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import checkpoint as ckpt_lib, trainer  # pylint: disable=g-import-not-at-top
  setup = trainer.build(config)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  ck.close()
  state, _ = ckpt_lib.read_arrays(os.path.join(workdir, "checkpoints", str(step)))
  n = min(FLAGS.analysis_sequences, len(setup.eval_source))
  batch = setup.eval_source.gather(np.arange(n))
  model = setup.model.clone(moe_balance_axis=None)  # Outside shard_map: no data axis.
  _, aux = jax.jit(lambda p: model.apply(
      {"params": p}, batch["inputs"], segment_ids=batch["segment_ids"],
      positions=batch["positions"], train=False, mutable=["aux"]))(state["params"])
  real = batch["segment_ids"] > 0
  classes = byte_class(batch["inputs"])[real]
  layers = {}
  for name in sorted(aux["aux"]):
    experts = np.asarray(aux["aux"][name]["moe"]["expert"][0])[real]
    shares = np.zeros((len(CLASSES), FLAGS.num_experts))
    np.add.at(shares, (classes, experts), 1.0)
    counts = shares.sum(1, keepdims=True)
    layers[name] = {
        "load": (np.bincount(experts, minlength=FLAGS.num_experts) / len(experts)).tolist(),
        "class_tokens": counts[:, 0].astype(int).tolist(),
        "class_expert_share": (shares / np.maximum(counts, 1)).tolist(),
        "mutual_information_bits": mutual_information_bits(classes, experts, FLAGS.num_experts)}
  return layers


def main(argv):
  if len(argv) > 1 or FLAGS.config is None or not FLAGS.workdir:
    sys.exit("error: use --config=... --workdir=...")
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from effjax import config as config_lib, grid  # pylint: disable=g-import-not-at-top
  base = FLAGS.config
  common = {"model.moe.num_experts": FLAGS.num_experts, "model.moe.top_k": FLAGS.top_k,
            "model.moe.balance_coef": FLAGS.balance_coef,
            "dataset.num_train_examples": FLAGS.steps * base.batch_size, "curves": True}
  variants = {scope: {**common, "model.moe.balance": scope} for scope in ("micro", "global")}
  try:
    runs = grid.expand(base, variants, [0], jax.device_count())
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  rows = grid.run(runs, FLAGS.workdir)
  report = {}
  for row, (name, scope, _, c) in zip(rows, runs):
    last = read_last_train(os.path.join(FLAGS.workdir, name))
    report[scope] = {"eval/bits_per_byte": row["eval/bits_per_byte"],
                     "eval/loss": row["eval/loss"], "train": last,
                     "layers": routing_table(c, os.path.join(FLAGS.workdir, name))}
  with open(os.path.join(FLAGS.workdir, "routing.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(FLAGS.workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)
  plot(report, os.path.join(FLAGS.workdir, "routing.png"))


def read_last_train(workdir: str) -> dict:
  from effjax.metrics import read_jsonl  # pylint: disable=g-import-not-at-top
  rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
  return {k: v for k, v in rows[-1].items() if k.startswith("train/moe/")}


def markdown(report: dict) -> str:
  lines = ["| balance | eval bits/byte | layer | expert load | I(class; expert) bits |",
           "|---|---|---|---|---|"]
  for scope, r in report.items():
    for layer, t in r["layers"].items():
      lines.append(f"| {scope} | {r['eval/bits_per_byte']:.4f} | {layer} | "
                   f"{' / '.join(f'{x:.2f}' for x in t['load'])} | "
                   f"{t['mutual_information_bits']:.3f} |")
  lines += ["", "Share of each byte class's tokens on each expert (rows: classes):", ""]
  for scope, r in report.items():
    for layer, t in r["layers"].items():
      lines.append(f"{scope}, {layer}:")
      for cls, n, share in zip(CLASSES, t["class_tokens"], t["class_expert_share"]):
        lines.append(f"  {cls:12s} ({n:6d} tokens): " + " ".join(f"{x:.2f}" for x in share))
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """Class-by-expert shares, one panel per (scope, layer)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(s, l, t) for s, r in report.items() for l, t in r["layers"].items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
  for ax, (scope, layer, t) in zip(axes[0], panels):
    ax.imshow(np.asarray(t["class_expert_share"]), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"{scope}, {layer}\nI = {t['mutual_information_bits']:.2f} bits", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(CLASSES)), CLASSES if ax is axes[0][0] else [""] * len(CLASSES))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
