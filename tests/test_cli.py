"""The experiment module: one-line errors that leave the workdir alone, dry runs, exit codes."""

import pytest

from tests.helpers import run_cli, snapshot

SMALL = "--config=configs/mnist1d_large_batch.py:small"


@pytest.mark.parametrize("args, expected", [
    (["--config.foo=1"], "unknown config key in '--config.foo=1'"),
    (["--config.model.name=vgg"], "model.name='vgg' is not one of"),
    (["--config.optimizer.name=adagrad"], "optimizer.name='adagrad' is not one of"),
    (["--config.dataset.name=svhn"], "dataset.name='svhn' is not one of"),
    (["--config.batch_size=100"], "batch_size=100 is not divisible by the 8 devices"),
    (["--config.batch_size=0"], "batch_size=0 must be a positive integer"),
    (["--config.optimizer.base_learning_rate=-0.1"],
     "optimizer.base_learning_rate=-0.1 must be a positive number"),
    (["--config.schedule.warmup_epochs=50"], "schedule.warmup_epochs=50.0 gives"),
    (["--config.parallel=pjit"], "parallel='pjit' is not one of ('shard_map', 'pmap')"),
    (["--config.task=lm"], "task='lm' needs a text dataset and model.name='decoder_lm'"),
    (["--config.dataset.name=cifar10", "--config.dataset.num_train_examples=50000",
      "--config.model.name=resnet20", "--config.dataset.data_dir={tmp}/no_data"],
     "dataset 'cifar10' not found: data_dir '{tmp}/no_data' does not exist"),
])
def test_bad_config_is_one_line_error_and_workdir_untouched(data_dir, tmp_path, args, expected):
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = snapshot(workdir)
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  proc = run_cli([SMALL, f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"] + args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ") and expected.replace("{tmp}", str(tmp_path)) in lines[0]
  assert snapshot(workdir) == before


def test_a_config_file_that_does_not_load_is_one_line_error_exit_2(tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "raises.py").write_text("def get_config():\n  raise RuntimeError('no GPU here')\n")
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = snapshot(workdir)
  cases = {"configs/missing.py": "No such file or directory",
           str(tmp_path / "syntax.py"): "SyntaxError: ",
           str(tmp_path / "raises.py"): "RuntimeError: no GPU here",
           "configs/lm_python_stdlib.py:huge": "size='huge' is not one of ('full', 'small', '1.3b')"}
  for path, expected in cases.items():
    proc = run_cli([f"--config={path}", f"--workdir={workdir}"])
    assert proc.returncode == 2, (path, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot load --config={path}: ") and expected in lines[0]
  assert snapshot(workdir) == before


def test_workdir_that_is_a_file_is_refused(data_dir, tmp_path):
  target = tmp_path / "file"
  target.write_text("precious")
  proc = run_cli([SMALL, f"--workdir={target}", f"--config.dataset.data_dir={data_dir}"])
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: workdir '{target}' is a file; it must be a directory"
  assert target.read_text() == "precious"


def test_nonfinite_exits_3_with_the_step(data_dir, tmp_path):
  proc = run_cli(["--config=configs/mnist1d_sgd.py:canonical", f"--workdir={tmp_path}",
                  f"--config.dataset.data_dir={data_dir}", "--config.optimizer.name=sgd",
                  "--config.optimizer.base_learning_rate=1e30", "--config.log_every=5",
                  "--config.model.widths=(8,8)"])
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert proc.stderr.strip().startswith("error: non-finite loss or gradient at step ")


def test_dry_run_reports_size_cost_and_memory():
  proc = run_cli(["--config=configs/cifar10_resnet18.py", "--dry_run",
                  "--config.dry_run_devices=32"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = dict(line.split(":", 1) for line in proc.stdout.strip().splitlines())
  out = {k.strip(): v.strip() for k, v in out.items()}
  assert out["parameters"] == "11,173,962"  # The standard CIFAR ResNet-18.
  assert out["devices"] == "32" and out["per-device batch"] == "128"
  flops = float(out["FLOPs per step"])
  # CIFAR ResNet-18: 0.56 GMACs = 1.11 GFLOPs forward per image; a train step is about
  # 3x forward (less the input gradient, which is not needed).
  assert 2.5e9 * 4096 < flops < 3 * 1.11e9 * 4096
  assert out["memory per device"].endswith("MiB")
