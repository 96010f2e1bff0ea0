r"""Input pipeline throughput against the train step's consumption, side by side.

  python benchmarks/input_pipeline.py --config=configs/mnist1d_large_batch.py --steps=200

Prints (1) examples/s of the input pipeline alone (grain stream, preprocessing included,
per-process batches on the host), (2) examples/s the compiled train step consumes with
batches already on the devices, (3) examples/s of the real loop (pipeline + device
prefetch + step), and the ratios (1)/(2), the pipeline's headroom over the step, and (3)/(2), the
loop's efficiency (1.0 means the input costs the step nothing). Medians of interleaved repeats.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/mnist1d_large_batch.py", "Config file.")
flags.DEFINE_integer("steps", 200, "Batches timed for each measurement.")
flags.DEFINE_integer("repeats", 3, "Interleaved repeats of each measurement (medians).")


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from effjax import data as data_lib, trainer  # pylint: disable=g-import-not-at-top

  config, n = FLAGS.config, FLAGS.steps
  setup = trainer.build(config)
  runner = setup.runner
  pre, _ = trainer.preprocess_fns(config, setup.spec)
  make = lambda: data_lib.train_dataset(
      setup.train_source, pre, global_batch_size=config.batch_size, seed=0,
      num_threads=config.input.num_threads, prefetch_buffer_size=config.input.host_prefetch,
      num_workers=config.input.num_workers)

  fn = runner.compile(trainer.make_train_step(config))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  it = iter(make())
  batch = runner.shard_batch(next(it))
  state, m = fn(state, batch)  # Compile.
  jax.block_until_ready(m)

  def time_pipeline():
    t = time.perf_counter()
    for _ in range(n):
      next(it)
    return n * config.batch_size / (time.perf_counter() - t)

  def time_step():
    nonlocal state
    t = time.perf_counter()
    for _ in range(n):
      state, m = fn(state, batch)
    jax.block_until_ready(m)
    return n * config.batch_size / (time.perf_counter() - t)

  def time_loop():
    nonlocal state
    prefetcher = data_lib.Prefetcher(iter(make()), runner.shard_batch,
                                     config.input.device_prefetch)
    next(prefetcher)
    t = time.perf_counter()
    for _ in range(n):
      b, _ = next(prefetcher)
      state, m = fn(state, b)
    jax.block_until_ready(m)
    rate = n * config.batch_size / (time.perf_counter() - t)
    prefetcher.close()
    return rate

  # Interleaved repeats, medians: on a shared 2-core machine single timings are noisy.
  results = {"pipeline": [], "step": [], "loop": []}
  for _ in range(FLAGS.repeats):
    results["pipeline"].append(time_pipeline())
    results["step"].append(time_step())
    results["loop"].append(time_loop())
  pipeline, step, loop = (float(np.median(results[k])) for k in ("pipeline", "step", "loop"))

  print(f"config: dataset={config.dataset.name} batch={config.batch_size} "
        f"model={config.model.name} devices={runner.num_devices} steps={n} "
        f"repeats={FLAGS.repeats}")
  print(f"input pipeline alone:        {pipeline:12.0f} examples/s")
  print(f"train step (data on device): {step:12.0f} examples/s")
  print(f"full loop (pipeline + step): {loop:12.0f} examples/s")
  print(f"(pipeline)/(step) {pipeline / step:.2f}")
  print(f"(loop)/(step) {loop / step:.3f}")


if __name__ == "__main__":
  app.run(main)
