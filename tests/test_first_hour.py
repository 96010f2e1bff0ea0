"""What a new user meets first: quiet, truthful logs; curves.png; experiments.plot; no
workdir left behind by a run that fails before training."""

import json
import os
import shutil

import numpy as np
import pytest

import effjax
from effjax import plot
from effjax.metrics import read_jsonl
from tests.helpers import run_cli, tiny_config

TFDS_NOISE = ("Using custom data configuration", "Downloading and preparing",
              "downloaded and prepared", "Variant folder", "dataset_info.json")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """A first CLI run into a fresh data dir (so mnist1d is generated, at a custom size)."""
  root = tmp_path_factory.mktemp("first")
  workdir = root / "run"
  proc = run_cli(["--config=configs/mnist1d_sgd.py:canonical",
                  "--config.dataset.num_examples=3000", "--config.num_epochs=2",
                  "--config.model.widths=(8,16)", "--config.log_every=5",
                  f"--config.dataset.num_train_examples={2400}",
                  f"--config.dataset.data_dir={root / 'tfds'}", f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout + proc.stderr


def test_first_run_log_is_one_effjax_line_for_the_data_and_no_tfds_noise(first_run):
  _, log = first_run
  assert "effjax: generating mnist1d (3,000 examples) into " in log
  assert "nothing is downloaded" in log
  for noise in TFDS_NOISE:
    assert noise not in log, noise


def test_a_run_draws_curves_and_logs_counters_as_integers(first_run):
  workdir, log = first_run
  assert f"curves: {workdir / 'curves.png'}" in log
  assert (workdir / "curves.png").stat().st_size > 10_000
  rows = read_jsonl(workdir / "metrics.jsonl")
  for r in rows:
    assert type(r["batch_size"]) is int and type(r["optimizer_step"]) is int, r
  raw = (workdir / "metrics.jsonl").read_text().splitlines()[0]
  assert '"batch_size": 128,' in raw


def test_plot_overlays_two_workdirs_with_the_logged_numbers(first_run, tmp_path):
  workdir, _ = first_run
  other = tmp_path / "other"
  other.mkdir()
  rows = read_jsonl(workdir / "metrics.jsonl")
  with open(other / "metrics.jsonl", "w") as f:  # A second run: half the loss.
    for r in rows:
      f.write(json.dumps({**r, "train/loss": r["train/loss"] / 2}) + "\n")
  out = tmp_path / "both.png"
  drawn = plot.plot_curves([str(workdir), str(other)], str(out), x="examples")
  assert out.stat().st_size > 10_000
  xs, ys = drawn["loss"]["run/train/loss"]
  np.testing.assert_array_equal(ys, [r["train/loss"] for r in rows])
  np.testing.assert_array_equal(xs, [r["step"] * 128 for r in rows])  # Examples.
  np.testing.assert_allclose(drawn["loss"]["other/train/loss"][1], np.asarray(ys) / 2)
  evals = [r for r in rows if "eval/accuracy" in r]
  assert drawn["accuracy"]["run/eval/accuracy"][1] == [r["eval/accuracy"] for r in evals]
  assert {"learning rate", "norms"} <= set(drawn)
  proc = run_cli([str(workdir), str(other), f"--out={tmp_path / 'cli.png'}"],
                 module="experiments.plot", devices=1)
  assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]
  assert (tmp_path / "cli.png").stat().st_size > 10_000
  proc = run_cli([str(tmp_path / "nothing")], module="experiments.plot", devices=1)
  assert proc.returncode != 0 and "no metrics.jsonl" in proc.stderr


def test_a_first_run_that_fails_creates_nothing(data_dir, tmp_path):
  """A missing dataset and a bad value: the error comes before the workdir exists."""
  empty = tmp_path / "empty_data"
  empty.mkdir()
  for overrides, error in [({"dataset.name": "cifar10", "dataset.data_dir": str(empty),
                             "model.name": "resnet20", "dataset.num_train_examples": 50000},
                            effjax.data.DatasetError),
                           ({"batch_size": 100}, effjax.ConfigError)]:
    workdir = tmp_path / "new" / "run"
    with pytest.raises(error):
      effjax.train_and_evaluate(tiny_config(data_dir, **overrides), str(workdir))
    assert not (tmp_path / "new").exists()
  proc = run_cli(["--config=configs/mnist1d_sgd.py", "--config.dataset.name=imagenet2012",
                  "--config.model.name=resnet50", f"--config.dataset.data_dir={empty}",
                  f"--workdir={tmp_path / 'cli_new'}"])
  assert proc.returncode == 2 and "not found" in proc.stderr, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / "cli_new").exists()
  shutil.rmtree(empty)
