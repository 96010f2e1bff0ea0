"""Learning-rate schedules for large-batch training, as optax schedules."""

import optax

DECAYS = ("cosine", "poly", "linear", "constant", "wsd")


def warmup_schedule(peak_value: float, total_steps: int, warmup_steps: int = 0,
                    decay: str = "cosine", init_value: float = 0.0, end_value: float = 0.0,
                    power: float = 2.0, decay_fraction: float = 0.1) -> optax.Schedule:
  """Gradual linear warmup to ``peak_value``, then a decay to ``end_value``.

  Args:
    peak_value: the learning rate at the end of warmup (the scaled LR).
    total_steps: training steps in all, warmup included.
    warmup_steps: linear warmup from ``init_value`` (Goyal et al.: about 5 epochs).
    decay: ``cosine``; ``poly`` (``(1 - t/T)^power``, the LARS recipe with power 2);
      ``linear``; ``constant``; or ``wsd`` (warmup-stable-decay: constant, then a linear
      decay over the last ``decay_fraction`` of all steps, MiniCPM).
    init_value: learning rate at step 0.
    end_value: learning rate at ``total_steps``.
    power: exponent of ``poly``.
    decay_fraction: share of ``total_steps`` in ``wsd``'s decay phase.

  Returns:
    An ``optax.Schedule``.

  References:
    Goyal et al. 2017, arXiv:1706.02677 (warmup); You et al. 2017, arXiv:1708.03888
    (polynomial decay, power 2); Hu et al. 2024, arXiv:2404.06395 (WSD).
  """
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    main = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=end_value / peak_value
                                       if peak_value else 0.0)
  elif decay in ("poly", "linear"):
    main = optax.polynomial_schedule(peak_value, end_value,
                                     power if decay == "poly" else 1.0, decay_steps)
  elif decay == "constant":
    main = optax.constant_schedule(peak_value)
  elif decay == "wsd":
    n_decay = max(int(round(decay_fraction * total_steps)), 1)
    n_stable = max(decay_steps - n_decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(peak_value),
         optax.linear_schedule(peak_value, end_value, n_decay)], [n_stable])
  else:
    raise ValueError(f"schedule.decay={decay!r} is not one of {DECAYS}")
  if warmup_steps == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(init_value, peak_value, warmup_steps), main], [warmup_steps])
