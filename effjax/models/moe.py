"""A mixture-of-experts feed-forward layer (``effjax.moe`` routing) for ``DecoderLM``."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from effjax import moe

AUX = "aux"  # The collection the layer sows its balance loss and routing statistics into.


class MoEFeedForward(nn.Module):
  """``num_experts`` two-layer GELU MLPs, each token sent to its ``top_k`` experts by a
  linear router, with a capacity per expert (tokens past it skip the layer).

  Sows into the ``'aux'`` collection (when the caller makes it mutable, as
  ``effjax.tasks.apply_train`` does): ``balance_loss`` (``effjax.moe.balance_loss``, over
  ``balance_axis_name`` when set: the global batch), ``load`` (the ``[E]`` token
  fractions ``f``), ``entropy`` (router entropy) and ``expert`` (``[b, L]`` top-1 expert
  per token, for analysis). Experts are replicated, as are all parameters.

  Attributes:
    num_experts, top_k, capacity_factor: the routing (``effjax.moe``).
    hidden: each expert's hidden width.
    balance_axis_name: the data axis for a global-batch balance loss, or ``None`` (each
      replica's own tokens: the "micro" scope).
  """
  num_experts: int
  top_k: int = 1
  capacity_factor: float = 1.25
  hidden: int = 512
  balance_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, weights=None):
    b, length, d = x.shape
    e, h = self.num_experts, self.hidden
    tokens = x.reshape(b * length, d)
    router = nn.Dense(e, use_bias=False, dtype=jnp.float32, name="router")
    routing = moe.top_k_routing(router(tokens.astype(jnp.float32)), self.top_k,
                                moe.expert_capacity(b * length, e, self.top_k,
                                                    self.capacity_factor))
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    w_in = self.param("w_in", init, (e, d, h))
    b_in = self.param("b_in", nn.initializers.zeros, (e, h))
    w_out = self.param("w_out", init, (e, h, d))
    b_out = self.param("b_out", nn.initializers.zeros, (e, d))
    dt = self.dtype
    expert_in = jnp.einsum("tec,td->ecd", routing.dispatch.astype(dt), tokens.astype(dt))
    hid = nn.gelu(jnp.einsum("ecd,edh->ech", expert_in, w_in.astype(dt)) + b_in[:, None].astype(dt))
    expert_out = jnp.einsum("ech,ehd->ecd", hid, w_out.astype(dt)) + b_out[:, None].astype(dt)
    y = jnp.einsum("tec,ecd->td", routing.combine.astype(dt), expert_out)
    if self.is_mutable_collection(AUX):  # Training (apply_train) or analysis; not eval.
      flat_w = None if weights is None else weights.reshape(-1)
      axis = None if self.is_initializing() else self.balance_axis_name
      loss, load = moe.balance_loss(routing.probs, routing.assigned, axis, flat_w)
      self.sow(AUX, "balance_loss", loss)
      self.sow(AUX, "load", load)
      self.sow(AUX, "entropy", moe.routing_entropy(routing.probs))
      self.sow(AUX, "expert", jnp.argmax(routing.probs, -1).reshape(b, length))
    return y.reshape(b, length, d).astype(x.dtype)
