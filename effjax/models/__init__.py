"""The model zoo. ``create_model`` builds one from ``config.model``."""

from typing import Any

import jax.numpy as jnp

from effjax.parallel import BATCH_AXES

from effjax.models.norms import (BATCH_NORMS, CONVS, NORMS, NormConfig, cross_replica_statistics,
                                 make_conv,
                                 make_norm)
from effjax.models.decoder import (DecoderLM, STACKED_NAME, attention_mask, stack_layers,
                                   unstack_layers)
from effjax.models.resnet import ResNet, resnet18, resnet20, resnet50
from effjax.models.moe import MoEFeedForward
from effjax.models.simple import CNN1D, MLP, ContrastiveEncoder, cnn1d_trunk
from effjax.models.transformer import TransformerEncoder

MODELS = ("mlp", "cnn1d", "cnn1d_contrastive", "transformer", "resnet20", "resnet18", "resnet50",
          "decoder_lm")


def create_model(model_config: Any, num_classes: int, dtype: Any = jnp.float32,
                 seq_len: int = 0, logit_params: bool = False):
  """Builds the linen module named by ``model_config.name``.

  Args:
    model_config: ``config.model``: ``name``, the normalization (``norm`` and the keys
      ``NormConfig.from_config`` reads) and, for ``mlp``/``cnn1d``,
      ``widths`` (and ``kernel_size`` for ``cnn1d``; ``cnn1d_contrastive`` adds
      ``projection_widths``); for ``transformer``, ``widths`` is
      ``(width,)`` and ``num_layers``/``num_heads`` set the encoder.
    num_classes: classifier outputs.
    dtype: compute dtype of activations; parameters stay float32.
    seq_len: ``decoder_lm`` only: the longest sequence (the position table).
    logit_params: ``cnn1d_contrastive`` only: hold the sigmoid loss's learnable scale
      and bias.

  Returns:
    A ``flax.linen.Module`` called as ``model.apply(variables, x, train=...)``.
  """
  name, norm = model_config.name, NormConfig.from_config(model_config)
  if name == "mlp":
    return MLP(num_classes, tuple(model_config.widths), norm=norm, dtype=dtype)
  if name == "cnn1d":
    return CNN1D(num_classes, tuple(model_config.widths), model_config.kernel_size, norm=norm,
                 dtype=dtype)
  if name == "cnn1d_contrastive":
    return ContrastiveEncoder(tuple(model_config.widths), model_config.kernel_size,
                              tuple(model_config.projection_widths), norm=norm,
                              logit_params=logit_params, dtype=dtype)
  if name == "transformer":
    return TransformerEncoder(num_classes, width=int(model_config.widths[0]),
                              num_layers=model_config.num_layers,
                              num_heads=model_config.num_heads, norm=norm, dtype=dtype)
  if name == "decoder_lm":
    return DecoderLM(num_classes, max_len=int(seq_len), width=int(model_config.widths[0]),
                     num_layers=model_config.num_layers, num_heads=model_config.num_heads,
                     dropout=float(model_config.dropout),
                     tie_embeddings=bool(model_config.tie_embeddings),
                     scan_layers=bool(model_config.scan_layers),
                     moe_experts=int(model_config.moe.num_experts),
                     moe_top_k=int(model_config.moe.top_k),
                     moe_capacity_factor=float(model_config.moe.capacity_factor),
                     moe_balance_axis=(BATCH_AXES if model_config.moe.balance == "global"
                                       else None), dtype=dtype)
  if name == "resnet20":
    return resnet20(num_classes, norm=norm, dtype=dtype)
  if name == "resnet18":
    return resnet18(num_classes, norm=norm, dtype=dtype)
  if name == "resnet50":
    return resnet50(num_classes, norm=norm, dtype=dtype)
  raise ValueError(f"model.name={name!r} is not one of {MODELS}")
