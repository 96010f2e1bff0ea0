r"""The byte-level LM of ``lm_python_stdlib.py`` with LAMB at a large batch.

Launch:
  python -m experiments.train --config=configs/lm_python_stdlib_lamb.py --workdir=/tmp/lm_lamb

LAMB (You et al. 2019, arXiv:1904.00962) is the optimizer for BERT at batch 32K-64K;
its claim is that layer-wise trust ratios hold where Adam degrades as the batch grows.
Here: the same model and token budget as ``lm_python_stdlib.py``, at 8x its batch
(512 x 256 tokens = 131K tokens per step), LAMB with weight decay 0.01 (LayerNorm,
biases and position embeddings excluded from decay and trust ratio), LR = base *
sqrt(B / 64) (square-root rule), warmup then cosine decay. ``--config.model.scan_layers=True``
stacks the blocks; the trust ratio is then still one per layer.

Measured (docs/results.md, "a. LAMB against AdamW at a large batch"): with ``:small`` and
half its token budget (``--config.dataset.num_train_examples=24000``, 93 steps at batch
256, about 140 s a run on 2 CPU cores), LAMB's best LR gave 4.36 bits per byte, AdamW's
3.83, and AdamW at batch 32 on the same tokens 2.08: LAMB did not hold where AdamW
degraded. The full config was not run.

Size argument: ``:small`` (the LM ``:small`` model and token budget at batch 256: 188
steps of 256 x 128 tokens).
"""

import importlib.util
import os

from effjax.config import derive


def _adamw_config(size):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_python_stdlib.py")
  spec = importlib.util.spec_from_file_location("lm_python_stdlib", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def get_config(size: str = "full"):
  if size not in ("full", "small"):
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  c = _adamw_config(size)
  budget = c.dataset.num_train_examples  # Sequences: the same tokens as the AdamW config.
  c.batch_size = 8 * c.batch_size
  c.eval_batch_size = max(c.eval_batch_size, 256)
  c.dataset.num_train_examples = budget
  c.optimizer.name = "lamb"
  c.optimizer.base_learning_rate = 2e-3 if size == "full" else 3e-3
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.999
  c.schedule.warmup_epochs = 0.1
  c.log_every = 10
  return derive(c)
