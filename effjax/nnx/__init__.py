"""effjax's batch-statistics layers as Flax NNX modules (``import effjax.nnx``).

``effjax.nnx.BatchNorm``, ``BatchChannelNorm`` and ``WSConv`` are thin wrappers over the
same pure functions as the linen modules in ``effjax.nn`` (``effjax.nn.functional``), with
NNX's conventions: explicit feature counts and ``rngs`` at construction, parameters in
``nnx.Param`` and running statistics in ``nnx.BatchStat`` (so ``nnx.split(model,
nnx.Param, nnx.BatchStat)`` and ``nnx.state`` filters work as with ``nnx.BatchNorm``), and
``model.train()`` / ``model.eval()`` switching ``use_running_average``.

``import effjax`` does not import this package (nor ``flax.nnx``).
"""

from effjax.nnx.layers import BatchChannelNorm, BatchNorm, WSConv

__all__ = ["BatchNorm", "BatchChannelNorm", "WSConv"]
