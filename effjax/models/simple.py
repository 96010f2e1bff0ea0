"""Small models for the embedded datasets: an MLP, a 1D convolutional net, and its trunk
with a contrastive projection head."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from effjax.models.norms import make_conv, make_norm


class MLP(nn.Module):
  """Flatten, then ``[Dense -> norm -> ReLU] * len(widths)``, then a linear classifier."""
  num_classes: int
  widths: Sequence[int] = (512, 512)
  norm: Any = "batch"  # A NORMS name or a NormConfig.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = make_norm(self.norm, train=train, dtype=self.dtype)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for w in self.widths:
      x = nn.relu(norm()(nn.Dense(w, dtype=self.dtype)(x)))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN1D(nn.Module):
  """A 1D conv net for mnist1d-style sequences ``(batch, length)`` or ``(batch, length, c)``.

  ``[Conv(k) -> norm -> ReLU]`` per width, stride 2 after the first layer, then global
  average and max pooling concatenated, then a linear classifier.
  """
  num_classes: int
  widths: Sequence[int] = (64, 128, 128)
  kernel_size: int = 5
  norm: Any = "batch"  # A NORMS name or a NormConfig.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = cnn1d_trunk(x, self.widths, self.kernel_size, self.norm, train, self.dtype)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def cnn1d_trunk(x, widths: Sequence[int], kernel_size: int, norm: Any, train: bool,
                dtype: Any):
  """``CNN1D`` without its classifier: the pooled features ``[b, 2 * widths[-1]]``.

  Call it inside a compact method: its layers become the caller's submodules (with the
  names ``CNN1D`` has always had)."""
  make = make_norm(norm, train=train, dtype=dtype)
  conv = make_conv(norm, dtype=dtype)
  if x.ndim == 2:
    x = x[..., None]
  x = x.astype(dtype)
  for i, w in enumerate(widths):
    x = conv(w, (kernel_size,), strides=(1 if i == 0 else 2,), use_bias=False)(x)
    x = nn.relu(make()(x))
  return jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)


class ContrastiveEncoder(nn.Module):
  """``CNN1D``'s trunk and SimCLR's projection head, for ``effjax.tasks.ContrastiveTask``.

  The head is ``[Dense -> norm -> ReLU]`` per ``projection_widths[:-1]``, then a linear
  ``Dense(projection_widths[-1])``; with ``norm='sync_batch'`` its BatchNorm spans the
  global batch, as in SimCLR. With ``logit_params`` (SigLIP's sigmoid loss) the module
  also holds the learnable ``logit_scale`` (initially ``log 10``) and ``logit_bias``
  (initially -10).

  Returns:
    ``{'features': [b, 2 * widths[-1]], 'projection': [b, projection_widths[-1]]}`` in
    float32, plus ``logit_scale`` and ``logit_bias`` with ``logit_params``.

  References:
    Chen et al. 2020, arXiv:2002.05709 (projection head); Zhai et al. 2023,
    arXiv:2303.15343 (the sigmoid loss's initial temperature and bias).
  """
  widths: Sequence[int] = (64, 128, 128)
  kernel_size: int = 5
  projection_widths: Sequence[int] = (256, 128)
  norm: Any = "batch"
  logit_params: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = cnn1d_trunk(x, self.widths, self.kernel_size, self.norm, train, self.dtype)
    make = make_norm(self.norm, train=train, dtype=self.dtype)
    z = h
    for w in self.projection_widths[:-1]:
      z = nn.relu(make()(nn.Dense(w, use_bias=False, dtype=self.dtype)(z)))
    z = nn.Dense(self.projection_widths[-1], dtype=self.dtype)(z)
    out = {"features": h.astype(jnp.float32), "projection": z.astype(jnp.float32)}
    if self.logit_params:
      out["logit_scale"] = self.param("logit_scale", nn.initializers.constant(jnp.log(10.0)),
                                      ())
      out["logit_bias"] = self.param("logit_bias", nn.initializers.constant(-10.0), ())
    return out
