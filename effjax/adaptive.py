"""Adaptive batch size: grow the global batch toward a multiple of the measured noise scale.

The input pipeline keeps producing global batches of ``config.batch_size`` (the base
batch, B0). A step at multiplier m trains on m consecutive base batches at once, as m times
the accumulation microbatches (``adaptive.grow = 'accumulate'``, constant activation
memory) or as an m times larger per-device batch (``'batch'``). Progress, the LR schedule,
evaluation and checkpoints are counted in base batches, so a run sees the same examples in
the same order whatever its batch sizes, and ends after the same number of examples. The
LR is the schedule at the current base step times the scaling rule's factor for m (``m``
for linear, ``sqrt(m)`` for sqrt), at most ``adaptive.max_learning_rate``: the best LR
stops growing with the batch beyond some size (Shallue et al.; McCandlish et al.'s
``eps_max / (1 + B_noise / B)``), and an LR doubled past it diverges.

References:
  McCandlish et al. 2018, arXiv:1812.06162 (B_crit ~ B_simple); Gray et al. 2024,
  arXiv:2411.00999 (a noise-scale-guided batch schedule); Smith et al. 2018,
  arXiv:1711.00489 (growing the batch instead of decaying the LR).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from effjax.optim.scaling import scale_learning_rate

BATCH_SCHEDULES = ("fixed", "adaptive", "warmup")
GROW_MODES = ("accumulate", "batch")


class BatchSizeState(NamedTuple):
  """Part of the train state under ``batch_schedule='adaptive'`` or ``'warmup'`` (so a
  resume restores it): base batches consumed so far, and the multiplier of the latest
  step."""
  base_step: jax.Array
  multiplier: jax.Array


def init_batch_size_state() -> BatchSizeState:
  return BatchSizeState(base_step=jnp.zeros((), jnp.int32), multiplier=jnp.ones((), jnp.int32))


def _floor_pow2(x: float) -> int:
  p = 1
  while p * 2 <= x:
    p *= 2
  return p


def max_multiplier(base_batch: int, max_batch: int) -> int:
  """The largest power of two m with ``m * base_batch <= max_batch`` (at least 1)."""
  return _floor_pow2(max(1.0, max_batch / base_batch))


def next_multiplier(current: int, b_simple: float, base_batch: int, multiple: float,
                    max_batch: int) -> int:
  """The multiplier for the next steps: the largest power of two m with
  ``m * base_batch <= multiple * b_simple``, within ``[current, max_multiplier]``.

  It never shrinks (the noise scale grows as the loss falls, and shrinking on a noisy
  estimate would oscillate), and ignores non-finite or non-positive estimates.

  Args:
    current: the multiplier in use.
    b_simple: the averaged noise scale estimate.
    base_batch: the pipeline's global batch (B0).
    multiple: target batch as a multiple of ``b_simple``.
    max_batch: upper bound on the global batch.

  Returns:
    The new multiplier (a power of two).
  """
  if not b_simple > 0 or b_simple != b_simple or b_simple == float("inf"):
    return current
  target = _floor_pow2(max(1.0, multiple * b_simple / base_batch))
  return max(current, min(target, max_multiplier(base_batch, max_batch)))


def lr_factor(multiplier: int, scaling_rule: str) -> float:
  """How much the LR grows for a batch ``multiplier`` times the base (linear/sqrt rule)."""
  return scale_learning_rate(1.0, multiplier, 1, scaling_rule)


def warmup_multiplier(base_step: int, base_batch: int, final_batch: int,
                      warmup_examples: int) -> int:
  """Batch-size warmup: the multiplier after ``base_step`` base batches.

  The global batch doubles from ``base_batch`` up to ``final_batch`` (a power of two
  times it) in equal spans of examples (or tokens, at a fixed number per example) over
  the first ``warmup_examples``, and then stays there. It depends only on the data
  consumed, which the checkpoint holds, so a resumed run continues with the batch it
  had, and the LR (the scaling rule's factor, see ``lr_factor``) and the EMA's momentum
  follow it. GPT-3 ramps linearly; here the batch doubles, because a step trains on a
  whole number of the pipeline's base batches (powers of two, as the adaptive batch).

  Args:
    base_step: base batches consumed so far.
    base_batch: the pipeline's global batch (the first stage's batch).
    final_batch: the batch after the warmup.
    warmup_examples: examples over which the batch ramps up (0: no warmup).

  Returns:
    A power of two m; the next step trains on ``m * base_batch`` examples.

  References:
    Brown et al. 2020, arXiv:2005.14165 (GPT-3's batch ramp in tokens); Hu et al. 2024,
    arXiv:2404.06395 (MiniCPM).
  """
  top = max_multiplier(base_batch, final_batch)
  doublings = top.bit_length() - 1
  if doublings == 0 or warmup_examples <= 0:
    return top
  span = warmup_examples / doublings
  stage = int(base_step * base_batch // span)
  return min(2 ** stage, top)
