"""A small pre-LayerNorm transformer encoder for sequences such as mnist1d's 40 samples."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from effjax.models.norms import make_norm


class EncoderBlock(nn.Module):
  """``x + MHA(norm(x))``, then ``x + MLP(norm(x))``."""
  num_heads: int
  mlp_ratio: int
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = self.norm(name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attention")(y, y)
    x = x + y
    y = self.norm(name="norm2")(x)
    y = nn.Dense(d * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(y)
    y = nn.Dense(d, dtype=self.dtype, name="mlp_out")(nn.gelu(y))
    return x + y


class TransformerEncoder(nn.Module):
  """Embeds each sequence step (a scalar or a feature vector), adds learned positions,
  runs ``num_layers`` pre-LN encoder blocks, mean-pools and classifies.

  Attributes:
    num_classes: classifier outputs.
    width: model dimension.
    num_layers, num_heads, mlp_ratio: encoder shape.
    norm: the normalization (``config.model.norm``; ``layer`` for a standard transformer).
  """
  num_classes: int
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  norm: Any = "layer"  # A NORMS name or a NormConfig.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = make_norm(self.norm, train=train, dtype=self.dtype)
    if x.ndim == 2:
      x = x[..., None]
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(x.astype(self.dtype))
    pos = self.param("position", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos.astype(self.dtype)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, norm, self.dtype, name=f"block{i + 1}")(x)
    x = norm(name="final_norm")(x).mean(axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
