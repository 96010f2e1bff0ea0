"""A decoder-only (GPT-style) pre-LN transformer LM over packed sequences.

The mask is a pure function (``attention_mask``): causal, and only within a segment
(document), so packed documents never see each other. With ``scan_layers`` the blocks
are one ``nn.scan`` over a stacked layer axis (MaxText's layout: each block parameter has
a leading ``num_layers`` axis under ``layers``), which compiles once for all layers; a
layer-wise optimizer must then take its trust ratio per slice of that axis
(``effjax.optim.scale_by_trust_ratio(stacked=...)``).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.models.moe import AUX, MoEFeedForward

STACKED_NAME = "layers"  # The nn.scan module holding the stacked block parameters.


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """``[b, 1, L, L]`` boolean mask: query i sees key j iff ``j <= i`` and both are in the
  same non-padding segment (segment id 0 is padding and sees only itself, so that its
  softmax stays finite)."""
  causal = jnp.tril(jnp.ones((segment_ids.shape[-1],) * 2, bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None]


class DecoderBlock(nn.Module):
  """``x + drop(attn(LN(x)))``, then ``x + drop(MLP(LN(x)))``; the MLP is a
  ``MoEFeedForward`` when ``moe_experts > 0``."""
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  deterministic: bool = True
  moe_experts: int = 0
  moe_top_k: int = 1
  moe_capacity_factor: float = 1.25
  moe_balance_axis: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, token_weights=None):
    d = x.shape[-1]
    drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        deterministic=self.deterministic, name="attention")(y, y, mask=mask)
    x = x + drop(y)
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    if self.moe_experts:
      y = MoEFeedForward(self.moe_experts, self.moe_top_k, self.moe_capacity_factor,
                         d * self.mlp_ratio, self.moe_balance_axis, self.dtype,
                         name="moe")(y, token_weights)
    else:
      y = nn.Dense(d * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(y)
      y = nn.Dense(d, dtype=self.dtype, name="mlp_out")(nn.gelu(y))
    return x + drop(y)


class _ScanBlock(DecoderBlock):
  """``DecoderBlock`` in ``nn.scan``'s ``(carry, x) -> (carry, out)`` form."""

  def __call__(self, x, mask, token_weights=None):  # pylint: disable=arguments-differ
    return super().__call__(x, mask, token_weights), None


class DecoderLM(nn.Module):
  """Token + learned position embeddings, ``num_layers`` pre-LN causal blocks, a final
  LayerNorm and the output projection (tied to the token embedding, or its own).

  Called as ``model.apply(variables, inputs, segment_ids=..., positions=..., train=...)``
  with ``[b, L]`` int arrays; returns float32 logits ``[b, L, vocab_size]``. Dropout (on
  attention weights and residual branches) needs a ``'dropout'`` RNG when training.

  Attributes:
    vocab_size, max_len: vocabulary and the longest sequence (position table size).
    width, num_layers, num_heads, mlp_ratio: the transformer's shape.
    dropout: dropout rate (0: none).
    tie_embeddings: share the token embedding with the output projection.
    scan_layers: stack the blocks under one ``nn.scan`` (see the module docstring).
    moe_experts, moe_top_k, moe_capacity_factor: > 0 experts: every block's MLP is a
      ``MoEFeedForward`` (padding tokens count in no balance statistic).
    moe_balance_axis: the data axis for the global-batch balance loss, or ``None``.
  """
  vocab_size: int
  max_len: int
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0
  tie_embeddings: bool = True
  scan_layers: bool = False
  moe_experts: int = 0
  moe_top_k: int = 1
  moe_capacity_factor: float = 1.25
  moe_balance_axis: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, segment_ids=None, positions=None, train: bool = False):
    if segment_ids is None:
      segment_ids = jnp.ones_like(inputs)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[-1]), inputs.shape)
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="embed")
    pos = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = embed(inputs).astype(self.dtype) + jnp.take(pos, positions, axis=0).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    mask = attention_mask(segment_ids)
    kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
              deterministic=not train, moe_experts=self.moe_experts, moe_top_k=self.moe_top_k,
              moe_capacity_factor=self.moe_capacity_factor,
              moe_balance_axis=self.moe_balance_axis, dtype=self.dtype)
    token_weights = (segment_ids > 0).astype(jnp.float32)
    if self.scan_layers:
      blocks = nn.scan(_ScanBlock, variable_axes={"params": 0, AUX: 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers)
      x, _ = blocks(name=STACKED_NAME, **kw)(x, mask, token_weights)
    else:
      for i in range(self.num_layers):
        x = DecoderBlock(name=f"block{i}", **kw)(x, mask, token_weights)
    x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(x.astype(jnp.float32))
    else:
      logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


def stack_layers(params: dict, num_layers: int) -> dict:
  """An unrolled ``DecoderLM``'s parameters in the ``scan_layers`` layout: ``block{i}``
  subtrees stacked along a new leading axis under ``layers``."""
  blocks = [params[f"block{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block")}
  return {**rest, STACKED_NAME: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of ``stack_layers``."""
  rest = {k: v for k, v in params.items() if k != STACKED_NAME}
  return {**rest, **{f"block{i}": jax.tree.map(lambda x: x[i], params[STACKED_NAME])
                     for i in range(num_layers)}}
