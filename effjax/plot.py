"""Training curves from ``metrics.jsonl``: one figure, one or several runs overlaid.

``train_and_evaluate`` writes ``curves.png`` into the workdir at the end of a run;
``python -m experiments.plot WORKDIR [WORKDIR ...]`` draws any runs together. Needs
matplotlib (a dependency of effjax).
"""

import os
from typing import Optional, Sequence

from etils import epath

from effjax.metrics import read_jsonl

X_AXES = ("step", "examples")

# Panels, each a title and the metrics it draws (those a run logged; the rest are skipped).
PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("accuracy", ("train/accuracy", "eval/accuracy", "eval_ema/accuracy")),
    ("bits per byte", ("eval/bits_per_byte",)),
    ("probe accuracy", ("eval/linear_probe_accuracy", "eval/knn_accuracy")),
    ("learning rate", ("lr",)),
    ("norms", ("grad_norm", "param_norm", "update_norm")),
    ("trust ratio", ("trust_ratio/min", "trust_ratio/median", "trust_ratio/max")),
    ("noise scale B_simple", ("noise_scale/b_simple",)),
    ("batch size", ("batch_size",)),
)
_IF_CHANGING = {"batch size"}  # Drawn only when some run's value changes.
_LOG_SCALE = {"loss", "learning rate", "norms", "trust ratio", "noise scale B_simple"}


def series(rows: Sequence[dict], key: str, x: str = "step") -> tuple[list, list]:
  """``(xs, ys)`` of ``key`` in the rows that have it (x: the step, or examples as the
  sum of the logged batch sizes over the steps)."""
  if x not in X_AXES:
    raise ValueError(f"x={x!r} is not one of {X_AXES}")
  xs, ys, examples, last_step = [], [], 0, 0
  for r in rows:
    batch = r.get("batch_size", 0)
    examples += (r["step"] - last_step) * batch if batch else 0
    last_step = r["step"]
    if key in r and r[key] is not None:
      xs.append(r["step"] if x == "step" else examples)
      ys.append(r[key])
  return xs, ys


def plot_curves(workdirs: Sequence[str], path: str, x: str = "step",
                labels: Optional[Sequence[str]] = None) -> dict:
  """Draws every panel that any run has data for, the runs overlaid, and saves ``path``.

  Args:
    workdirs: run directories holding ``metrics.jsonl``.
    path: the image to write (PNG).
    x: ``'step'`` or ``'examples'``.
    labels: one legend label per run (default: the workdirs' base names).

  Returns:
    ``{panel: {label/metric: (xs, ys)}}``: exactly what was drawn.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = list(labels or [os.path.basename(os.path.normpath(os.fspath(w))) for w in workdirs])
  runs = [read_jsonl(epath.Path(w) / "metrics.jsonl") for w in workdirs]
  drawn = {}
  for title, keys in PANELS:
    lines = {f"{label}/{k}" if len(runs) > 1 else k: series(rows, k, x)
             for label, rows in zip(labels, runs) for k in keys}
    lines = {name: xy for name, xy in lines.items() if xy[0]}
    if title in _IF_CHANGING and all(len(set(ys)) <= 1 for _, ys in lines.values()):
      continue
    if lines:
      drawn[title] = lines
  if not drawn:
    raise ValueError(f"no metrics to plot in {list(map(os.fspath, workdirs))}")
  cols = min(3, len(drawn))
  rows_ = -(-len(drawn) // cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.2 * rows_), squeeze=False)
  for ax, (title, lines) in zip(axes.flat, drawn.items()):
    for name, (xs, ys) in lines.items():
      style = "o-" if len(xs) < 12 else "-"
      ax.plot(xs, ys, style, ms=3, lw=1.2, label=name)
    if title in _LOG_SCALE and all(y > 0 for _, ys in lines.values() for y in ys):
      ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x, fontsize=8)
    ax.grid(True, lw=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(drawn):]:
    ax.set_visible(False)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return drawn


def finish(fig, ax, path: str, xlabel: str, ylabel: str) -> None:
  """Labels, legend and grid on ``ax``, then saves ``fig`` to ``path`` and closes it (the
  experiments' single-panel figures)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", lw=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
