r"""Large-batch CNN on scaled-up mnist1d: global batch 1024, LARS, linear LR scaling, warmup.

Launch (the README's main command):
  python -m experiments.train --config=configs/mnist1d_large_batch.py --workdir=/tmp/mnist1d_lb

Data: 100K mnist1d examples (80K train / 20K test), generated locally on first use.
Optimizer: LARS (trust coefficient 1e-3, momentum 0.9, weight decay 5e-4; biases and BN
parameters get neither decay nor the trust ratio), LR = 2.0 * B / 256 (linear rule),
5 epochs of linear warmup, then polynomial decay with power 2 (the LARS recipe).
Expected: about 99.6% test accuracy after 20 epochs (1560 steps); on a 2-core CPU with 8
simulated devices, about 2.5 minutes (docs/results.md has the measured numbers).

Size argument: ``--config=configs/mnist1d_large_batch.py:small`` (20K examples, 6 epochs)
for a quick local check.
"""

from effjax.config import base_config, derive
from effjax.data import mnist1d_train_size


def get_config(size: str = "full"):
  c = base_config()
  c.dataset.name = "mnist1d"
  c.dataset.num_examples = 100_000
  c.dataset.num_train_examples = mnist1d_train_size(c.dataset.get_ref("num_examples"))
  c.batch_size = 1024
  c.eval_batch_size = 2048
  c.num_epochs = 20.0
  c.model.name = "cnn1d"
  c.model.norm = "batch"
  c.model.widths = (64, 128, 128)
  c.optimizer.name = "lars"
  c.optimizer.trust_coefficient = 1e-3
  c.optimizer.base_learning_rate = 2.0
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "linear"
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.decay = "poly"
  c.schedule.power = 2.0
  c.schedule.warmup_epochs = 5.0
  c.eval_every_epochs = 5.0
  c.log_every = 50
  c.checkpoint.every_steps = 500
  if size == "small":
    c.dataset.num_examples = 20_000
    c.num_epochs = 6.0
    c.schedule.warmup_epochs = 1.0
    c.eval_every_epochs = 2.0
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  return derive(c)
