"""2 processes x 4 CPU devices (gloo) train exactly like 1 process x 8 devices, random
augmentation included: every row's draws come from (seed, its global stream position),
so the 2 processes' global batches are the 1-process run's. A signal to one of the two
processes stops both at the same step, and they resume from it."""

import os
import signal

import numpy as np

from effjax import EXIT_PREEMPTED
from effjax.metrics import read_jsonl
from tests.helpers import run_cli
from tests.test_reliability import RNG, SEED, _final_checkpoint, _signal_at, _two_hosts

# 31 steps of 128, sync BN, augmentation; no periodic saves (the saves under test are the
# agreed one at the signal and the final one).
ARGS = ["--config=configs/mnist1d_sgd.py:canonical", "--config.num_epochs=1", "--config.curves=False",
        "--config.log_every=4", "--config.model.widths=(16,32)", "--config.model.norm=sync_batch",
        "--config.input.augment=shift_noise", "--config.checkpoint.every_steps=0"]
TOTAL = 31


def test_two_hosts_preempted_and_resumed_match_one_host(data_dir, tmp_path):
  """SIGTERM reaches process 1 of the 2-process run only: both processes agree on the
  step, save it and exit 4; two processes then resume from it and finish, and the run
  trains like the 1-process run (resumption is bitwise, test_reliability.py)."""
  single = tmp_path / "single"
  proc = run_cli(ARGS + [f"--workdir={single}", f"--config.dataset.data_dir={data_dir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]

  # Signals are handled at a log point (every 4 steps): the stop comes before step 31.
  k = RNG.randrange(2, TOTAL - 8)
  msg = f"seed {SEED}, SIGTERM to process 1 after step {k}"
  multi = str(tmp_path / "multi")
  procs = _two_hosts(ARGS, multi, data_dir)
  outs = _signal_at(procs, multi, k, signal.SIGTERM, target=procs[1])
  lines = [err.strip().splitlines()[-1] for _, err in outs]
  assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, f"{msg}: {lines}"
  saved = [int(l.split("at step ")[1].split()[0]) for l in lines]
  assert lines[1].startswith("preempted by SIGTERM") and saved[0] == saved[1] >= k, msg
  assert lines[0].startswith("preempted by a signal to process 1: "), msg
  assert _final_checkpoint(multi)[0] == saved[0], msg
  procs = _two_hosts(ARGS, multi, data_dir)
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], f"{msg}: {[o[1][-2000:] for o in outs]}"
  assert f"resumed from step {saved[0]}" in outs[0][0], msg
  assert _final_checkpoint(multi)[0] == TOTAL, msg

  a = read_jsonl(str(single / "metrics.jsonl"))
  b = read_jsonl(os.path.join(multi, "metrics.jsonl"))
  assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 7, msg
  # Same (augmented) batches and same maths; only the order of float additions in the all-reduce
  # differs (gloo across processes vs. in-process), a 1e-7 difference that later steps
  # amplify. The first logged point must agree to float precision, the loss curve to
  # 0.2%, and the (noisier) gradient norm to 1%.
  for key, rtol in (("train/loss", 2e-3), ("param_norm", 2e-3), ("grad_norm", 1e-2)):
    np.testing.assert_allclose(b[0][key], a[0][key], rtol=1e-5, err_msg=f"{msg} {key}")
    np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=rtol,
                               err_msg=f"{msg} {key}")
  np.testing.assert_allclose(b[-1]["eval/accuracy"], a[-1]["eval/accuracy"], atol=5e-3)
