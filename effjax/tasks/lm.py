"""Causal language modelling on packed sequences (``effjax.data.text``).

A batch holds ``inputs``, ``targets``, ``segment_ids``, ``positions`` and ``weights``,
each ``[b, L]``: ``weights`` is 1 where the target is a real token of the same document
as its input, so padding and document boundaries never enter the loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from effjax.tasks.base import NATS_PER_BIT, LossOutput, Task, apply_train, top1_correct


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted next-token cross-entropy.

  Args:
    logits: ``[..., L, V]``.
    targets: ``[..., L]`` token ids.
    weights: ``[..., L]``, 0 on positions that must not count.

  Returns:
    ``(nll_sum, correct_sum, weight_sum)`` in float32.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                        targets.astype(jnp.int32))
  w = weights.astype(jnp.float32)
  correct = top1_correct(logits, targets).astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)


def moe_statistics(aux: dict) -> dict:
  """The mean over MoE layers of the sown ``balance_loss``, ``entropy`` and ``load``
  (``[E]``) in a model's ``aux`` collection (stacked layers included), or ``{}``."""
  found: dict = {"balance_loss": [], "entropy": [], "load": []}

  def visit(node):
    for key, value in node.items():
      if key in found:
        for v in value:  # One per layer, or one [num_layers, ...] for a scanned stack.
          v = jnp.asarray(v)
          found[key].append(v.reshape(-1, v.shape[-1]) if key == "load" else v.reshape(-1))
      elif isinstance(value, dict):
        visit(value)

  visit(aux)
  if not found["balance_loss"]:
    return {}
  return {k: jnp.mean(jnp.concatenate(v), axis=0) for k, v in found.items()}


def _model_kwargs(batch: dict) -> dict:
  return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}


@dataclasses.dataclass(frozen=True)
class LanguageModelTask(Task):
  """Next-token prediction for a decoder called as ``model.apply(variables, inputs,
  segment_ids=..., positions=..., train=...)`` returning ``[b, L, V]`` logits.

  The loss is the mean over the real target tokens of the global batch; eval reports
  ``eval/loss`` (nats per token), ``eval/accuracy`` and ``eval/bits_per_byte`` (the
  tokens are bytes, so bits per byte is the loss over ln 2), and ``count`` (tokens).

  A mixture-of-experts model's balance loss (sown in its ``aux`` collection) is added
  with weight ``moe_balance_coef``; the train metrics then include
  ``moe/balance_loss``, ``moe/entropy`` and ``moe/load/<i>``, means over MoE layers.
  """
  headline: str = "eval/bits_per_byte"
  higher_is_better: bool = False
  moe_balance_coef: float = 0.0

  def init_variables(self, model, rng, input_shape):
    seq = jnp.zeros((1,) + tuple(input_shape), jnp.int32)
    return model.init(rng, seq, segment_ids=jnp.ones_like(seq), positions=seq, train=False)

  def loss(self, apply_fn, variables, batch, rng):
    logits, state = apply_train(apply_fn, variables, batch["inputs"], rng=rng,
                                **_model_kwargs(batch))
    nll, correct, weight = next_token_loss(logits, batch["targets"], batch["weights"])
    metrics = {"accuracy": correct}
    moe_stats = moe_statistics(state.pop("aux", {}))
    if moe_stats:  # Means weighted by this replica's tokens, like the loss.
      nll = nll + self.moe_balance_coef * moe_stats["balance_loss"] * weight
      metrics.update({"moe/balance_loss": moe_stats["balance_loss"] * weight,
                      "moe/entropy": moe_stats["entropy"] * weight,
                      **{f"moe/load/{i}": f * weight for i, f in enumerate(moe_stats["load"])}})
    return LossOutput(nll, weight, metrics, state)

  def eval_sums(self, apply_fn, variables, batch):
    logits = apply_fn(variables, batch["inputs"], train=False, **_model_kwargs(batch))
    weights = batch["weights"] * batch["mask"][:, None]
    nll, correct, weight = next_token_loss(logits, batch["targets"], weights)
    return {"loss": nll, "accuracy": correct, "weight": weight, "count": weight}

  def eval_metrics(self, sums):
    out = super().eval_metrics(sums)
    out["bits_per_byte"] = out["loss"] / NATS_PER_BIT
    return out

  def reference_metrics(self, train_source, eval_source):
    """``baseline/bigram_bits_per_byte``: an add-one bigram model counted on the train
    split, scored on the same eval targets and weights as the LM."""
    from effjax.data import text  # pylint: disable=g-import-not-at-top
    if not (isinstance(train_source, text.PackedSource) and
            isinstance(eval_source, text.PackedSource)):
      return {}
    return {"baseline/bigram_bits_per_byte": text.bigram_bits_per_byte(train_source,
                                                                       eval_source)}
