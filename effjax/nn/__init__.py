"""Normalization layers for large-batch training: pure functions and linen modules.

``BatchNorm`` takes its statistics over the global batch (``axis_name``), over groups of
replicas (``group_size``) or over ghost batches (``virtual_batch_size``), under
``shard_map`` and ``pmap`` alike; ``BatchChannelNorm`` and ``WSConv`` are for micro-batch
training.
"""

from effjax.nn.functional import (batch_moments, batch_norm, channel_norm,
                                  estimated_batch_norm, group_affine, normalize,
                                  standardize_weight)
from effjax.nn.layers import BatchChannelNorm, BatchNorm, WSConv
from effjax.parallel import group_psum

__all__ = ["BatchNorm", "BatchChannelNorm", "WSConv", "batch_moments", "batch_norm",
           "channel_norm", "estimated_batch_norm", "group_affine", "normalize",
           "standardize_weight", "group_psum"]
