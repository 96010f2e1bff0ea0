"""Contrastive pretraining (SimCLR's NT-Xent, or SigLIP's sigmoid loss) on two views per
example, with negatives from the global batch; evaluated by a linear probe and kNN.

A train batch holds ``view1`` and ``view2`` ``[b, ...]``: two random views of each
example, drawn on the host by ``preprocess`` from the row's own generator (so a resumed
run replays them). Labels are dropped from train batches: they are used only by the
probes. The model returns a dict with ``features`` (the encoder's output, which the
probes read) and ``projection`` (the head's, which the loss reads), and under the
sigmoid loss ``logit_scale`` and ``logit_bias`` (see ``effjax.models.ContrastiveEncoder``).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax import losses
from effjax.parallel import BATCH_AXES
from effjax.tasks.base import LossOutput, Task, apply_train

CONTRASTIVE_LOSSES = ("nt_xent", "sigmoid")
NEGATIVES = ("global", "local")


def linear_probe_accuracy(train_x, train_y, test_x, test_y, l2: float = 1e-4) -> float:
  """Accuracy of a multinomial logistic regression fitted on frozen features.

  Features are standardized with the train rows' mean and std; the probe is
  scikit-learn's L-BFGS logistic regression with an L2 penalty ``l2`` per train example
  (``C = 1 / (l2 * n)``), fitted to convergence (at most 1000 iterations).

  References:
    Chen et al. 2020, arXiv:2002.05709, Section 4 (the linear evaluation protocol).
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  probe = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=1000)
  probe.fit((train_x - mean) / std, np.asarray(train_y))
  return float(np.mean(probe.predict((test_x - mean) / std) == np.asarray(test_y)))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int = 0, chunk: int = 1024) -> float:
  """Accuracy of a weighted k-nearest-neighbour vote on cosine similarity.

  Each test row's ``k`` most similar train rows vote for their labels with weight
  ``exp(similarity / temperature)``.

  References:
    Wu et al. 2018, arXiv:1805.01978, Section 3.4 (weighted kNN on normalized features).
  """
  normalize = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  train_x = normalize(np.asarray(train_x, np.float32))
  test_x = normalize(np.asarray(test_x, np.float32))
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
  k = min(k, len(train_x))
  correct = 0
  for start in range(0, len(test_x), chunk):
    sim = test_x[start:start + chunk] @ train_x.T
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weight = np.exp(np.take_along_axis(sim, top, 1) / temperature)
    votes = np.zeros((len(sim), num_classes))
    np.add.at(votes, (np.arange(len(sim))[:, None], train_y[top]), weight)
    correct += int(np.sum(votes.argmax(1) == test_y[start:start + chunk]))
  return correct / len(test_x)


@dataclasses.dataclass(frozen=True)
class ContrastiveTask(Task):
  """Self-supervised pretraining on two augmented views of each example.

  Attributes:
    loss_name: ``'nt_xent'`` (SimCLR) or ``'sigmoid'`` (SigLIP, with the model's
      learnable ``logit_scale`` and ``logit_bias``).
    temperature: NT-Xent's tau.
    negatives: ``'global'``: every other example of the global batch (gathered over
      ``BATCH_AXES``); ``'local'``: this replica's only (the common bug, kept to measure).
    sigmoid_impl: ``'ring'`` or ``'all_gather'`` (``effjax.losses.sigmoid_loss``).
    view_fn: ``fn(x, rngs) -> view`` drawing one random view of a batch of raw inputs
      with per-row generators (``effjax.data.preprocess.mnist1d_view``).
    probe_examples: labelled train rows (the first ones) the probes fit on.
    knn_k: neighbours of the kNN vote.
  """
  loss_name: str = "nt_xent"
  temperature: float = 0.1
  negatives: str = "global"
  sigmoid_impl: str = "ring"
  view_fn: Any = None
  probe_examples: int = 4000
  knn_k: int = 20
  headline: str = "eval/linear_probe_accuracy"
  higher_is_better: bool = True

  @property
  def cross_replica(self) -> bool:
    """Whether a replica's loss reads other replicas' examples (global negatives)."""
    return self.negatives == "global"

  def init_variables(self, model, rng, input_shape):
    return model.init(rng, jnp.zeros((1,) + tuple(input_shape)), train=False)

  def preprocess(self, batch: dict, rngs, train: bool) -> dict:
    """Train: ``{'view1', 'view2'}``, two views drawn one after the other from each row's
    generator (no labels). Eval: the batch unchanged."""
    if not train:
      return batch
    return {"view1": self.view_fn(batch["input"], rngs),
            "view2": self.view_fn(batch["input"], rngs)}

  def loss(self, apply_fn, variables, batch, rng):
    b = batch["view1"].shape[0]
    # Both views in one forward pass, so that BatchNorm normalizes over all 2B views.
    out, state = apply_train(apply_fn, variables,
                             jnp.concatenate([batch["view1"], batch["view2"]]), rng=rng)
    z1, z2 = out["projection"][:b], out["projection"][b:]
    axis = BATCH_AXES if self.negatives == "global" else None
    if self.loss_name == "nt_xent":
      per_row = losses.nt_xent(z1, z2, self.temperature, axis_name=axis)
    else:
      per_row = losses.sigmoid_loss(z1, z2, out["logit_scale"], out["logit_bias"],
                                    axis_name=axis, impl=self.sigmoid_impl)
    cosine = jnp.sum(losses.l2_normalize(z1) * losses.l2_normalize(z2))
    weight = jnp.asarray(per_row.shape[0], jnp.float32)
    # alignment: the mean cosine of the two views' projections, as a sum scaled to the
    # loss's weight (2b anchors for NT-Xent, b rows for the sigmoid loss).
    return LossOutput(jnp.sum(per_row), weight,
                      {"alignment": cosine * (per_row.shape[0] / b)}, state)

  def eval_sums(self, apply_fn, variables, batch):
    mask = batch["mask"]
    return {"weight": jnp.sum(mask), "count": jnp.sum(mask)}

  def eval_rows(self, apply_fn, variables, batch) -> dict:
    """Per-row eval outputs the probes read: encoder ``features`` and ``label``."""
    out = apply_fn(variables, batch["input"], train=False)
    return {"features": out["features"], "label": batch["label"]}

  def rows_metrics(self, train_rows: dict, eval_rows: dict) -> dict:
    """``linear_probe_accuracy`` and ``knn_accuracy`` of the frozen features."""
    args = (train_rows["features"], train_rows["label"], eval_rows["features"],
            eval_rows["label"])
    return {"linear_probe_accuracy": linear_probe_accuracy(*args),
            "knn_accuracy": knn_accuracy(*args, k=self.knn_k)}

  def reference_metrics(self, train_source, eval_source):
    """``baseline/raw_linear_probe_accuracy``: the same probe on the raw input signals of
    the same rows."""
    train = train_source.gather(np.arange(min(self.probe_examples, len(train_source))))
    test = eval_source.gather(np.arange(len(eval_source)))
    flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
    return {"baseline/raw_linear_probe_accuracy": linear_probe_accuracy(
        flat(train["input"]), train["label"], flat(test["input"]), test["label"])}
