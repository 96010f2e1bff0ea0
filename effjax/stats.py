"""The gradient noise scale, estimated online from gradients at two batch sizes.

In data-parallel training each replica (or each accumulation microbatch) holds a
small-batch gradient and the all-reduce produces the big-batch one; their squared norms
give unbiased estimates of |G|^2 and tr(Sigma) (McCandlish et al. 2018, Appendix A).
Both estimates are noisy, so the train state keeps an exponential moving average of each,
and the noise scale is the ratio of the averages.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def noise_scale_from_norms(sq_norm_small, sq_norm_big, batch_small, batch_big):
  """Unbiased estimates of the true gradient's squared norm and the per-example
  gradient covariance's trace, from gradient norms at two batch sizes.

  ``|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
  ``tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)``.

  Args:
    sq_norm_small: squared norm of a gradient over ``batch_small`` examples (or the mean
      of several such squared norms, which has the same expectation).
    sq_norm_big: squared norm of the gradient over ``batch_big`` examples.
    batch_small, batch_big: the two batch sizes (Python numbers), ``0 < small < big``.

  Returns:
    ``(g2, trace_sigma)``. Either can be negative for one sample; average before use.

  Raises:
    ValueError: unless ``0 < batch_small < batch_big``.

  References:
    McCandlish et al. 2018, arXiv:1812.06162, Appendix A.1.
  """
  if not 0 < batch_small < batch_big:
    raise ValueError(f"batch_small={batch_small} and batch_big={batch_big} must satisfy "
                     "0 < batch_small < batch_big")
  b_s, b_b = float(batch_small), float(batch_big)
  g2 = (b_b * sq_norm_big - b_s * sq_norm_small) / (b_b - b_s)
  trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_s - 1.0 / b_b)
  return g2, trace_sigma


class NoiseScaleState(NamedTuple):
  """Exponential moving averages of the two estimates (``count`` updates so far)."""
  g2: jax.Array
  trace_sigma: jax.Array
  count: jax.Array


def init_noise_scale() -> NoiseScaleState:
  z = jnp.zeros((), jnp.float32)
  return NoiseScaleState(g2=z, trace_sigma=z, count=jnp.zeros((), jnp.int32))


def update_noise_scale(state: NoiseScaleState, g2, trace_sigma, decay: float
                       ) -> NoiseScaleState:
  """Moves both averages toward this step's estimates by ``1 - decay``."""
  ema = lambda old, new: decay * old + (1.0 - decay) * jnp.asarray(new, jnp.float32)
  return NoiseScaleState(g2=ema(state.g2, g2), trace_sigma=ema(state.trace_sigma, trace_sigma),
                         count=state.count + 1)


def noise_scale_metrics(state: NoiseScaleState, decay: float) -> dict:
  """``noise_scale/{g2,trace_sigma,b_simple}`` from the averages.

  The averages start at 0, so each is divided by ``1 - decay**count`` (Adam's bias
  correction); the ratio ``b_simple = trace_sigma / g2`` is unaffected by it. Before the
  first update all three are 0.

  References:
    McCandlish et al. 2018, arXiv:1812.06162, eq. 2.8 (B_simple = tr(Sigma) / |G|^2).
  """
  correction = 1.0 - jnp.power(jnp.float32(decay), state.count.astype(jnp.float32))
  correction = jnp.where(state.count > 0, correction, 1.0)
  g2 = state.g2 / correction
  trace = state.trace_sigma / correction
  b_simple = jnp.where(state.g2 != 0, state.trace_sigma / jnp.where(state.g2 != 0, state.g2,
                                                                    1.0), 0.0)
  return {"noise_scale/g2": g2, "noise_scale/trace_sigma": trace,
          "noise_scale/b_simple": b_simple}
