r"""How cost grows with work: step time against global batch, optimizer time against size.

  python benchmarks/scaling.py --out=docs

Writes ``scaling.csv`` and ``scaling.png`` to ``--out`` and prints three tables:

1. **Per-device work fixed** (weak scaling): effjax's full train step (mnist1d CNN, sync
   BN, LARS, noise scale from 2 devices) with ``--per_device`` examples per device on
   1, 2, 4, 8 devices. Ideal: flat on real devices. On simulated CPU devices that share
   the host's cores, time grows with the total work instead; the column
   ``us/example`` shows whether the per-example cost stays flat.
2. **Per-device work growing**: the same step on all devices with the global batch
   doubling. Ideal: time proportional to batch once fixed costs (the optimizer update,
   collectives, dispatch) are amortised; ``us/example`` falls toward that floor.
3. **Optimizer time against parameter count**: one jitted, donated update of effjax's
   LARS and ``optax.lars`` on ResNet-shaped parameter trees of growing width, with the
   fit ``t = t0 + N * c``: the fixed cost and the cost per parameter.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer("per_device", 64, "Examples per device for the weak-scaling curve.")
flags.DEFINE_list("batches", ["64", "128", "256", "512", "1024", "2048"],
                  "Global batches for the growing-work curve (all devices).")
flags.DEFINE_list("widths", ["8", "16", "32", "64", "128"],
                  "ResNet-18 base widths for the optimizer curve.")
flags.DEFINE_integer("steps", 10, "Steps per timing.")
flags.DEFINE_integer("repeats", 3, "Repeats (medians).")
flags.DEFINE_string("out", "docs", "Where scaling.csv and scaling.png go.")


def _step_time(config, devices, batch):
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.common import compiled_step, time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax.grid import with_overrides  # pylint: disable=g-import-not-at-top
  from effjax.parallel import Runner, make_mesh  # pylint: disable=g-import-not-at-top
  config = with_overrides(config, {"batch_size": batch, "eval_batch_size": batch,
                                   "noise_scale.enabled": devices > 1})
  run = compiled_step(config, Runner("shard_map", make_mesh(jax.devices()[:devices])))
  return time_interleaved({"step": run}, FLAGS.steps, FLAGS.repeats)["step"]


def _optimizer_times(width):
  """(num params, effjax LARS seconds, optax.lars seconds) for one update."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from effjax import models, optim  # pylint: disable=g-import-not-at-top
  model = models.ResNet(10, (2, 2, 2, 2), "basic", tuple(width * m for m in (1, 2, 4, 8)),
                        cifar_stem=True)
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0))
  params = params["params"]
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  out = []
  for tx in (optim.lars(0.1, weight_decay=5e-4, weight_decay_mask=True, trust_ratio_mask=True),
             optax.lars(0.1, weight_decay=5e-4)):
    def update(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    fn = jax.jit(update, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    p, s = fn(p, s, grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(FLAGS.repeats):
      t = time.perf_counter()
      for _ in range(FLAGS.steps):
        p, s = fn(p, s, grads)
      jax.block_until_ready(p)
      times.append((time.perf_counter() - t) / FLAGS.steps)
    out.append(float(np.median(times)))
  return n, out[0], out[1]


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, "configs")
  import mnist1d_large_batch  # pylint: disable=g-import-not-at-top
  config = mnist1d_large_batch.get_config()
  config.model.norm = "sync_batch"
  n_dev = len(jax.devices())
  print(f"backend={jax.default_backend()} devices={n_dev} steps={FLAGS.steps} "
        f"repeats={FLAGS.repeats}")
  rows = []

  print(f"\n1. per-device work fixed ({FLAGS.per_device} examples/device), mnist1d CNN")
  print("| devices | global batch | ms/step | us/example |\n|---|---|---|---|")
  d = 1
  while d <= n_dev:
    b = FLAGS.per_device * d
    t = _step_time(config, d, b)
    rows.append(("weak", d, b, t))
    print(f"| {d} | {b} | {t * 1e3:.2f} | {t / b * 1e6:.2f} |")
    d *= 2

  print(f"\n2. per-device work growing ({n_dev} devices), mnist1d CNN")
  print("| global batch | per device | ms/step | us/example |\n|---|---|---|---|")
  for b in (int(x) for x in FLAGS.batches):
    t = _step_time(config, n_dev, b)
    rows.append(("strong", n_dev, b, t))
    print(f"| {b} | {b // n_dev} | {t * 1e3:.2f} | {t / b * 1e6:.2f} |")

  print("\n3. optimizer update against parameter count (one device, ResNet-18 trees)")
  print("| width | parameters | effjax lars ms | optax.lars ms | effjax/optax |\n|---|---|---|---|---|")
  opt = []
  for w in (int(x) for x in FLAGS.widths):
    n, te, to = _optimizer_times(w)
    opt.append((n, te, to))
    rows.append(("optimizer", w, n, te))
    rows.append(("optimizer_optax", w, n, to))
    print(f"| {w} | {n:,} | {te * 1e3:.3f} | {to * 1e3:.3f} | {te / to:.2f} |")
  ns = np.array([o[0] for o in opt], float)
  for label, col in (("effjax lars", 1), ("optax.lars", 2)):
    c, t0 = np.polyfit(ns, np.array([o[col] for o in opt]), 1)
    print(f"fit {label}: t = {t0 * 1e3:.3f} ms + N x {c * 1e9:.3f} ns")

  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "scaling.csv"), "w", encoding="utf-8") as f:
    f.write("curve,devices_or_width,batch_or_params,seconds\n")
    for r in rows:
      f.write(",".join(str(x) for x in r) + "\n")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(1, 3, figsize=(15, 4))
  weak = [r for r in rows if r[0] == "weak"]
  ax[0].plot([r[1] for r in weak], [r[3] * 1e3 for r in weak], "o-")
  ax[0].set(xscale="log", xlabel="devices (per-device batch fixed)", ylabel="ms/step",
            title=f"{FLAGS.per_device} examples per device")
  strong = [r for r in rows if r[0] == "strong"]
  ax[1].plot([r[2] for r in strong], [r[3] * 1e3 for r in strong], "o-")
  ax[1].set(xscale="log", yscale="log", xlabel=f"global batch ({n_dev} devices)",
            ylabel="ms/step", title="per-device batch growing")
  ax[2].plot(ns, [o[1] * 1e3 for o in opt], "o-", label="effjax lars")
  ax[2].plot(ns, [o[2] * 1e3 for o in opt], "s--", label="optax.lars")
  ax[2].set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms/update",
            title="optimizer update")
  ax[2].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, "scaling.png"), dpi=100)
  print(f"\nwrote {FLAGS.out}/scaling.csv and {FLAGS.out}/scaling.png")


if __name__ == "__main__":
  app.run(main)
