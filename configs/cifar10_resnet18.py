r"""ResNet-18 (CIFAR stem) on CIFAR-10 at global batch 4096, for a GPU node or TPU pod slice.

Launch (CIFAR-10 prepared as array_record in DATA_DIR, e.g. with
``tfds build cifar10 --file_format=array_record``):
  python -m experiments.train --config=configs/cifar10_resnet18.py --workdir=gs://.../c10 \
      --config.dataset.data_dir=DATA_DIR

Recipe: sync BatchNorm, SGD + Nesterov, LR = 0.1 * B / 256 (linear rule), 5 warmup
epochs, cosine decay over 200 epochs, weight decay 5e-4 (weights only), label smoothing
0.1, flip + crop augmentation. Expected: about 95% test accuracy; on 8 A100s about 1 h.
Not run here (no CIFAR-10 on this machine); check its shapes and cost without data:
  python -m experiments.train --config=configs/cifar10_resnet18.py --dry_run \
      --config.dry_run_devices=32

Size argument: ``:small`` (batch 256, 2 epochs) for a quick check where the data exists.
"""

from effjax.config import base_config, derive


def get_config(size: str = "full"):
  c = base_config()
  c.dataset.name = "cifar10"
  c.dataset.num_train_examples = 50_000
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.num_epochs = 200.0
  c.label_smoothing = 0.1
  c.model.name = "resnet18"
  c.model.norm = "sync_batch"
  c.optimizer.name = "nesterov"
  c.optimizer.base_learning_rate = 0.1
  c.optimizer.base_batch_size = 256
  c.optimizer.scaling_rule = "linear"
  c.optimizer.weight_decay = 5e-4
  c.schedule.decay = "cosine"
  c.schedule.warmup_epochs = 5.0
  c.input.num_threads = 8
  c.eval_every_epochs = 10.0
  c.log_every = 10
  c.checkpoint.every_steps = 1000
  if size == "small":
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 2.0
    c.schedule.warmup_epochs = 0.5
  elif size != "full":
    raise ValueError(f"size={size!r} is not one of ('full', 'small')")
  return derive(c)
