"""The task interface: what a batch holds, and one replica's loss, metrics and eval sums.

``effjax.steps.train_step`` and ``eval_step`` take a task as a static argument and do the
rest (microbatches, the all-reduce, the update, guards, the noise scale, EMA, metrics),
so a new loss or a new kind of data is a new ``Task``, not an edit of the step.

Losses are *sums* with a *weight* (examples, or real tokens): the step divides the
all-reduced sum by the all-reduced weight, so the gradient is that of the mean over the
global batch even when replicas hold different numbers of real tokens.
"""

import math
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp


class LossOutput(NamedTuple):
  """What ``Task.loss`` returns for one replica's (micro)batch.

  Attributes:
    loss: the *sum* of the per-example (or per-token) losses, float32.
    weight: how many examples (or tokens) the sum is over, float32.
    metrics: further sums (e.g. correct predictions) logged as ``train/<name>`` after
      division by the global weight.
    model_state: the model's updated mutable collections (``{'batch_stats': ...}``), or
      ``{}``.
  """
  loss: jax.Array
  weight: jax.Array
  metrics: dict
  model_state: dict


class Task:
  """Base class of effjax tasks; subclasses are frozen dataclasses (hashable, static).

  A subclass implements ``init_variables``, ``loss`` and ``eval_sums``; the rest has
  defaults. ``apply_train`` calls the model in train mode with the dropout RNG and the
  mutable collections handled.

  Attributes:
    headline: the eval metric that the progress line shows, and ``higher_is_better``.
  """
  headline: str = "eval/loss"
  higher_is_better: bool = False

  def init_variables(self, model, rng: jax.Array, input_shape: tuple) -> dict:
    """The model's initial variables (from a batch of one)."""
    raise NotImplementedError

  def loss(self, apply_fn: Callable, variables: dict, batch: dict, rng: jax.Array) -> LossOutput:
    """The train loss of this replica's (micro)batch; ``rng`` is its dropout key."""
    raise NotImplementedError

  def eval_sums(self, apply_fn: Callable, variables: dict, batch: dict) -> dict:
    """Sums over this replica's eval rows (``batch['mask']`` is 0 on padding rows):
    ``loss``, ``weight`` and any other metric's sum; ``count`` counts real rows."""
    raise NotImplementedError

  def eval_metrics(self, sums: dict) -> dict:
    """Eval metrics from the global sums: each sum over the weight, and ``count``."""
    out = {k: float(v / sums["weight"]) for k, v in sums.items()
           if k not in ("weight", "count")}
    out["count"] = int(sums["count"])
    return out

  #: Whether one replica's loss reads other replicas' examples (a collective inside the
  #: loss). Its per-replica gradient is then no small-batch gradient, so the noise scale
  #: uses microbatches of all replicas (``train_step``'s ``noise_small_batch``).
  cross_replica: bool = False
  #: > 0: evaluation also runs ``eval_rows`` on this many labelled train rows (the first
  #: ones) and on the eval split, and ``rows_metrics`` turns them into metrics.
  probe_examples: int = 0

  def preprocess(self, batch: dict, rngs, train: bool) -> dict:
    """Maps the dataset's preprocessed host batch to what ``loss`` (``train``) or
    ``eval_sums`` reads, with the pipeline's per-row generators (default: unchanged)."""
    del rngs, train
    return batch

  def eval_rows(self, apply_fn: Callable, variables: dict, batch: dict) -> dict:
    """Per-row eval outputs (e.g. features) for ``rows_metrics``; only with
    ``probe_examples > 0``."""
    raise NotImplementedError

  def rows_metrics(self, train_rows: dict, eval_rows: dict) -> dict:
    """Metrics from ``eval_rows`` of the probe's train rows and of the eval split (on the
    host, padding rows removed)."""
    raise NotImplementedError

  def reference_metrics(self, train_source: Any, eval_source: Any) -> dict:
    """Baselines computed from the data alone, written to ``summary.json`` (default none)."""
    del train_source, eval_source
    return {}


def rows(batch: dict) -> int:
  """The number of rows (examples) in a batch: the leading dimension of its leaves."""
  return jax.tree.leaves(batch)[0].shape[0]


def apply_train(apply_fn: Callable, variables: dict, *args, rng: Optional[jax.Array] = None,
                **kwargs):
  """``apply_fn(variables, *args, train=True, **kwargs)`` with every collection but the
  parameters mutable and ``rng`` as the ``'dropout'`` RNG.

  Returns:
    ``(output, model_state)``: ``model_state`` holds ``batch_stats`` if the model has it,
    and ``aux`` if it sows auxiliary losses and statistics there (a mixture of experts'
    balance loss; read by the task, not kept in the state).

  Raises:
    ValueError: the model writes a collection other than ``batch_stats`` and ``aux``.
  """
  rngs = {"dropout": rng} if rng is not None else None
  out, new_vars = apply_fn(variables, *args, train=True, rngs=rngs,
                           mutable=flax.core.DenyList("params"), **kwargs)
  extra = sorted(set(new_vars) - {"batch_stats", "aux"})
  if extra:
    raise ValueError(f"the model writes collections {extra} that the TrainState does not "
                     "keep (it keeps params and batch_stats; tasks read aux)")
  return out, dict(new_vars)


NATS_PER_BIT = math.log(2.0)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether each row's top-1 prediction is its label: ``argmax(logits, -1) == labels``,
  ties going to the first maximum as in ``argmax``, for finite logits.

  ``argmax`` is a two-output (value, index) reduction, which XLA:CPU runs as a slow
  generic loop (BENCHMARKS.md: about 1% of the byte LM's train step). Here the label's
  logit is compared with every logit instead: the label is the first maximum iff no
  logit before it is ``>=`` it and none after it is ``>``, one fused elementwise pass and
  a boolean ``all``. (With a NaN logit in the row it is False.)

  Args:
    logits: ``[..., V]``.
    labels: ``[...]`` integer class ids in ``[0, V)``.

  Returns:
    A bool array shaped like ``labels``.
  """
  labels = labels.astype(jnp.int32)
  mine = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  before = jnp.arange(logits.shape[-1], dtype=jnp.int32) < labels[..., None]
  return jnp.all(jnp.where(before, logits < mine, logits <= mine), axis=-1)
