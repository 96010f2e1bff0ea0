"""Tasks: what a batch holds, and one replica's loss, metrics and eval sums.

``effjax.steps.train_step(state, batch, task=...)`` runs any ``Task``; see
``effjax.tasks.base`` for the interface and the README for a task written outside effjax.
"""

from effjax.tasks.base import LossOutput, NATS_PER_BIT, Task, apply_train, rows
from effjax.tasks.classification import ClassificationTask, cross_entropy
from effjax.tasks.lm import LanguageModelTask, next_token_loss

CLASSIFICATION = ClassificationTask()
TASKS = ("classification", "lm")


def create_task(config) -> Task:
  """The task named by ``config.task``: ``'classification'`` (with
  ``config.label_smoothing``) or ``'lm'`` (next-token prediction on packed text)."""
  if config.task == "classification":
    return ClassificationTask(label_smoothing=float(config.label_smoothing))
  if config.task == "lm":
    return LanguageModelTask()
  raise ValueError(f"task={config.task!r} is not one of {TASKS}")
