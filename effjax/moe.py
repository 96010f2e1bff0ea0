"""Mixture-of-experts routing and its load-balancing loss, as pure per-replica functions.

``top_k_routing`` assigns each token to ``k`` experts with a capacity (GShard-style
dispatch and combine tensors); ``balance_loss`` is the Switch Transformer's auxiliary loss
``N_E * sum_i f_i * P_i``. Its scope is the question: with ``axis_name=None`` the
token fractions ``f_i`` are this replica's (micro-batch) own, which is what most frameworks
compute; with ``axis_name`` the expert counts are summed over the data axis first (one
all-reduce of ``N_E`` numbers), so ``f_i`` is the global batch's, as Qiu et al. 2025
propose. ``effjax.models.MoEFeedForward`` is the linen layer on top.
"""

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from effjax import parallel

BALANCE_SCOPES = ("micro", "global")


class Routing(NamedTuple):
  """The result of ``top_k_routing`` for ``T`` tokens, ``E`` experts, capacity ``C``.

  Attributes:
    dispatch: ``[T, E, C]`` 0/1: token t goes to slot c of expert e.
    combine: ``[T, E, C]``: ``dispatch`` times the token's gate for that expert.
    assigned: ``[T, E]`` 0/1: the top-k choices before capacity (what ``f_i`` counts).
    probs: ``[T, E]`` router probabilities (float32).
  """
  dispatch: jax.Array
  combine: jax.Array
  assigned: jax.Array
  probs: jax.Array


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ``ceil(capacity_factor * T * k / E)``."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def top_k_routing(router_logits: jax.Array, top_k: int, capacity: int) -> Routing:
  """Routes each token to its ``top_k`` most probable experts, first come first served up
  to ``capacity`` tokens per expert; tokens past it are dropped for that expert (their
  residual stream passes the layer unchanged). All first choices are placed before any
  second choice (GShard's priority). Gates are the router probabilities, renormalized
  over the chosen experts when ``top_k > 1``.

  Args:
    router_logits: ``[T, E]``.
    top_k: experts per token.
    capacity: slots per expert (``expert_capacity``).

  Returns:
    A ``Routing``.

  References:
    Lepikhin et al. 2020, arXiv:2006.16668 (GShard, top-2 dispatch with capacity);
    Fedus et al. 2021, arXiv:2101.03961 (Switch, top-1).
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  num_experts = probs.shape[-1]
  gates, experts = jax.lax.top_k(probs, top_k)                  # [T, k]
  if top_k > 1:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  dispatch = jnp.zeros(probs.shape + (capacity,), jnp.float32)
  combine = jnp.zeros_like(dispatch)
  filled = jnp.zeros((num_experts,), jnp.int32)               # Slots used per expert.
  assigned = jnp.zeros_like(probs)
  for j in range(top_k):
    choice = jax.nn.one_hot(experts[:, j], num_experts, dtype=jnp.int32)      # [T, E]
    slot = filled[None, :] + jnp.cumsum(choice, axis=0) - 1                   # [T, E]
    keep = choice * (slot < capacity)
    place = jax.nn.one_hot(jnp.where(keep > 0, slot, capacity), capacity + 1)[..., :capacity]
    dispatch = dispatch + place * keep[..., None]
    combine = combine + place * (keep * gates[:, j:j + 1])[..., None]
    filled = filled + jnp.sum(choice, axis=0)
    assigned = assigned + choice
  return Routing(dispatch, combine, assigned, probs)


def balance_loss(probs: jax.Array, assigned: jax.Array, axis_name: Optional[Any] = None,
                 weights: Optional[jax.Array] = None):
  """The load-balancing loss ``N_E * sum_i f_i * P_i`` and the loads ``f``.

  ``f_i`` is the fraction of (token, choice) assignments that went to expert ``i`` (no
  gradient), ``P_i`` the mean router probability of expert ``i`` over this replica's
  tokens. With ``axis_name`` the assignment counts are summed over that axis before ``f``
  is formed, so every replica uses the global batch's ``f``; the mean of
  the replicas' losses is then the loss of one device holding the whole batch.

  Args:
    probs: ``[T, E]`` router probabilities.
    assigned: ``[T, E]`` 0/1 top-k choices (``Routing.assigned``).
    axis_name: the data axis (``None``: this replica's tokens only, the "micro" scope).
    weights: optional ``[T]`` 0/1, tokens that count (padding excluded).

  Returns:
    ``(loss, f)``: the scalar loss (1 at perfect balance) and ``[E]`` loads.

  References:
    Fedus et al. 2021, arXiv:2101.03961, eq. (4); Qiu et al. 2025, arXiv:2501.11873
    (global-batch balance).
  """
  w = jnp.ones(probs.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
  counts = jnp.sum(assigned * w[:, None], axis=0)
  p_mean = jnp.sum(probs * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  if axis_name is not None:
    # The one extra all-reduce: N_E numbers.
    counts = jax.lax.psum(counts, parallel.bound_axes(axis_name))
  f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  return probs.shape[-1] * jnp.sum(f * p_mean), f


def routing_entropy(probs: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the router's distribution over experts, per token."""
  return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12)), axis=-1))
