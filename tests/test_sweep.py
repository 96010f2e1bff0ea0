"""Steps-to-target runs and the sweep's fit of S = S_min (1 + B_noise / B)."""

import json
import math
import os

import numpy as np
import pytest

import effjax
from effjax import sweep, trainer
from tests.helpers import REPO, run_cli, tiny_config, xla_flags


def test_fit_recovers_the_model_from_exact_and_noisy_points():
  b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], float)
  s = 300.0 * (1 + 700.0 / b)
  fit = sweep.fit_steps_model(b, s)
  assert fit["b_noise"] == pytest.approx(700.0, rel=1e-3)
  assert fit["s_min"] == pytest.approx(300.0, rel=1e-3)
  assert fit["e_min"] == pytest.approx(300.0 * 700.0, rel=2e-3)
  noisy = s * np.exp(np.random.RandomState(0).normal(0, 0.05, len(b)))
  assert sweep.fit_steps_model(b, noisy)["b_noise"] == pytest.approx(700.0, rel=0.25)
  with pytest.raises(ValueError, match="at least 2 batch sizes"):
    sweep.fit_steps_model([64], [100])


def test_best_per_batch_picks_the_fastest_lr_that_reached_the_target():
  rows = [{"batch_size": 64, "lr_multiplier": 1.0, "learning_rate": 0.1, "target_step": 500},
          {"batch_size": 64, "lr_multiplier": 2.0, "learning_rate": 0.2, "target_step": 300,
           "target/noise_scale/b_simple": 150.0},
          {"batch_size": 128, "lr_multiplier": 1.0, "learning_rate": 0.2, "target_step": None}]
  best = sweep.best_per_batch(rows)
  assert best == [{"batch_size": 64, "steps": 300, "examples": 19200, "lr_multiplier": 2.0,
                   "learning_rate": 0.2, "b_simple": 150.0}]
  assert sweep.measured_b_simple(best) == 150.0


def test_plan_centers_learning_rates_on_the_capped_rule(data_dir):
  c = tiny_config(data_dir, **{"sweep.batch_sizes": (32, 512),
                               "sweep.lr_multipliers": (0.5, 1.0, 2.0),
                               "sweep.max_learning_rate": 0.3, "sweep.max_steps": 100,
                               "sweep.noise_min_batch": 64})
  runs = sweep.plan(c)
  # tiny_config: base LR 0.2 at 256, linear rule; at 512 the center 0.4 is capped at 0.3,
  # and 0.6 is above the cap.
  got = [(r["batch_size"], round(r["learning_rate"], 6)) for r in runs]
  assert got == [(32, 0.0125), (32, 0.025), (32, 0.05), (512, 0.15), (512, 0.3)]
  assert runs[0]["config"].num_train_steps == 100  # 125 steps/epoch, capped at 100.
  assert runs[-1]["config"].noise_scale.enabled and runs[-1]["config"].accum_steps == 4
  assert not runs[0]["config"].noise_scale.enabled


def test_target_eval_steps_are_geometric():
  steps = trainer.target_eval_steps(8, 1.1, 100)
  assert steps[:6] == [8, 9, 10, 11, 13, 15] and steps[-1] <= 100
  assert all(b / a <= 1.1 + 1 / a for a, b in zip(steps, steps[1:]))


def test_run_stops_at_its_target_and_a_rerun_keeps_the_result(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=4.0, **{"target.accuracy": 0.6})
  summary = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  step = summary["target_step"]
  assert step is not None and step < config.num_train_steps
  assert summary["eval/accuracy"] >= 0.6 and summary["final_step"] == step
  assert (step in trainer.target_eval_steps(8, 1.1, config.num_train_steps) or
          step % config.eval_every_steps == 0)
  rows = effjax.metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  evals = [r for r in rows if "eval/accuracy" in r]
  assert all(r["eval/accuracy"] < 0.6 for r in evals[:-1]) and evals[-1]["step"] == step
  again = effjax.train_and_evaluate(config, str(tmp_path), verbose=False)
  assert again == json.loads((tmp_path / "summary.json").read_text())


def test_the_notebook_runs_the_tiny_sweep_as_opened(data_dir, tmp_path, monkeypatch):
  """critical_batch.ipynb with no EFFJAX_SWEEP_DIR runs configs/sweep_mnist1d.py:tiny
  (the CLI) into workdirs/ beside it; all 5 batch sizes reach the target, so the fit
  is over 5 points, and the notebook prints and draws it. As on a fresh machine, the
  data dir starts empty: the sweep generates mnist1d once, before its two workers start
  (both generating it raced on the final rename, FileExistsError)."""
  from tests.test_notebooks import _execute, outputs_and_text  # pylint: disable=g-import-not-at-top
  del data_dir
  monkeypatch.delenv("EFFJAX_SWEEP_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty_tfds"))
  monkeypatch.setenv("PYTHONPATH", REPO)
  nb = _execute("critical_batch.ipynb", tmp_path)
  out = tmp_path / "workdirs" / "sweep_mnist1d_tiny"
  with open(out / "sweep.json") as f:
    result = json.load(f)
  assert len(result["runs"]) == 5 and len(result["best"]) >= 4
  assert result["fit"]["b_noise"] > 0 and math.isfinite(result["b_simple"])
  assert result["fit"]["rmse_log"] > 0  # Over 4+ points the fit is no longer exact.
  assert os.path.getsize(out / "steps_vs_batch.png") > 1000
  assert (out / "sweep.csv").read_text().count("\n") == 6
  outputs, text = outputs_and_text(nb)
  assert "no EFFJAX_SWEEP_DIR: running configs/sweep_mnist1d.py:tiny" in text
  assert f"B_crit = {result['fit']['b_noise']:.0f}" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2


def _children(pid):
  kids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
      except (OSError, IndexError, ValueError):
        continue
  return kids


def test_killed_sweep_leaves_no_workers_training(data_dir, tmp_path):
  """SIGKILL to the sweep: its worker processes notice and exit instead of training on."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.batch_size_sweep",
       "--config=configs/sweep_mnist1d.py:tiny", f"--workdir={tmp_path}",
       f"--config.dataset.data_dir={data_dir}"], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  workers = []
  while time.time() < deadline and len(workers) < 2:
    time.sleep(0.5)
    workers = [p for p in _children(proc.pid)
               if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
  assert len(workers) == 2
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 30
  while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and
                                       "Z" not in open(f"/proc/{p}/stat").read().split()[2]
                                       for p in workers):
    time.sleep(0.5)
  alive = [p for p in workers if os.path.exists(f"/proc/{p}")
           and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
  assert not alive
