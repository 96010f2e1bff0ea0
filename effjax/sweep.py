"""Steps-to-target sweeps over the batch size, and the fit of the steps/batch trade-off.

Shallue et al. (arXiv:1811.03600) train the same model at many batch sizes, each with
its own tuned learning rate, and count the steps to a target error: perfect scaling at
small batches, then diminishing returns, then a maximal useful batch. McCandlish et al.
(arXiv:1812.06162) model that curve as ``S = S_min (1 + B_noise / B)``, so the examples
``E = S B = E_min (1 + B / B_noise)`` with ``E_min = S_min B_noise``, and predict the
critical batch ``B_crit = E_min / S_min`` from the gradient noise scale ``B_simple``.
"""

import concurrent.futures
import json
import math
import multiprocessing
import os
import threading
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from effjax import config as config_lib
from effjax import grid
from effjax import parallel
from effjax.optim.scaling import scale_learning_rate


def plan(config: ml_collections.ConfigDict) -> list[dict]:
  """One run per (batch size, LR multiplier) of ``config.sweep``.

  At each batch size the LRs are the multipliers times a center: the config's LR scaled
  to that batch by its scaling rule, or ``sweep.max_learning_rate`` if that is smaller
  (the best LR stops growing with the batch; Shallue et al.). No LR above
  ``sweep.max_learning_rate`` is tried. Each run trains for ``num_epochs`` or
  ``sweep.max_steps`` steps, whichever is fewer, unless it reaches the target first. Runs
  at batches of at least ``sweep.noise_min_batch`` also estimate the noise scale, with
  ``sweep.noise_accum_steps`` microbatches.

  Returns:
    Dicts with ``name``, ``batch_size``, ``lr_multiplier``, ``learning_rate`` and
    ``config`` (validated).
  """
  s = config.sweep
  runs = []
  for b in s.batch_sizes:
    b = int(b)
    seen = set()
    center = scale_learning_rate(config.optimizer.base_learning_rate, b,
                                 config.optimizer.base_batch_size, config.optimizer.scaling_rule)
    capped = min(center, s.max_learning_rate) if s.max_learning_rate else center
    for mult in s.lr_multipliers:
      base_lr = config.optimizer.base_learning_rate * mult * capped / center
      overrides = {"batch_size": b, "optimizer.base_learning_rate": base_lr}
      steps_per_epoch = config.dataset.num_train_examples // b
      if s.max_steps and config.num_epochs * steps_per_epoch > s.max_steps:
        overrides["num_epochs"] = s.max_steps / steps_per_epoch
      if s.noise_accum_steps > 1 and b >= s.noise_min_batch:
        overrides.update({"accum_steps": int(s.noise_accum_steps), "noise_scale.enabled": True})
      c = grid.with_overrides(config, overrides)
      config_lib.validate(c)
      lr = float(c.optimizer.learning_rate)
      if round(lr, 12) in seen or (s.max_learning_rate and lr > s.max_learning_rate * 1.000001):
        continue
      seen.add(round(lr, 12))
      runs.append({"name": f"b{b}_lr{lr:.4g}", "batch_size": b, "lr_multiplier": float(mult),
                   "learning_rate": lr, "config": c})
  return runs


def _exit_with_parent(parent: int) -> None:
  while True:
    time.sleep(1.0)
    if os.getppid() != parent:  # The sweep was killed: do not train on as an orphan.
      os._exit(1)  # pylint: disable=protected-access


def _init_worker(devices: int, parent: int) -> None:
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
  if devices:
    # Only the device count changes: a user's other XLA flags reach the workers too.
    os.environ["XLA_FLAGS"] = parallel.with_cpu_device_count(os.environ.get("XLA_FLAGS", ""),
                                                             devices)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


def _train(config_dict: dict, workdir: str):
  from effjax import trainer  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  summary = trainer.train_and_evaluate(ml_collections.ConfigDict(config_dict), workdir,
                                       verbose=False)
  return summary, time.perf_counter() - t


def _prepare_datasets(configs) -> None:
  """Generates each embedded dataset the runs read, here, before any worker starts: two
  workers generating the same one into an empty data dir race on its final rename
  (``FileExistsError``)."""
  from effjax import data as data_lib  # pylint: disable=g-import-not-at-top
  for name, data_dir, n in sorted({(c.dataset.name, c.dataset.data_dir or None,
                                     c.dataset.num_examples) for c in configs}, key=str):
    data_lib.get_builder(name, data_dir, num_examples=n)


def run(runs: Sequence[dict], workdir: str, workers: int = 1, devices: int = 1,
        log: Callable[[str], None] = print) -> list[dict]:
  """Trains the runs, ``workers`` at a time in separate processes (each with ``devices``
  simulated CPU devices; 0 keeps the environment's devices), in ``workdir/<name>``.

  Finished runs (a ``summary.json`` with a target step, or a completed run) are read, not
  retrained; unfinished ones resume. Returns one row per run: the plan's fields (no
  config) and the run's summary.
  """
  rows: dict[str, dict] = {}
  todo = []
  for r in runs:
    path = os.path.join(workdir, r["name"], "summary.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows[r["name"]] = json.load(f)
    else:
      todo.append(r)
  if rows:
    log(f"{len(rows)} of {len(runs)} runs finished before")
  _prepare_datasets([r["config"] for r in todo])
  ctx = multiprocessing.get_context("spawn")  # Fresh JAX in each worker.
  with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx,
                                              initializer=_init_worker,
                                              initargs=(devices, os.getpid())) as pool:
    # Derived FieldReferences do not pickle; the workers get the resolved values.
    futures = {pool.submit(_train, r["config"].to_dict(), os.path.join(workdir, r["name"])): r
               for r in todo}
    t0 = time.perf_counter()
    for i, fut in enumerate(concurrent.futures.as_completed(futures)):
      r = futures[fut]
      summary, seconds = fut.result()
      rows[r["name"]] = summary
      reached = summary.get("target_step")
      log(f"[{len(rows)}/{len(runs)}] {r['name']}: "
          + (f"target at step {reached} ({reached * r['batch_size']} examples)" if reached
             else f"target not reached in {summary['final_step']} steps")
          + f", {seconds:.0f}s; {time.perf_counter() - t0:.0f}s elapsed, "
          f"{len(todo) - i - 1} to go")
  return [{**{k: v for k, v in r.items() if k != "config"}, **rows[r["name"]]} for r in runs]


def best_per_batch(rows: Sequence[dict]) -> list[dict]:
  """For each batch size, the LR that reached the target in the fewest steps.

  Returns:
    Rows with ``batch_size``, ``steps``, ``examples`` (and for LMs ``tokens``),
    ``lr_multiplier``, ``learning_rate`` and ``b_simple`` (the run's noise scale when it reached the target,
    or NaN), sorted by batch size; batch sizes where no LR reached the target are left out.
  """
  best: dict[int, dict] = {}
  for r in rows:
    s = r.get("target_step")
    if s is None:
      continue
    b = r["batch_size"]
    if b not in best or s < best[b]["steps"]:
      best[b] = {"batch_size": b, "steps": int(s), "examples": int(s) * b,
                 "lr_multiplier": r["lr_multiplier"], "learning_rate": r["learning_rate"],
                 "b_simple": float(r.get("target/noise_scale/b_simple", math.nan))}
      if r.get("tokens") and r.get("examples"):  # LM: tokens per example, then per step.
        best[b]["tokens"] = int(s) * b * (r["tokens"] // r["examples"])
  return [best[b] for b in sorted(best)]


def fit_steps_model(batch_sizes: Sequence[float], steps: Sequence[float]) -> dict:
  """Fits ``S = S_min (1 + B_noise / B)`` by least squares on ``log S``.

  For a fixed ``B_noise`` the best ``log S_min`` is the mean of
  ``log S - log(1 + B_noise / B)``; ``B_noise`` itself is found by a log-spaced search
  refined around the best value.

  Returns:
    ``s_min``, ``b_noise`` (= ``B_crit = E_min / S_min``), ``e_min`` and ``rmse_log``
    (the fit's root-mean-square error in log steps).

  References:
    McCandlish et al. 2018, arXiv:1812.06162, eq. 2.11.
  """
  b = np.asarray(batch_sizes, np.float64)
  log_s = np.log(np.asarray(steps, np.float64))
  if len(b) < 2:
    raise ValueError(f"need at least 2 batch sizes that reached the target, got {len(b)}")

  def fit(b_noise):
    resid = log_s - np.log1p(b_noise / b)
    log_s_min = resid.mean()
    return np.sqrt(np.mean((resid - log_s_min) ** 2)), math.exp(log_s_min)

  lo, hi = math.log(b.min() / 100), math.log(b.max() * 100)
  for _ in range(4):
    grid_ = np.exp(np.linspace(lo, hi, 201))
    errs = [fit(x)[0] for x in grid_]
    k = int(np.argmin(errs))
    lo, hi = math.log(grid_[max(k - 2, 0)]), math.log(grid_[min(k + 2, 200)])
  b_noise = float(grid_[k])
  rmse, s_min = fit(b_noise)
  return {"s_min": s_min, "b_noise": b_noise, "e_min": s_min * b_noise, "rmse_log": rmse}


def target_label(target) -> str:
  """How a target reads on the plot: an accuracy (a float), or a label as given."""
  return f"{target:.1%} test accuracy" if isinstance(target, float) else str(target)


def config_target(config) -> tuple[str, float]:
  """``(label, value)`` of the sweep's target: ``target.accuracy`` or ``target.loss``
  (e.g. an LM's eval loss in nats per token).

  Raises:
    ValueError: the config sets neither.
  """
  if config.target.accuracy:
    return target_label(float(config.target.accuracy)), float(config.target.accuracy)
  if config.target.loss:
    return f"eval loss <= {config.target.loss:g}", float(config.target.loss)
  raise ValueError("the config sets no target: set target.accuracy or target.loss")


def plot(best: Sequence[dict], fitted: dict, b_simple: float, path: str, target) -> None:
  """Log-log steps-to-target against batch size, with the fit and ``B_simple`` marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  b = np.array([r["batch_size"] for r in best], float)
  s = np.array([r["steps"] for r in best], float)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  ax.loglog(b, s, "o", label="measured (best LR per batch)")
  bb = np.geomspace(b.min() / 2, b.max() * 2, 200)
  ax.loglog(bb, fitted["s_min"] * (1 + fitted["b_noise"] / bb), "-",
            label=f"S_min(1 + B_noise/B): B_crit = {fitted['b_noise']:.0f}")
  ax.axhline(fitted["s_min"], ls=":", c="gray", lw=1)
  if b_simple == b_simple:  # Not NaN.
    ax.axvline(b_simple, ls="--", c="C3", label=f"measured B_simple = {b_simple:.0f}")
  ax.axvline(fitted["b_noise"], ls=":", c="C1")
  ax.set_xlabel("global batch size B")
  ax.set_ylabel(f"steps to {target_label(target)}")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", lw=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, rows: Sequence[dict], best: Sequence[dict], fitted: dict | None,
          b_simple: float, target) -> dict:
  """Writes ``sweep.csv`` (every run), ``sweep.json`` (runs, best per batch, fit,
  B_simple) and, with a fit, ``steps_vs_batch.png``; returns the JSON content. ``target``
  is an accuracy (float) or a label such as ``config_target``'s."""
  grid.write_csv(list(rows), os.path.join(workdir, "sweep.csv"))
  out = {"target": target_label(target), "runs": list(rows), "best": list(best),
         "fit": fitted, "b_simple": b_simple}
  path = os.path.join(workdir, "sweep.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, default=lambda x: None)
  os.replace(path + ".tmp", path)
  if fitted:
    plot(best, fitted, b_simple, os.path.join(workdir, "steps_vs_batch.png"), target)
  return out


def measured_b_simple(best: Sequence[dict]) -> float:
  """The median noise scale at the target over the best runs that estimated it."""
  xs = [r["b_simple"] for r in best if r["b_simple"] == r["b_simple"]]
  return float(np.median(xs)) if xs else math.nan

