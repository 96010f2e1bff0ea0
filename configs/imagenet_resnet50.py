r"""ResNet-50 on ImageNet at global batch 8192: Goyal et al.'s "ImageNet in 1 hour" recipe.

Launch on a TPU pod slice or GPU cluster (imagenet2012 prepared as array_record):
  python -m experiments.train --config=configs/imagenet_resnet50.py --workdir=gs://.../r50 \
      --config.dataset.data_dir=DATA_DIR

Recipe (Goyal et al. 2017, arXiv:1706.02677): LR = 0.1 * B / 256 = 3.2, linear warmup for
5 epochs, then (here) cosine decay to 90 epochs; momentum 0.9, weight decay 1e-4 on
weights only; the last BN scale of every residual block starts at 0; BN statistics per
device. Expected: about 76% top-1 (Goyal et al. report 76.3% at batch 8K); on a v3-256
slice about 1 h. Not run here (no ImageNet); check it without data:
  python -m experiments.train --config=configs/imagenet_resnet50.py --dry_run \
      --config.dry_run_devices=256

Size argument: ``:small`` (batch 256, 1 epoch, 8 input threads) for a smoke test.
"""

from effjax.config import base_config, derive


def get_config(size: str = "full"):
  c = base_config()
  c.dataset.name = "imagenet2012"
  c.dataset.num_train_examples = 1_281_167
  c.batch_size = 8192
  c.eval_batch_size = 8192
  c.num_epochs = 90.0
  c.label_smoothing = 0.0
  c.model.name = "resnet50"
  c.model.norm = "batch"
  c.optimizer.name = "momentum"
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "linear"
  c.optimizer.weight_decay = 1e-4
  c.schedule.decay = "cosine"
  c.schedule.warmup_epochs = 5.0
  c.compute_dtype = "bfloat16"
  c.input.num_threads = 32
  c.input.num_workers = 16
  c.eval_every_epochs = 5.0
  c.log_every = 50
  c.checkpoint.every_steps = 1000
  if size == "small":
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 1.0
    c.schedule.warmup_epochs = 0.1
    c.input.num_threads = 8
    c.input.num_workers = 0
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  return derive(c)
