"""Layer-wise adaptive optimizers as optax transformations: LARS, LAMB, TVLARS.

Differences from ``optax.lars``/``optax.lamb``, which these match exactly when both masks
are ``True`` (and LAMB has no clipping or prenorm):

* Masks default to the reference recipes (MLPerf ResNet-50, the LAMB paper's code, timm):
  parameters with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales and offsets) get
  neither weight decay nor the trust ratio.
* The trust ratio can be clipped (``max_trust_ratio``), and the last ratios are kept in
  the state (``ScaleByTrustRatioState``), so a train loop can log them.
* With ``axis_name``, the squared norms are summed over that mesh axis, so that
  parameters sharded over it (FSDP-style, under ``shard_map``) get the update of the
  unsharded parameters; ``sharded`` says which are (``effjax.fsdp.sharded_mask``), the
  others' norms are local.
* LAMB can first divide the gradients by their global norm when it exceeds 1 (NVLAMB).
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import parallel

MaskOrFn = Union[None, bool, Any, Callable[[Any], Any]]


# Parameter names that the recipes exclude from weight decay although they are matrices:
# learned position embeddings (big_vision and the ViT/BERT recipes decay kernels only).
NO_DECAY_NAMES = ("position", "pos_embedding", "position_embedding", "position_embeddings")


def _last_name(path) -> str:
  key = path[-1] if path else None
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def stacked_mask(params: Any, name: str = "layers") -> Any:
  """``True`` for parameters with a leading stacked-layer axis: those under a module
  called ``name`` (the ``nn.scan`` of ``effjax.models.DecoderLM(scan_layers=True)``, and
  MaxText's layout)."""
  def under(path):
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)
  return jax.tree_util.tree_map_with_path(lambda path, _: under(path), params)


def _per_leaf(mask: MaskOrFn, tree: Any, default: bool) -> Any:
  """One bool per leaf of ``tree`` (possibly masked by ``optax.masked``): ``default``
  for ``None``, the bool itself for ``True``/``False``, ``mask(tree)`` for a function,
  or a pytree of bools over all parameters, read where ``tree`` has a leaf."""
  if mask is None or isinstance(mask, bool):
    value = default if mask is None else mask
    return jax.tree.map(lambda _: value, tree)
  if callable(mask):
    return mask(tree)
  return jax.tree.map(lambda m, p: p if isinstance(p, optax.MaskedNode) else bool(m), mask,
                      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _resolve_sharded(sharded: MaskOrFn, tree: Any) -> Any:
  return _per_leaf(sharded, tree, True)


def _decay_tree(weight_decay: float, mask: MaskOrFn, params: Any) -> Any:
  """Per parameter of ``params``, whether it gets weight decay (none without
  ``weight_decay``; all for a ``None`` mask)."""
  return _per_leaf(mask if weight_decay else False, params, True)


def _resolve_stacked(stacked: MaskOrFn, params: Any) -> Any:
  return _per_leaf(stacked, params, False)


def default_mask(params: Any, stacked: MaskOrFn = None) -> Any:
  """The recipe default: ``True`` for weights (``ndim > 1``), ``False`` for biases, norm
  scales and offsets (``ndim <= 1``) and learned position embeddings (a leaf named as in
  ``NO_DECAY_NAMES``). ``stacked`` (a mask or ``stacked_mask``) marks parameters whose
  leading axis stacks layers; their ``ndim`` is counted without it."""
  lead = _resolve_stacked(stacked, params)
  return jax.tree_util.tree_map_with_path(
      lambda path, p, s: jnp.ndim(p) - int(s) > 1 and _last_name(path) not in NO_DECAY_NAMES,
      params, lead)


def all_mask(params: Any) -> Any:
  """``True`` for every parameter."""
  return jax.tree.map(lambda _: True, params)


def _resolve_mask(mask: MaskOrFn, stacked: MaskOrFn = None):
  """Inside effjax one spelling means one thing: ``None`` -> ``default_mask`` (weights
  only, a ``stacked`` layer axis not counted); ``True`` -> ``all_mask``; else the mask
  (a pytree or a function) as given. (optax's own ``mask=None`` means "all"; effjax never
  passes ``None`` on to mean that.)"""
  if mask is None:
    return default_mask if stacked is None else (lambda p: default_mask(p, stacked))
  if mask is True:
    return all_mask
  return mask


def _sq_norm(x: jax.Array, stacked: bool = False) -> jax.Array:
  """This shard's squared norm, over the whole tensor or (``stacked``) per slice of axis
  0, shaped to broadcast against ``x``."""
  axes = tuple(range(1, x.ndim)) if stacked else None
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=stacked)


def _summed(sq: list, split_leaves: list, axis_name: Optional[str]) -> list:
  """Per leaf ``(||w||^2, ||u||^2)`` of this shard, summed over ``axis_name`` for the
  leaves split over it: one all-reduce of all of them."""
  split = [i for i, x in enumerate(split_leaves) if x and axis_name is not None]
  if split:
    summed = jax.lax.psum([sq[i] for i in split], axis_name)
    sq = list(sq)
    for i, pair in zip(split, summed):
      sq[i] = pair
  return sq


def _ratios(sq: list, trust_coefficient: float, eps: float, min_norm: float,
            max_trust_ratio: Optional[float]) -> list:
  """``c * ||w|| / (||u|| + eps)`` per leaf from its ``(||w||^2, ||u||^2)``, 1 where
  either norm is 0 (see ``scale_by_trust_ratio``)."""
  if not sq:
    return []
  w_sq, u_sq = [a for a, _ in sq], [b for _, b in sq]
  # All parameters' ratios in one vectorized computation rather than one small kernel
  # per parameter: on a GPU each is a launch (161 of them for ResNet-50).
  flat = lambda xs: jnp.concatenate([jnp.ravel(x) for x in xs])
  w_norm = jnp.maximum(jnp.sqrt(flat(w_sq)), min_norm)
  u_norm = jnp.maximum(jnp.sqrt(flat(u_sq)), min_norm)
  r = trust_coefficient * w_norm / (u_norm + eps)
  if max_trust_ratio is not None:
    r = jnp.minimum(r, max_trust_ratio)
  r = jnp.where((w_norm == 0.0) | (u_norm == 0.0), 1.0, r).astype(jnp.float32)
  ends = np.cumsum([x.size for x in w_sq])
  return [piece.reshape(x.shape) for piece, x in zip(jnp.split(r, ends[:-1]), w_sq)]


def _initial_ratio(p: Any, stacked: bool) -> jax.Array:
  """A ratio of 1 for parameter ``p``: a scalar, or (``stacked``) one per layer, shaped
  ``[L, 1, ...]``."""
  return jnp.ones((p.shape[0],) + (1,) * (p.ndim - 1) if stacked else (), jnp.float32)


class ScaleByTrustRatioState(NamedTuple):
  """The trust ratio each parameter's update was last scaled by (float32 scalars)."""
  trust_ratio: Any


def scale_by_trust_ratio(trust_coefficient: float = 1.0, eps: float = 0.0,
                         min_norm: float = 0.0, max_trust_ratio: Optional[float] = None,
                         axis_name: Optional[str] = None,
                         stacked: MaskOrFn = None,
                         sharded: MaskOrFn = None, weight_decay: float = 0.0,
                         weight_decay_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """Scales each parameter's update ``u`` by ``c * ||w|| / (||u|| + eps)``.

  With ``weight_decay``, ``u = g + wd * w`` (for the parameters in ``weight_decay_mask``)
  is formed here rather than by an ``optax.add_decayed_weights`` ahead of it: the same
  numbers, in fewer passes over memory. Fed ``g + wd * w`` from outside, XLA (CPU)
  writes it to memory for its two readers, the norm and the scaled update; formed here,
  the norm reads ``g`` and ``w`` in one fused reduction and the update recomputes
  ``g + wd * w`` where it is consumed (an ``optimization_barrier`` on ``(g, w)`` keeps
  XLA from merging the two back into one stored array). See BENCHMARKS.md, optimizers.

  Zero-norm policy: where ``||w||`` or ``||u||`` is 0 (after ``min_norm``), the ratio is
  1. A zero-initialised parameter (e.g. a residual block's last BatchNorm scale) still
  moves with the plain update instead of being frozen at 0 by a zero ratio, and a zero
  update stays zero. This is the ``optax.scale_by_trust_ratio`` policy.

  Args:
    trust_coefficient: ``c``, multiplies the ratio (LARS's eta, about 1e-3; 1 for LAMB).
    eps: added to the update norm in the denominator.
    min_norm: both norms are clipped below at this value.
    max_trust_ratio: if set, the ratio is clipped above at this value (timm's
      ``trust_clip`` uses 1.0; DeepSpeed's ``max_coeff`` 10).
    axis_name: a mesh axis that parameters are sharded over (under ``shard_map``); the
      squared norms are summed over it. Not needed under ``jit`` with global arrays.
    stacked: parameters whose leading axis stacks layers (``nn.scan``): a pytree of bools
      or a function of the parameters such as ``stacked_mask``. Each slice along that
      axis (one layer) gets its own ratio, as the unstacked model's layers would; a
      ratio over the whole stack would tie all layers to one. None: no stacked axis.
    sharded: with ``axis_name``, which parameters are split over it (a pytree of bools
      or a function of the parameters, e.g. ``effjax.fsdp.sharded_mask``); the others
      are replicated and their norms are not summed. None: all of them.
    weight_decay: ``wd``, added to the update as ``wd * w`` before the ratio (LARS).
    weight_decay_mask: which parameters get it (a pytree of bools, a function of the
      parameters, or None: all).

  Returns:
    An ``optax.GradientTransformation`` whose state (``ScaleByTrustRatioState``) holds the
    last per-parameter ratios (per layer, shaped ``[L, 1, ...]``, for stacked ones).

  References:
    You et al. 2017, arXiv:1708.03888 (LARS); You et al. 2019, arXiv:1904.00962 (LAMB).
  """

  def init_fn(params):
    return ScaleByTrustRatioState(trust_ratio=jax.tree.map(
        _initial_ratio, params, _resolve_stacked(stacked, params)))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG if hasattr(optax, "NO_PARAMS_MSG")
                       else "scale_by_trust_ratio needs params")

    def sq_norms(u, w, s, decay):
      if decay:
        # ``wd`` through a barrier with this leaf's update: as a bare constant, XLA (CPU)
        # shares its broadcast between all leaves of one shape and stores it, a full
        # extra array that every such norm reads.
        u, wd = jax.lax.optimization_barrier((u, jnp.asarray(weight_decay, w.dtype)))
        u = u + wd * w
      return _sq_norm(w, s), _sq_norm(u, s)

    def scaled(u, w, r, decay):
      if decay:
        u, w, wd = jax.lax.optimization_barrier((u, w, jnp.float32(weight_decay)))
        u = u + (wd * w).astype(u.dtype)
      return (u * r).astype(u.dtype)

    u_leaves, treedef = jax.tree.flatten(updates)
    w_leaves, s_leaves, split_leaves, decays = (treedef.flatten_up_to(t) for t in (
        params, _resolve_stacked(stacked, params), _resolve_sharded(sharded, params),
        _decay_tree(weight_decay, weight_decay_mask, params)))
    sq = _summed([sq_norms(*a) for a in zip(u_leaves, w_leaves, s_leaves, decays)],
                 split_leaves, axis_name)
    r = _ratios(sq, trust_coefficient, eps, min_norm, max_trust_ratio)
    new = [scaled(*a) for a in zip(u_leaves, w_leaves, r, decays)]
    return (jax.tree.unflatten(treedef, new),
            ScaleByTrustRatioState(trust_ratio=jax.tree.unflatten(treedef, r)))

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByLambState(NamedTuple):
  """Adam's moments and step count, and the last trust ratios (``MaskedNode`` for the
  parameters outside ``trust_ratio_mask``)."""
  adam: optax.ScaleByAdamState
  trust: ScaleByTrustRatioState


def scale_by_lamb(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  weight_decay: float = 0.0, weight_decay_mask: MaskOrFn = None,
                  trust_ratio_mask: MaskOrFn = None,
                  max_trust_ratio: Optional[float] = None, axis_name: Optional[str] = None,
                  stacked: MaskOrFn = None,
                  sharded: MaskOrFn = None) -> optax.GradientTransformation:
  """LAMB's update direction before the learning rate: per layer
  ``r(w, u) * u`` with ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``.

  The numbers of ``optax.chain(optax.scale_by_adam(b1, b2, eps),
  optax.add_decayed_weights(wd, weight_decay_mask),
  optax.masked(scale_by_trust_ratio(...), trust_ratio_mask))``, in fewer passes over
  memory. In that chain ``u`` is one array with two readers, the norm and the scaled
  update, so XLA stores it: a parameter-sized temporary written once and read twice.
  Here each reader recomputes ``u`` from the new moments and ``w`` (which it reads
  anyway), behind an ``optimization_barrier`` that keeps XLA from merging the two
  computations back into one stored array.

  Args:
    b1, b2, eps: Adam's moment decays and epsilon (``eps`` outside the square root).
    weight_decay: ``lambda``, decoupled: added to the Adam direction.
    weight_decay_mask, trust_ratio_mask: which parameters get the decay and the ratio
      (a pytree of bools, a function of the parameters, or None: all).
    max_trust_ratio, axis_name, stacked, sharded: as in ``scale_by_trust_ratio``.

  Returns:
    An ``optax.GradientTransformation`` with a ``ScaleByLambState``.

  References:
    You et al. 2019, arXiv:1904.00962.
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    trust = jax.tree.map(lambda p, s, m: _initial_ratio(p, s) if m else optax.MaskedNode(),
                         params, _resolve_stacked(stacked, params),
                         _per_leaf(trust_ratio_mask, params, True))
    return ScaleByLambState(adam.init(params), ScaleByTrustRatioState(trust))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lamb needs params")
    # Adam's own direction is not used (XLA drops it): it is recomputed from the new
    # moments where each reader needs it.
    _, adam_state = adam.update(updates, state.adam)
    # ``(m / c1) / (sqrt(v / c2) + eps)`` as ``m / (sqrt(v) * k1 + k2)``: one division
    # per element instead of two, in each of the two recomputations (the same number to
    # a few ulp).
    c1, c2 = 1 - b1 ** adam_state.count, 1 - b2 ** adam_state.count
    k1, k2 = c1 / jnp.sqrt(c2), c1 * eps

    def direction(m, v, w, decay, barrier=None):
      scalars = (k1.astype(v.dtype), k2.astype(v.dtype), jnp.asarray(weight_decay, w.dtype))
      if barrier is not None:
        # The scalars too (XLA would share their broadcasts between same-shape leaves,
        # and store them), and ``barrier``: two barriers on the same operands would be
        # merged into one.
        m, v, w, scalars, _ = jax.lax.optimization_barrier((m, v, w, scalars, barrier))
      k1_, k2_, wd = scalars
      u = m / (jnp.sqrt(v) * k1_ + k2_)
      return u + wd * w if decay else u

    mus, treedef = jax.tree.flatten(adam_state.mu)
    nus, ws, ratio, decays, s_leaves, split_leaves = (treedef.flatten_up_to(t) for t in (
        adam_state.nu, params, _per_leaf(trust_ratio_mask, params, True),
        _decay_tree(weight_decay, weight_decay_mask, params),
        _resolve_stacked(stacked, params), _resolve_sharded(sharded, params)))
    idx = [i for i, x in enumerate(ratio) if x]
    sq = []
    for i in idx:
      u = direction(mus[i], nus[i], ws[i], decays[i], barrier=())
      sq.append((_sq_norm(ws[i], s_leaves[i]), _sq_norm(u, s_leaves[i])))
    sq = _summed(sq, [split_leaves[i] for i in idx], axis_name)
    r = dict(zip(idx, _ratios(sq, 1.0, 0.0, 0.0, max_trust_ratio)))
    new, trust = [], []
    for i, (m, v, w, decay) in enumerate(zip(mus, nus, ws, decays)):
      u = direction(m, v, w, decay, barrier=r.get(i))
      new.append((u * r[i]).astype(u.dtype) if i in r else u)
      trust.append(r.get(i, optax.MaskedNode()))
    return (jax.tree.unflatten(treedef, new),
            ScaleByLambState(adam_state, ScaleByTrustRatioState(jax.tree.unflatten(treedef,
                                                                                   trust))))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float = 1.0, axis_name: Optional[str] = None,
                        sharded: MaskOrFn = None) -> optax.GradientTransformation:
  """``g * min(1, max_norm / ||g||_global)``; with ``axis_name``, over sharded parameters.

  ``optax.clip_by_global_norm`` with a mesh axis: parameters sharded over ``axis_name``
  contribute their full norm. With ``max_norm=1`` this is NVLAMB's gradient
  pre-normalisation (divide by the global norm when it exceeds 1).

  Args:
    max_norm: the largest global norm let through.
    axis_name: a mesh axis the gradients are sharded over, or None.
    sharded: which gradients are split over ``axis_name`` (see
      ``scale_by_trust_ratio``); None: all of them.

  Returns:
    A stateless ``optax.GradientTransformation``.

  References:
    NVIDIA's LAMB (NVLAMB); You et al. 2019, arXiv:1904.00962.
  """

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    split = jax.tree.leaves(_resolve_sharded(sharded, updates))
    if axis_name is None:
      split = [False] * len(leaves)
    # The sharded leaves' squares summed here, then one all-reduce (not one per leaf).
    local = parallel.global_sq_norm([u for u, c in zip(leaves, split) if not c])
    sharded_sq = parallel.global_sq_norm([u for u, c in zip(leaves, split) if c])
    total = local + (jax.lax.psum(sharded_sq, axis_name) if any(split) else sharded_sq)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(total), 1e-30))
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _decay(weight_decay, mask: MaskOrFn, stacked: MaskOrFn = None) -> optax.GradientTransformation:
  return optax.add_decayed_weights(weight_decay, mask=_resolve_mask(mask, stacked))


def _decay_without_ratio(weight_decay, decay_mask: MaskOrFn, ratio_mask: MaskOrFn,
                         stacked: MaskOrFn = None) -> optax.GradientTransformation:
  """``add_decayed_weights`` for the parameters that are decayed but get no trust ratio
  (those that get both are decayed inside ``scale_by_trust_ratio``)."""
  decay, ratio = _resolve_mask(decay_mask, stacked), _resolve_mask(ratio_mask, stacked)
  mask = lambda p: jax.tree.map(lambda d, r: bool(d) and not bool(r),
                                _per_leaf(decay, p, True), _per_leaf(ratio, p, True))
  return optax.add_decayed_weights(weight_decay, mask=mask)


def _masked(inner: optax.GradientTransformation, mask: MaskOrFn,
            stacked: MaskOrFn = None) -> optax.GradientTransformation:
  return optax.masked(inner, _resolve_mask(mask, stacked))


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         weight_decay: float = 0.0, trust_coefficient: float = 1e-3, eps: float = 0.0,
         nesterov: bool = False, weight_decay_mask: MaskOrFn = None,
         trust_ratio_mask: MaskOrFn = None, axis_name: Optional[str] = None,
         max_trust_ratio: Optional[float] = None,
         stacked: MaskOrFn = None, sharded: MaskOrFn = None) -> optax.GradientTransformation:
  """LARS: momentum SGD with a layer-wise trust ratio.

  Per layer, ``u = g + wd * w``; ``v <- m * v + lr * r * u``; ``w <- w - v``, with
  ``r = trust_coefficient * ||w|| / (||u|| + eps)``.

  The ratio divides by the norm of the decayed gradient, ``||g + wd w||`` (as optax, the
  MLPerf reference and timm do), not by ``||g|| + wd ||w||`` as printed in the paper: the
  exact norm of the update that is scaled. Parameters outside ``trust_ratio_mask`` get
  plain momentum SGD; outside ``weight_decay_mask``, no decay.

  Args:
    learning_rate: global LR or schedule (``gamma_t``; warmup then poly decay in the paper).
    momentum: ``m``.
    weight_decay: ``beta``, added to the gradient before the trust ratio.
    trust_coefficient: ``eta`` (1e-3 in the paper).
    eps: added to the ratio's denominator.
    nesterov: Nesterov momentum.
    weight_decay_mask, trust_ratio_mask: ``None`` (default): weights only (``ndim > 1``);
      ``True``: every parameter; a pytree or callable: used as given.
    axis_name: mesh axis the parameters are sharded over (see ``scale_by_trust_ratio``).
    max_trust_ratio: clip the ratio above at this value.
    sharded: which parameters ``axis_name`` splits (see ``scale_by_trust_ratio``).
    stacked: parameters with a stacked layer axis, one ratio per layer (see
      ``scale_by_trust_ratio``).

  Returns:
    An ``optax.GradientTransformation`` (a chain).

  References:
    You, Gitman, Ginsburg 2017, arXiv:1708.03888.
  """
  return optax.chain(
      _decay_without_ratio(weight_decay, weight_decay_mask, trust_ratio_mask, stacked),
      _masked(scale_by_trust_ratio(trust_coefficient, eps, max_trust_ratio=max_trust_ratio,
                                   axis_name=axis_name, stacked=stacked, sharded=sharded,
                                   weight_decay=weight_decay,
                                   weight_decay_mask=_resolve_mask(weight_decay_mask, stacked)),
              trust_ratio_mask, stacked),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=nesterov),
  )


def lamb(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, weight_decay: float = 0.0, weight_decay_mask: MaskOrFn = None,
         trust_ratio_mask: MaskOrFn = None, max_trust_ratio: Optional[float] = None,
         grad_prenorm: bool = False, axis_name: Optional[str] = None,
         stacked: MaskOrFn = None, sharded: MaskOrFn = None) -> optax.GradientTransformation:
  """LAMB: Adam's direction, decoupled weight decay, and a layer-wise trust ratio.

  ``m, v`` as Adam with bias correction; ``r = m_hat / (sqrt(v_hat) + eps)``;
  ``w <- w - lr * ||w|| / ||r + wd w|| * (r + wd w)`` (phi = identity, or clipped at
  ``max_trust_ratio``).

  Args:
    learning_rate: global LR or schedule.
    b1, b2, eps: Adam's moment decays and epsilon.
    weight_decay: ``lambda``, decoupled (added to the Adam direction).
    weight_decay_mask, trust_ratio_mask: as in ``lars``; the LAMB paper's code excludes
      LayerNorm and biases from both, which is the default.
    max_trust_ratio: clip the ratio above (timm ``trust_clip``: 1.0; DeepSpeed ``max_coeff``).
    grad_prenorm: first divide the gradients by their global norm when it exceeds 1 (NVLAMB).
    axis_name: mesh axis the parameters are sharded over.
    sharded: which parameters ``axis_name`` splits (see ``scale_by_trust_ratio``).
    stacked: parameters with a stacked layer axis, one ratio per layer (see
      ``scale_by_trust_ratio``).

  Returns:
    An ``optax.GradientTransformation`` (a chain).

  References:
    You et al. 2019, arXiv:1904.00962.
  """
  return optax.chain(
      clip_by_global_norm(1.0, axis_name, sharded) if grad_prenorm else optax.identity(),
      scale_by_lamb(b1, b2, eps, weight_decay, _resolve_mask(weight_decay_mask, stacked),
                    _resolve_mask(trust_ratio_mask, stacked), max_trust_ratio, axis_name,
                    stacked, sharded),
      optax.scale_by_learning_rate(learning_rate),
  )


def tvlars_factor(step, decay_rate: float, delay_steps: int, alpha: float = 1.0,
                  min_factor: float = 0.0):
  """TVLARS's time-varying factor ``phi_t = 1 / (alpha + exp(lambda (t - d))) + gamma_min``.

  About ``1/alpha`` while ``t`` is well before the delay ``d``, then a sigmoid-like
  decline to ``gamma_min``.
  """
  t = jnp.asarray(step, jnp.float32)
  return 1.0 / (alpha + jnp.exp(decay_rate * (t - delay_steps))) + min_factor


def tvlars(learning_rate: optax.ScalarOrSchedule, decay_rate: float = 1e-3,
           delay_steps: int = 0, alpha: float = 1.0, min_factor: float = 0.0,
           momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 1e-3,
           eps: float = 0.0, nesterov: bool = False, weight_decay_mask: MaskOrFn = None,
           trust_ratio_mask: MaskOrFn = None, axis_name: Optional[str] = None,
           stacked: MaskOrFn = None, sharded: MaskOrFn = None) -> optax.GradientTransformation:
  """Time-Varying LARS: LARS whose trust ratio is scaled by ``tvlars_factor(t)``.

  The factor replaces warmup. Early on it is about ``1/alpha``, so layers explore with
  large ratios, where LARS with warmup would start near zero. After about
  ``delay_steps`` it declines at rate ``decay_rate`` towards ``min_factor``, and LARS's
  own ratio takes over. Use a constant or decaying ``learning_rate``, not a warmup.

  This follows the factor ``phi(t) = 1/(alpha + exp(lambda (t - d_e))) + gamma_min`` of
  Do et al. and, for where it applies, the authors' public reference code. The factor
  multiplies the trust ratio of the adapted (masked-in) parameters. The paper's
  equation numbers could not be checked here (no access to the paper).

  Args:
    learning_rate: global LR or schedule (``gamma_target``).
    decay_rate: ``lambda``, the steepness of the decline (per step).
    delay_steps: ``d_e`` in steps: where the decline is centred.
    alpha: ``alpha``; the early factor is about ``1/alpha``.
    min_factor: ``gamma_min``, the factor's floor.
    momentum, weight_decay, trust_coefficient, eps, nesterov, weight_decay_mask,
      trust_ratio_mask, axis_name, sharded: as in ``lars``.

  Returns:
    An ``optax.GradientTransformation`` (a chain).

  References:
    Do et al. 2023, arXiv:2309.14053; You et al. 2017, arXiv:1708.03888.
  """
  factor = lambda count: tvlars_factor(count, decay_rate, delay_steps, alpha, min_factor)
  return optax.chain(
      _decay_without_ratio(weight_decay, weight_decay_mask, trust_ratio_mask, stacked),
      _masked(optax.chain(scale_by_trust_ratio(trust_coefficient, eps, axis_name=axis_name,
                                               stacked=stacked, sharded=sharded,
                                               weight_decay=weight_decay,
                                               weight_decay_mask=_resolve_mask(
                                                   weight_decay_mask, stacked)),
                          optax.scale_by_schedule(factor)), trust_ratio_mask, stacked),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=nesterov),
  )


def trust_ratios(opt_state: Any) -> list:
  """All per-parameter trust ratios held in ``opt_state`` (masked-out ones excluded)."""
  found = []

  def visit(node):
    if isinstance(node, ScaleByTrustRatioState):
      found.extend(x for x in jax.tree.leaves(node.trust_ratio)
                   if not isinstance(x, optax.MaskedNode))
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)

  visit(opt_state)
  return found


def trust_ratio_stats(opt_state: Any) -> dict:
  """``trust_ratio/{min,median,max}`` over the parameters, or ``{}`` if none are held."""
  ratios = trust_ratios(opt_state)
  if not ratios:
    return {}
  r = jnp.concatenate([jnp.ravel(jnp.asarray(x, jnp.float32)) for x in ratios])
  return {"trust_ratio/min": r.min(), "trust_ratio/median": jnp.median(r),
          "trust_ratio/max": r.max()}
