"""Small models for the embedded datasets: an MLP and a 1D convolutional net."""

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
    norm = make_norm(self.norm, train=train, dtype=self.dtype)
    conv = make_conv(self.norm, dtype=self.dtype)
    if x.ndim == 2:
      x = x[..., None]
    x = x.astype(self.dtype)
    for i, w in enumerate(self.widths):
      x = conv(w, (self.kernel_size,), strides=(1 if i == 0 else 2,), use_bias=False)(x)
      x = nn.relu(norm()(x))
    x = jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
