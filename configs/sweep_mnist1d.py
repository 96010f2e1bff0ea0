r"""Steps-to-target sweep over batch sizes 16..8192 on mnist1d (100K examples).

Launch (about an hour on a 2-core CPU, 2 runs at a time; the B >= 4096 runs dominate):
  python -m experiments.batch_size_sweep --config=configs/sweep_mnist1d.py \
      --workdir=/tmp/sweep_mnist1d

Model: the mnist1d CNN with LayerNorm (no batch statistics, so accumulation microbatches
give exact small-batch gradients for the noise scale). Optimizer: Nesterov SGD, constant
LR, no warmup. At each batch size the LRs are 0.5, 1 and 2 times the linear rule's
0.1 * B / 128, or 0.05 and 0.1 from B = 128 on: no LR above 0.1 is tried. Shallue et al.
tune the LR per batch size; here 0.2 took 2.6 to 5.6 times the steps of 0.05 at
B = 128 to 512. Each run stops at 97% test accuracy (evaluated at geometrically spaced
steps, factor 1.1) or after 60 epochs or 20K steps. Runs at B >= 64 estimate the noise
scale from 4 microbatches. Expected: steps fall about as 1/B up to a few hundred examples
per batch, then flatten; the fitted B_crit and the measured B_simple are of the same
order of magnitude (docs/results.md has the numbers).

Size argument: ``:tiny`` (the canonical 4000/1000 split, batch sizes 8 to 128 at one LR,
0.5 x the rule, target 80%, at most 8 epochs; 28 s on 2 cores. All 5 batch sizes reach
the target: B_crit 51 with rmse 0.134 in log steps, B_simple 47 (measured 2026-11-23 at
commit 7a6b87f, twice, the same). At a4eddb2, before the step packed its small leaves into
one all-reduce operand, the same command gave 36, 0.133 and 50: the packing moved the last
bits of those sums, and so the steps at which 80% is crossed. Earlier records: 36, 0.168
and 39 (2026-11-23), and 46, 0.149 and 47 in commit baa667c. On an AVX-512 CPU (AMD EPYC,
Zen 4) at 04a9680: 51, 0.163 and 51, in 50 s (2026-11-24). It is what
``notebooks/critical_batch.ipynb`` runs when no sweep is given).
"""

from effjax.config import base_config, derive
from effjax.data import mnist1d_train_size


def get_config(size: str = "full"):
  c = base_config()
  c.dataset.name = "mnist1d"
  c.dataset.num_examples = 100_000
  c.dataset.num_train_examples = mnist1d_train_size(c.dataset.get_ref("num_examples"))
  c.batch_size = 128
  c.eval_batch_size = 2000
  c.num_epochs = 60.0
  c.model.name = "cnn1d"
  c.model.norm = "layer"
  c.optimizer.name = "nesterov"
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.base_batch_size = 128
  c.optimizer.scaling_rule = "linear"
  c.optimizer.weight_decay = 0.0
  c.schedule.decay = "constant"
  c.schedule.warmup_epochs = 0.0
  c.eval_every_epochs = 100.0  # Only the target's geometric evaluations (and the last).
  c.log_every = 20
  c.checkpoint.every_steps = 5000
  c.target.accuracy = 0.97
  c.target.first_eval_step = 8
  c.target.eval_growth = 1.1
  c.noise_scale.decay = 0.95
  c.sweep.batch_sizes = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  c.sweep.max_learning_rate = 0.1  # The best LR stops growing by B = 128 (docs/results.md).
  c.sweep.max_steps = 20_000
  c.sweep.noise_accum_steps = 4
  c.sweep.noise_min_batch = 64
  c.sweep.workers = 2
  c.sweep.devices_per_worker = 1
  if size == "tiny":
    c.dataset.num_examples = 5000
    c.eval_batch_size = 1000
    c.num_epochs = 8.0
    c.sweep.max_steps = 0
    c.target.accuracy = 0.8
    c.sweep.batch_sizes = (8, 16, 32, 64, 128)
    c.sweep.lr_multipliers = (0.5,)  # The best of (0.5, 1) at 32..128; one LR keeps it short.
    c.sweep.noise_min_batch = 32
    c.curves = False  # The notebook reads sweep.json; a curves.png per run costs ~1.7 s.
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'tiny')")
  return derive(c)
