r"""Kernels in the compiled train steps of ``benchmarks/train_step.py``: (a0) and (b).

  python benchmarks/step_kernels.py --models=cnn1d,lm

Counts the instructions of the optimized HLO's entry computation that run as kernels
(fusions, convolutions, dots, collectives, copies, sorts; not parameters, tuples,
bitcasts or constants), on 8 simulated CPU devices, and among them the select kernels
(``broadcast_select_fusion``): in (a0) mostly the non-finite guard's selects that XLA
could not fuse into the kernel writing their array; (b), which has no guard, has a few
of its own. On XLA:CPU every kernel is a pass over its operands and a launch of its own,
so the counts say where a step does more passes than (b). The last columns count the
all-reduce operands: XLA:CPU meets the replicas once per operand of an all-reduce (on
GPU and TPU its combiner merges small ones), so each is a rendezvous of all 8 threads.
"""

import collections
import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import train_step as ts  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS  # --models is train_step.py's flag.

_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def count_kernels(hlo_text: str) -> tuple[int, int]:
  """``(kernels, select kernels)`` in the entry computation of ``hlo_text``."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  ops = collections.Counter(re.findall(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z\-]+)\(", entry, re.M))
  selects = re.findall(r"^\s*(?:ROOT )?%broadcast_select_fusion(?:\.\d+)? = ", entry, re.M)
  return sum(v for k, v in ops.items() if k not in _NOT_KERNELS), len(selects)


def count_all_reduce_operands(hlo_text: str) -> int:
  """Operands of all the all-reduce instructions in ``hlo_text`` (every computation)."""
  calls = re.findall(r" all-reduce(?:-start)?\((.*?)\), ", hlo_text)
  return sum(c.count("%") for c in calls)


def main(_):
  from benchmarks.common import compiled_step  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib, trainer  # pylint: disable=g-import-not-at-top

  print("| model | (a0) kernels | (a0) selects | (b) kernels | (b) selects "
        "| (a0) all-reduce operands | (b) all-reduce operands |")
  print("|---|---|---|---|---|---|---|")
  for name in FLAGS.models:
    dataset, batch, _, overrides = ts.MODELS[name]
    lean = ts._config(name, dataset, batch, overrides, False, "float32")  # pylint: disable=protected-access
    fn, state, b, _ = compiled_step(lean)
    a0_hlo = fn.lower(state, b).compile().as_text()
    a0 = count_kernels(a0_hlo)
    minimal = ts._minimal_lm_step if name == "lm" else ts._minimal_flax_step  # pylint: disable=protected-access
    (bf, bs, bb, _), _ = minimal(lean, trainer.Runner(lean.parallel), data_lib.get_spec(dataset))
    ref_hlo = bf.lower(bs, bb).compile().as_text()
    ref = count_kernels(ref_hlo)
    print(f"| {name} | {a0[0]} | {a0[1]} | {ref[0]} | {ref[1]} "
          f"| {count_all_reduce_operands(a0_hlo)} | {count_all_reduce_operands(ref_hlo)} |",
          flush=True)


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
  app.run(main)
