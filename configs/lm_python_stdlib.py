r"""Byte-level decoder LM on the running interpreter's standard library, with AdamW.

Launch (the README's LM command):
  python -m experiments.train --config=configs/lm_python_stdlib.py --workdir=/tmp/lm

Data: ``python_stdlib`` (the stdlib's ``*.py`` sources, tests excluded; 1 file in 20 is
validation), built locally on first use; documents packed into sequences of
``dataset.seq_len`` bytes with segment ids, so that attention and the loss never cross a
document boundary. Model: a pre-LN decoder (learned positions, tied embeddings).
Optimizer: AdamW (b2 0.95, weight decay 0.1 on matrices other than position embeddings),
LR = base * sqrt(B / 64) (square-root rule for Adam), linear warmup, cosine decay.
The budget: ``dataset.num_train_examples`` sequences (one schedule "epoch").

Measured (docs/results.md, "Language models on python_stdlib"): ``:small`` reaches 1.72
bits per byte on the validation split (the add-one bigram: 3.49) in 238 s on 2 CPU cores
with 8 simulated devices. The full config (49M tokens, width 256, 4 layers) was not run
on that machine: about 50x ``:small``'s compute, hours on 2 cores. ``summary.json``
holds ``eval/bits_per_byte`` and ``baseline/bigram_bits_per_byte``.

``:1.3b`` is for ``--dry_run`` (sizes and memory on a (16, 16) mesh of 256 devices):
  python -m experiments.train --config=configs/lm_python_stdlib.py:1.3b --dry_run
It prints (24 s on 2 CPU cores) 1,314,041,856 parameters, 9.683e15 FLOPs per step and,
per device, 313.3 MiB of parameters and 626.6 MiB of AdamW moments (split 16 ways),
5012.7 MiB of gathered parameters and 46864.0 MiB of activations and temporaries at 2
sequences per device (XLA:CPU's buffer assignment, no rematerialisation): 52816.6 MiB
in all (docs/results.md, "FSDP"). The layers are not scanned here: XLA's cost analysis
counts a scanned layer once.

Size argument: ``:small`` (a 2-layer width-128 model, 1500 steps of 32 x 128 tokens) for a
local run of a few minutes on 2 CPU cores with 8 simulated devices.
"""

from effjax.config import base_config, derive


def get_config(size: str = "full"):
  c = base_config()
  c.task = "lm"
  c.dataset.name = "python_stdlib"
  c.dataset.seq_len = 256
  c.model.name = "decoder_lm"
  c.model.widths = (256,)
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.dropout = 0.0
  c.model.tie_embeddings = True
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 1.0
  c.dataset.num_train_examples = 64 * 3000   # 3000 steps, 49M tokens.
  c.optimizer.name = "adamw"
  c.optimizer.base_learning_rate = 2e-3
  c.optimizer.base_batch_size = 64
  c.optimizer.scaling_rule = "sqrt"
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.schedule.decay = "cosine"
  c.schedule.warmup_epochs = 0.05
  c.eval_every_epochs = 0.25
  c.log_every = 50
  c.checkpoint.every_steps = 500
  if size == "small":
    c.dataset.seq_len = 128
    c.model.widths = (128,)
    c.model.num_layers = 2
    c.batch_size = 32
    c.optimizer.base_learning_rate = 3e-3
    c.optimizer.base_batch_size = 32
    c.dataset.num_train_examples = 32 * 1500
    c.eval_batch_size = 256
    c.eval_every_epochs = 1.0
    c.log_every = 100
    c.checkpoint.every_steps = 0
  elif size == "1.3b":
    # For --dry_run at pod scale: 1.31B parameters (GPT-3 XL's width and heads, 26 layers
    # for byte-level vocab), 1M-token batches on 256 devices, parameters and AdamW's
    # moments split 16 ways (mesh (16, 16)).
    c.dataset.seq_len = 2048
    c.model.widths = (2048,)
    c.model.num_layers = 26
    c.model.num_heads = 16
    c.compute_dtype = "bfloat16"
    c.batch_size = 512
    c.eval_batch_size = 512
    c.optimizer.base_batch_size = 512
    c.optimizer.base_learning_rate = 2e-4
    c.dataset.num_train_examples = 512 * 10000
    c.mesh.fsdp = 16
    c.dry_run_devices = 256
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small', '1.3b')")
  return derive(c)
