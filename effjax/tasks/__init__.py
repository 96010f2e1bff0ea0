"""Tasks: what a batch holds, and one replica's loss, metrics and eval sums.

``effjax.steps.train_step(state, batch, task=...)`` runs any ``Task``; see
``effjax.tasks.base`` for the interface and the README for a task written outside effjax.
"""

from effjax.tasks.base import LossOutput, NATS_PER_BIT, Task, apply_train, rows, top1_correct
from effjax.tasks.classification import ClassificationTask, cross_entropy
from effjax.tasks.contrastive import (CONTRASTIVE_LOSSES, NEGATIVES, ContrastiveTask,
                                      knn_accuracy, linear_probe_accuracy)
from effjax.tasks.lm import LanguageModelTask, moe_statistics, next_token_loss

CLASSIFICATION = ClassificationTask()
TASKS = ("classification", "lm", "contrastive")


def create_task(config) -> Task:
  """The task named by ``config.task``: ``'classification'`` (with
  ``config.label_smoothing``), ``'lm'`` (next-token prediction on packed text) or
  ``'contrastive'`` (``config.contrastive``: two mnist1d views per example)."""
  if config.task == "classification":
    return ClassificationTask(label_smoothing=float(config.label_smoothing))
  if config.task == "lm":
    moe = config.model.moe
    return LanguageModelTask(moe_balance_coef=float(moe.balance_coef) if moe.num_experts else 0.0)
  if config.task == "contrastive":
    from effjax.data.preprocess import mnist1d_view  # pylint: disable=g-import-not-at-top
    c = config.contrastive
    return ContrastiveTask(loss_name=c.loss, temperature=float(c.temperature),
                           negatives=c.negatives, sigmoid_impl=c.sigmoid_impl,
                           view_fn=mnist1d_view, probe_examples=int(c.probe_examples),
                           knn_k=int(c.knn_k))
  raise ValueError(f"task={config.task!r} is not one of {TASKS}")
