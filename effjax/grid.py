"""Run a grid of experiment configs (variants x seeds), one workdir each, and tabulate.

A re-run skips runs whose ``summary.json`` exists and resumes unfinished ones from their
checkpoints (``train_and_evaluate`` does that), so a killed grid continues where it was.
"""

import copy
import csv
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from effjax import config as config_lib


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted keys set (derived FieldReferences follow).

  Raises:
    ConfigError: a key that the config does not have.
  """
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    try:
      for part in path:
        node = node[part]
      node[last]  # pylint: disable=pointless-statement
    except KeyError:
      raise config_lib.ConfigError(f"unknown config key {key!r} in a grid override") from None
    node[last] = value
  return c


def expand(base: ml_collections.ConfigDict, variants: Mapping[str, Mapping[str, Any]],
           seeds: Iterable[int], num_devices: int | None = None,
           ) -> list[tuple[str, str, int, ml_collections.ConfigDict]]:
  """``(run_name, variant, seed, config)`` for every variant and seed, all validated
  (for ``num_devices`` devices, if given) before any of them runs."""
  runs = []
  for variant, overrides in variants.items():
    for seed in seeds:
      c = with_overrides(base, dict(overrides, seed=seed))
      config_lib.validate(c, num_devices)
      runs.append((f"{variant}/seed{seed}", variant, seed, c))
  return runs


def run(runs: Sequence[tuple[str, str, int, ml_collections.ConfigDict]], workdir: str,
        log=print) -> list[dict]:
  """Trains each run in ``workdir/<run_name>`` in turn; returns one row per run.

  Each row holds ``run``, ``variant``, ``seed`` and the run's ``summary.json`` fields.
  """
  # Imported here: the trainer pulls in the data pipeline, which a table reader needs not.
  from effjax import trainer  # pylint: disable=g-import-not-at-top
  rows = []
  for i, (name, variant, seed, c) in enumerate(runs):
    d = os.path.join(workdir, name)
    path = os.path.join(d, "summary.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        summary = json.load(f)
      log(f"[{i + 1}/{len(runs)}] {name}: done before, {_headline(summary)}")
    else:
      log(f"[{i + 1}/{len(runs)}] {name}: training")
      summary = trainer.train_and_evaluate(c, d, verbose=False)
      log(f"[{i + 1}/{len(runs)}] {name}: {_headline(summary)}, "
          f"{summary['wall_time_sec']:.0f}s")
    rows.append({"run": name, "variant": variant, "seed": seed, **summary})
  return rows


def _headline(summary: dict) -> str:
  """The run's main eval number: bits per byte for an LM, else accuracy, else loss."""
  for key in ("eval/bits_per_byte", "eval/linear_probe_accuracy", "eval/accuracy", "eval/loss"):
    if key in summary:
      return f"{key} {summary[key]:.4f}"
  return "no eval metrics"


def summarize(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
  """Per variant (in first-seen order): ``n`` and mean, sample std, min, max of each metric."""
  order, groups = [], {}
  for r in rows:
    if r["variant"] not in groups:
      order.append(r["variant"])
      groups[r["variant"]] = []
    groups[r["variant"]].append(r)
  table = []
  for v in order:
    out = {"variant": v, "n": len(groups[v])}
    for m in metrics:
      xs = [float(r[m]) for r in groups[v] if m in r]
      mean = sum(xs) / len(xs) if xs else math.nan
      std = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
             if len(xs) > 1 else 0.0)
      out.update({f"{m}/mean": mean, f"{m}/std": std, f"{m}/min": min(xs, default=math.nan),
                  f"{m}/max": max(xs, default=math.nan)})
    table.append(out)
  return table


def write_csv(rows: Sequence[dict], path: str) -> None:
  """Writes dict rows (union of their keys) to ``path`` atomically."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    w.writerows(rows)
  os.replace(path + ".tmp", path)


def markdown_table(summary: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A markdown table of ``summarize`` output.

  Args:
    summary: rows from ``summarize``.
    columns: ``(header, metric, format)``; a cell shows ``mean ± std`` of the metric.
  """
  head = "| variant | seeds | " + " | ".join(h for h, _, _ in columns) + " |"
  sep = "|---|---|" + "---|" * len(columns)
  lines = [head, sep]
  for s in summary:
    cells = [f"{s[m + '/mean']:{fmt}} ± {s[m + '/std']:{fmt}}" for _, m, fmt in columns]
    lines.append(f"| {s['variant']} | {s['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_experiment(base: ml_collections.ConfigDict, variants: Mapping[str, Mapping[str, Any]],
                   workdir: str, columns: Sequence[tuple[str, str, str]],
                   num_devices: int | None = None, seeds: Iterable[int] = (0,)) -> list[dict]:
  """``expand`` (every run validated first), ``run``, then ``runs.csv`` and ``summary.md``
  (the ``markdown_table`` of ``columns``, also printed) in ``workdir``. Each row gains
  ``learning_rate``, the run's optimizer LR.

  Raises:
    ConfigError: a variant's config is invalid (before anything runs).
  """
  runs = expand(base, variants, seeds, num_devices)
  os.makedirs(workdir, exist_ok=True)
  rows = run(runs, workdir)
  for row, (_, _, _, c) in zip(rows, runs):
    row["learning_rate"] = float(c.optimizer.learning_rate)
  write_csv(rows, os.path.join(workdir, "runs.csv"))
  table = markdown_table(summarize(rows, [m for _, m, _ in columns]), columns)
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  return rows
