r"""LAMB on a small transformer encoder over mnist1d's 40-step sequences, global batch 1024.

Launch:
  python -m experiments.train --config=configs/mnist1d_lamb.py --workdir=/tmp/mnist1d_lamb

The LAMB paper's point: layer-wise adaptation that works for attention models, where
LARS does not. Model: a 2-layer pre-LN transformer encoder (width 64, 4 heads), mean-pooled.
Optimizer: LAMB (weight decay 0.01 on weights only; LayerNorm and biases get neither decay
nor the trust ratio), LR = 2e-3 * sqrt(B / 256) (square-root rule, for adaptive
optimizers), 2 epochs of warmup, then polynomial decay (power 1, as in the BERT recipe).
Data: 100K mnist1d examples, 15 epochs (1170 steps). Measured: 66.8% test accuracy in
817 s on 2 CPU cores with 8 simulated devices (sharing the CPU with a test run). A weak
result: a transformer over 40 scalar tokens learns mnist1d slowly (the mnist1d paper's GRU
reaches 91%; the CNN configs here 99.6%). See docs/results.md.

Size argument: ``:small`` (20K examples, 4 epochs).
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
  c.num_epochs = 15.0
  c.model.name = "transformer"
  c.model.norm = "layer"
  c.model.widths = (64,)
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.optimizer.name = "lamb"
  c.optimizer.base_learning_rate = 2e-3
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "sqrt"
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.schedule.decay = "linear"
  c.schedule.warmup_epochs = 2.0
  c.eval_every_epochs = 5.0
  c.log_every = 50
  c.checkpoint.every_steps = 500
  if size == "small":
    c.dataset.num_examples = 20_000
    c.num_epochs = 4.0
    c.schedule.warmup_epochs = 1.0
    c.eval_every_epochs = 2.0
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  return derive(c)
