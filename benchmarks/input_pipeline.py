r"""Input pipeline throughput against the train step's consumption, side by side.

  python benchmarks/input_pipeline.py --datasets=mnist1d,cifar_shaped

For each dataset it prints (1) examples/s of the input pipeline alone (grain stream,
preprocessing and augmentation included, per-process batches on the host), (2) examples/s
the compiled train step consumes with batches already on the devices, (3) examples/s of
the real loop (pipeline + device prefetch + step), and the ratios ``(pipeline)/(step)``,
the pipeline's headroom over the step (the target is at least 5 on mnist1d), and
``(loop)/(step)``, the loop's efficiency (1.0: the input costs the step nothing). Medians
of interleaved repeats.

Datasets:
  mnist1d       the default config's data (``configs/mnist1d_large_batch.py``: in-memory
                split, CNN, batch 1024);
  cifar_shaped  50,000 random 32x32x3 uint8 images with labels, written once as a TFDS
                array_record dataset in ``--data_dir`` (raw tensors; TFDS's PNG Image
                feature needs TensorFlow), read by random access, deserialised,
                flipped, padded and cropped, normalised;
                ResNet-18 with sync BN at batch ``--cifar_batch``.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mnist1d", "cifar_shaped"], "Datasets to measure.")
flags.DEFINE_integer("steps", 100, "Batches timed per pipeline measurement.")
flags.DEFINE_integer("repeats", 3, "Interleaved repeats of each measurement (medians).")
flags.DEFINE_integer("cifar_batch", 256, "Global batch for cifar_shaped.")
flags.DEFINE_integer("cifar_step_batches", 3, "Train steps timed per repeat for cifar_shaped.")
flags.DEFINE_string("data_dir", "/tmp/effjax_bench_data", "Where cifar_shaped is written.")


def _cifar_shaped_builder(data_dir):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CifarShaped(tfds.core.GeneratorBasedBuilder):
    """Random images shaped like cifar10's (32x32x3 uint8, 10 labels)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          # Raw uint8 tensors: TFDS's Image feature needs TensorFlow to encode PNGs.
          "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(50_000, 0),
              "test": self._generate_examples(10_000, 1)}

    def _generate_examples(self, n, seed):  # pylint: disable=arguments-differ
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                  "label": int(rng.integers(10))}

  builder = CifarShaped(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder


def _setup(name):
  """(config, train source, train preprocess fn) for a dataset name."""
  from effjax import data as data_lib, trainer  # pylint: disable=g-import-not-at-top
  from effjax.config import base_config, derive  # pylint: disable=g-import-not-at-top
  if name == "mnist1d":
    sys.path.insert(0, "configs")
    import mnist1d_large_batch  # pylint: disable=g-import-not-at-top
    config = mnist1d_large_batch.get_config()
    setup = trainer.build(config)
    pre, _ = trainer.preprocess_fns(config, setup.spec)
    return config, setup.train_source, pre
  if name == "cifar_shaped":
    c = base_config()
    c.dataset.name = "cifar10"
    c.dataset.num_train_examples = 50_000
    c.model.name = "resnet18"
    c.model.norm = "sync_batch"
    c.batch_size = c.eval_batch_size = FLAGS.cifar_batch
    c.optimizer.name = "lars"
    config = derive(c)
    spec = data_lib.get_spec("cifar10")
    builder = _cifar_shaped_builder(FLAGS.data_dir)
    source = data_lib.load_split(builder, "train", spec)
    pre, _ = trainer.preprocess_fns(config, spec)
    return config, source, pre
  raise ValueError(f"--datasets: {name!r} is not one of ('mnist1d', 'cifar_shaped')")


def measure(name):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib, trainer  # pylint: disable=g-import-not-at-top

  config, source, pre = _setup(name)
  setup = trainer.build(config, with_data=False)
  runner = setup.runner
  make = lambda: data_lib.train_dataset(
      source, pre, global_batch_size=config.batch_size, seed=0,
      num_threads=config.input.num_threads, prefetch_buffer_size=config.input.host_prefetch,
      num_workers=config.input.num_workers)
  fn = runner.compile(trainer.make_train_step(config))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  it = iter(make())
  batch = runner.shard_batch(next(it))
  state, m = fn(state, batch)  # Compile.
  jax.block_until_ready(m)
  n_pipe = FLAGS.steps
  n_step = FLAGS.steps if name == "mnist1d" else FLAGS.cifar_step_batches

  def time_pipeline():
    t = time.perf_counter()
    for _ in range(n_pipe):
      next(it)
    return n_pipe * config.batch_size / (time.perf_counter() - t)

  def time_step():
    nonlocal state
    t = time.perf_counter()
    for _ in range(n_step):
      state, m = fn(state, batch)
    jax.block_until_ready(m)
    return n_step * config.batch_size / (time.perf_counter() - t)

  def time_loop():
    nonlocal state
    prefetcher = data_lib.Prefetcher(iter(make()), runner.shard_batch,
                                     config.input.device_prefetch)
    next(prefetcher)
    t = time.perf_counter()
    for _ in range(n_step):
      b, _ = next(prefetcher)
      state, m = fn(state, b)
    jax.block_until_ready(m)
    rate = n_step * config.batch_size / (time.perf_counter() - t)
    prefetcher.close()
    return rate

  results = {"pipeline": [], "step": [], "loop": []}
  for _ in range(FLAGS.repeats):
    results["pipeline"].append(time_pipeline())
    results["step"].append(time_step())
    results["loop"].append(time_loop())
  pipeline, step, loop = (float(np.median(results[k])) for k in ("pipeline", "step", "loop"))
  print(f"\n{name}: dataset={config.dataset.name} batch={config.batch_size} "
        f"model={config.model.name} devices={runner.num_devices} "
        f"augment={config.input.augment} threads={config.input.num_threads} "
        f"repeats={FLAGS.repeats}")
  print(f"input pipeline alone:        {pipeline:12.0f} examples/s")
  print(f"train step (data on device): {step:12.0f} examples/s")
  print(f"full loop (pipeline + step): {loop:12.0f} examples/s")
  print(f"(pipeline)/(step) {pipeline / step:.2f}")
  print(f"(loop)/(step) {loop / step:.3f}")
  return pipeline, step, loop


def main(_):
  logging.set_verbosity(logging.WARNING)
  rows = [(name,) + measure(name) for name in FLAGS.datasets]
  print("\n| dataset | pipeline ex/s | step ex/s | loop ex/s | (pipeline)/(step) | (loop)/(step) |")
  print("|---|---|---|---|---|---|")
  for name, p, s, l in rows:
    print(f"| {name} | {p:.0f} | {s:.0f} | {l:.0f} | {p / s:.2f} | {l / s:.3f} |")


if __name__ == "__main__":
  app.run(main)
