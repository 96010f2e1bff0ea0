"""Contrastive losses whose negatives span the global batch, as pure per-replica functions.

Each function returns the losses of *this replica's* rows. Called inside ``shard_map`` or
``pmap`` with ``axis_name``, the negatives come from every replica: the gathered (or
ring-passed) embeddings keep their gradients, since the transpose of an all-gather is a
reduce-scatter and that of a ``ppermute`` is the reverse ``ppermute``. So the usual
recipe holds: differentiate this replica's mean (or sum), then ``pmean`` (``psum``) the
gradients over the axis, and the result is the gradient of the global-batch loss.
With ``axis_name=None`` each function is the single-device loss of the rows it is given
(which, inside a data-parallel step, is the "local negatives" bug: each replica
contrasts only its own examples).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from effjax.parallel import bound_axes

SIGMOID_IMPLS = ("ring", "all_gather")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def _gather(x: jax.Array, axis_name: Optional[str]):
  """``(rows of all replicas, this replica's first row among them)``."""
  axis_name = bound_axes(axis_name)
  if axis_name is None:
    return x, 0
  return (jax.lax.all_gather(x, axis_name, tiled=True),
          jax.lax.axis_index(axis_name) * x.shape[0])


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.1,
            axis_name: Optional[str] = None) -> jax.Array:
  """NT-Xent (normalized temperature-scaled cross-entropy), SimCLR's loss.

  The ``2b`` views of this replica's ``b`` examples are the anchors. Each anchor's
  positive is the other view of its example; its negatives are the other ``2B - 2`` views
  of the *global* batch of ``B`` examples (``B = b`` times the size of ``axis_name``).

  Args:
    z1, z2: ``[b, d]`` projections of the two views of this replica's examples
      (normalized here).
    temperature: tau, dividing the cosine similarities.
    axis_name: the data axis to take negatives from (``None``: these rows only).

  Returns:
    ``[2b]`` per-anchor losses (first view's anchors, then the second's), float32. The
    loss is their mean over the global batch.

  References:
    Chen et al. 2020, arXiv:2002.05709 (SimCLR), eq. (1).
  """
  b = z1.shape[0]
  anchors = jnp.concatenate([l2_normalize(z1), l2_normalize(z2)])           # [2b, d]
  all1, offset = _gather(anchors[:b], axis_name)
  all2, _ = _gather(anchors[b:], axis_name)
  big_b = all1.shape[0]
  logits = anchors @ jnp.concatenate([all1, all2]).T / temperature          # [2b, 2B]
  own = offset + jnp.arange(b)
  self_col = jnp.concatenate([own, big_b + own])
  positive_col = jnp.concatenate([big_b + own, own])
  logits = jnp.where(jnp.arange(2 * big_b)[None, :] == self_col[:, None], -jnp.inf, logits)
  positive = jnp.take_along_axis(logits, positive_col[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - positive


def _pair_losses(x, y_blk, scale, bias, diagonal: bool):
  """``-log sigmoid(z_ij (scale <x_i, y_j> + bias))`` for one ``[b, b']`` block, with
  ``z``, the logits and the similarities ``<x_i, y_j>``; ``z`` is +1 on the diagonal when
  ``diagonal`` (the block is this replica's own, step 0 of the ring) and -1 elsewhere."""
  sim = x @ y_blk.T
  logits = scale * sim + bias
  z = jnp.where(jnp.eye(x.shape[0], y_blk.shape[0], dtype=bool), 1.0, -1.0) if diagonal else -1.0
  return -jax.nn.log_sigmoid(z * logits), z, logits, sim


def _ring_perm(axis_name):
  n = jax.lax.axis_size(axis_name)
  return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_ring(x, y, scale, bias, axis_name):
  """Row sums of the sigmoid loss of this replica's ``x`` against every replica's ``y``,
  passing ``y`` blocks around a ring: at step k this replica holds replica ``(i - k)``'s."""
  return _sigmoid_ring_fwd(x, y, scale, bias, axis_name)[0]


def _sigmoid_ring_fwd(x, y, scale, bias, axis_name):
  def body(_, carry):  # Steps 1..n-1: another replica's block, negatives only.
    y_blk, acc = carry
    y_blk = jax.lax.ppermute(y_blk, axis_name, _ring_perm(axis_name))
    return y_blk, acc + _pair_losses(x, y_blk, scale, bias, False)[0].sum(-1)

  acc = _pair_losses(x, y, scale, bias, True)[0].sum(-1)
  _, acc = jax.lax.fori_loop(1, jax.lax.axis_size(axis_name), body, (y, acc))
  return acc, (x, y, scale, bias)


def _sigmoid_ring_bwd(axis_name, residuals, g):
  """The backward pass goes around the ring again, carrying each ``y`` block's cotangent
  with it, so that it arrives home holding every replica's contribution. Autodiff of the
  forward loop would instead keep all ``n`` blocks (``B x d``) for the backward pass."""
  x, y, scale, bias = residuals
  perm = _ring_perm(axis_name)

  def grads(y_blk, diagonal):
    _, z, logits, sim = _pair_losses(x, y_blk, scale, bias, diagonal)
    d_logits = g[:, None] * -z * jax.nn.sigmoid(-z * logits)       # d loss / d logits.
    return (scale * d_logits @ y_blk, scale * d_logits.T @ x, jnp.sum(d_logits * sim),
            jnp.sum(d_logits))

  def body(_, carry):
    y_blk, dy_blk, dx, dscale, dbias = carry
    gx, gy, gs, gb = grads(y_blk, False)
    dy_blk = jax.lax.ppermute(dy_blk + gy, axis_name, perm)
    y_blk = jax.lax.ppermute(y_blk, axis_name, perm)
    return y_blk, dy_blk, dx + gx, dscale + gs, dbias + gb

  # Step 0 (the own block) starts the sums, then n - 1 more steps; with n moves of each
  # cotangent block in all, every block is back at its owner.
  gx, gy, gs, gb = grads(y, True)
  init = (jax.lax.ppermute(y, axis_name, perm), jax.lax.ppermute(gy, axis_name, perm), gx, gs,
          gb)
  _, dy, dx, dscale, dbias = jax.lax.fori_loop(1, jax.lax.axis_size(axis_name), body, init)
  return dx, dy, dscale.astype(jnp.result_type(scale)), dbias.astype(jnp.result_type(bias))


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def sigmoid_loss(x: jax.Array, y: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                 axis_name: Optional[str] = None, impl: str = "ring") -> jax.Array:
  """SigLIP's pairwise sigmoid loss of this replica's ``x`` rows against all ``y`` rows.

  Every pair (i, j) of the global batch is a binary problem: positive when i = j,
  negative otherwise, with logit ``t <x_i, y_j> + bias`` and ``t = exp(logit_scale)``.

  Args:
    x, y: ``[b, d]`` embeddings of the two sides (or views) of this replica's examples
      (normalized here).
    logit_scale: ``t'`` with ``t = exp(t')`` (SigLIP starts it at ``log 10``).
    logit_bias: ``b`` (SigLIP starts it at ``-10``).
    axis_name: the data axis whose ``y`` rows are negatives (``None``: these rows only).
    impl: ``'ring'``: ``y`` blocks travel around a ring of ``ppermute``s, so a replica
      holds one ``b x b`` block of logits at a time (never ``b x B``), forward and
      backward; ``'all_gather'``: gather all ``y`` and form ``b x B`` logits. Equal
      values and gradients.

  Returns:
    ``[b]``: row i's loss summed over all ``B`` columns, float32. SigLIP's loss is their
    mean over the global batch's rows.

  References:
    Zhai et al. 2023, arXiv:2303.15343 (SigLIP), Algorithm 1 and the chunked form of
    Section 3.3.
  """
  if impl not in SIGMOID_IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {SIGMOID_IMPLS}")
  x, y = l2_normalize(x), l2_normalize(y)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  bias = jnp.asarray(logit_bias, jnp.float32)
  axis_name = bound_axes(axis_name)
  if axis_name is None or impl == "all_gather":
    all_y, offset = _gather(y, axis_name)
    logits = scale * (x @ all_y.T) + bias
    positive = jnp.arange(all_y.shape[0])[None, :] == (offset + jnp.arange(x.shape[0]))[:, None]
    return -jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)).sum(-1)
  return _sigmoid_ring(x, y, scale, bias, axis_name)
