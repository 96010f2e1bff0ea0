"""Softmax classification: ``{'input': [b, ...], 'label': [b]}`` -> cross-entropy, accuracy."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from effjax.tasks.base import LossOutput, Task, apply_train, top1_correct


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with optional label smoothing, in float32."""
  n = logits.shape[-1]
  targets = jax.nn.one_hot(labels, n)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / n
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@dataclasses.dataclass(frozen=True)
class ClassificationTask(Task):
  """Cross-entropy (with optional label smoothing) and accuracy of a classifier called as
  ``model.apply(variables, x, train=...)``.

  Attributes:
    label_smoothing: label-smoothing factor of the train loss (eval uses none).
  """
  label_smoothing: float = 0.0
  headline: str = "eval/accuracy"
  higher_is_better: bool = True

  def init_variables(self, model, rng, input_shape):
    return model.init(rng, jnp.zeros((1,) + tuple(input_shape)), train=False)

  def loss(self, apply_fn, variables, batch, rng):
    logits, state = apply_train(apply_fn, variables, batch["input"], rng=rng)
    per_example = cross_entropy(logits, batch["label"], self.label_smoothing)
    correct = jnp.sum(top1_correct(logits, batch["label"])).astype(jnp.float32)
    return LossOutput(jnp.sum(per_example), jnp.asarray(per_example.shape[0], jnp.float32),
                      {"accuracy": correct}, state)

  def eval_sums(self, apply_fn, variables, batch):
    logits = apply_fn(variables, batch["input"], train=False)
    mask = batch["mask"]
    correct = top1_correct(logits, batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "accuracy": jnp.sum(correct * mask), "weight": jnp.sum(mask),
            "count": jnp.sum(mask)}
