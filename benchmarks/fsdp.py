r"""FSDP: step time and state memory per device against the fsdp size, on one host.

  python benchmarks/fsdp.py

effjax's full train step of the byte-level LM (``configs/lm_python_stdlib.py``'s
width-256, 4-layer decoder; LAMB, whose trust ratios psum over ``fsdp``; 64 sequences of
128 bytes) on all devices, on the meshes (8, 1), (4, 2), (2, 4) and (1, 8): the same
work, the state split 1, 2, 4 or 8 ways. Timed side by side in interleaved repeats
(medians). Memory: parameters + optimizer state per device from the arrays' own
shardings, and the compiled step's temporaries (``memory_analysis``, per device).

On simulated CPU devices the all-gathers and reduce-scatters are memory copies between
threads of one process, so the time column measures FSDP's extra work (gathers per
step, per-leaf collectives), not network cost.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("fsdp", ["1", "2", "4", "8"], "fsdp sizes (each divides the devices).")
flags.DEFINE_string("optimizer", "lamb", "optimizer.name")
flags.DEFINE_integer("steps", 5, "Steps per timing.")
flags.DEFINE_integer("repeats", 5, "Repeats (medians).")


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax import fsdp  # pylint: disable=g-import-not-at-top
  from effjax.config import load_config  # pylint: disable=g-import-not-at-top
  from effjax.grid import with_overrides  # pylint: disable=g-import-not-at-top
  from effjax.parallel import Runner, make_mesh  # pylint: disable=g-import-not-at-top
  base = load_config("configs/lm_python_stdlib.py")
  n = len(jax.devices())
  runs, memory = {}, {}
  for k in map(int, FLAGS.fsdp):
    config = with_overrides(base, {"dataset.seq_len": 128, "optimizer.name": FLAGS.optimizer,
                                   "mesh.fsdp": k})
    run = compiled_step(config, Runner.from_config(config))
    fn, state, batch, _ = run
    temp = fn.lower(state, batch).compile().memory_analysis()
    memory[k] = (fsdp.bytes_per_device((state.params, state.opt_state)),
                 int(temp.temp_size_in_bytes) if temp is not None else 0)
    runs[k] = run
  num_params = sum(x.size for x in jax.tree.leaves(runs[1][1].params)) if 1 in runs else 0
  times = time_interleaved(runs, FLAGS.steps, FLAGS.repeats)
  print(f"{jax.devices()[0].device_kind} x{n}; LM {num_params:,} params, {FLAGS.optimizer}, "
        "64 x 128 tokens")
  print(f"{'mesh':>8s} {'step ms':>9s} {'vs fsdp=1':>10s} {'state MiB/dev':>14s} "
        f"{'vs fsdp=1':>10s} {'temp MiB/dev':>13s}")
  first = min(runs)
  for k in runs:
    state_b, temp_b = memory[k]
    print(f"{f'({n // k},{k})':>8s} {times[k] * 1e3:9.1f} {times[k] / times[first]:10.3f} "
          f"{state_b / 2**20:14.2f} {state_b / memory[first][0]:10.3f} {temp_b / 2**20:13.2f}")


if __name__ == "__main__":
  app.run(main)
