r"""Critical batch size in tokens: steps to a target validation loss against batch size.

Launch:
  python -m experiments.batch_size_sweep --config=configs/sweep_lm_python_stdlib.py --workdir=DIR

A small byte-level decoder (2 layers, width 64, 64-token sequences) on python_stdlib,
AdamW with the square-root rule from 2e-3 at 32 sequences, each batch size's LR swept
over 0.5x/1x/2x of the rule, capped at 1e-2. Each run stops when the eval loss (nats per
byte, on 10% of the validation split) reaches ``target.loss``. Runs at 32 sequences and
more estimate B_simple with 4 microbatches. The fit S = S_min (1 + B_noise / B) gives
S_min, E_min and B_crit in sequences; times 64 in tokens.

Measured: see docs/results.md, "Critical batch size in tokens".

Size argument: ``:small`` (three batch sizes, one LR) for a check.
"""

from effjax.config import base_config, derive


def get_config(size: str = "full"):
  c = base_config()
  c.task = "lm"
  c.dataset.name = "python_stdlib"
  c.dataset.seq_len = 64
  c.dataset.eval_split = "validation[:10%]"
  c.model.name = "decoder_lm"
  c.model.widths = (64,)
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_epochs = 1.0
  c.dataset.num_train_examples = 32 * 4000  # The schedule's horizon (sequences).
  c.optimizer.name = "adamw"
  c.optimizer.base_learning_rate = 2e-3
  c.optimizer.base_batch_size = 32
  c.optimizer.scaling_rule = "sqrt"
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.schedule.decay = "constant"   # Steps-to-target: no decay tied to a horizon.
  c.schedule.warmup_epochs = 0.0
  c.log_every = 25
  c.eval_every_epochs = 1.0
  c.target.loss = 2.0
  c.target.first_eval_step = 10
  c.target.eval_growth = 1.15
  c.sweep.batch_sizes = (16, 32, 64, 128, 256)
  c.sweep.lr_multipliers = (0.5, 1.0, 2.0)
  c.sweep.max_learning_rate = 1e-2
  c.sweep.max_steps = 2500
  c.sweep.noise_accum_steps = 4
  c.sweep.noise_min_batch = 32
  c.sweep.workers = 2
  c.sweep.devices_per_worker = 1
  if size == "small":
    c.sweep.batch_sizes = (16, 64, 256)
    c.sweep.lr_multipliers = (1.0,)
    c.sweep.max_steps = 600
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  return derive(c)
