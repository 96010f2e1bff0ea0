r"""Small-batch baseline on the same scaled-up mnist1d: batch 128, SGD with momentum.

Launch:
  python -m experiments.train --config=configs/mnist1d_sgd.py --workdir=/tmp/mnist1d_sgd

The reference point for the large-batch configs: the same model, data and epochs as
``mnist1d_large_batch.py``, at the batch size the LR was tuned for (LR = 0.1 * 128/256),
no warmup. Expected: about 98% test accuracy (docs/results.md has the measured numbers).

Size argument: ``:small`` (20K examples, 6 epochs); ``:canonical`` (the 4000/1000 split).
"""

from effjax.config import base_config, derive
from effjax.data import mnist1d_train_size


def get_config(size: str = "full"):
  c = base_config()
  c.dataset.name = "mnist1d"
  c.dataset.num_examples = 100_000
  c.dataset.num_train_examples = mnist1d_train_size(c.dataset.get_ref("num_examples"))
  c.batch_size = 128
  c.eval_batch_size = 2048
  c.num_epochs = 20.0
  c.model.name = "cnn1d"
  c.model.norm = "batch"
  c.optimizer.name = "nesterov"
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "linear"
  c.optimizer.weight_decay = 5e-4
  c.schedule.decay = "cosine"
  c.schedule.warmup_epochs = 0.0
  c.eval_every_epochs = 5.0
  c.log_every = 100
  c.checkpoint.every_steps = 2000
  if size == "small":
    c.dataset.num_examples = 20_000
    c.num_epochs = 6.0
    c.eval_every_epochs = 2.0
  elif size == "canonical":
    c.dataset.num_examples = 5000
    c.eval_batch_size = 1000
    c.eval_every_epochs = 10.0
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small', 'canonical')")
  return derive(c)
