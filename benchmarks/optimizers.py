r"""One jitted, donated optimizer update: effjax vs optax, against the memory-bandwidth floor.

  python benchmarks/optimizers.py [--trees=resnet50,bert_base] [--repeats=10]

For each parameter tree (ResNet-50: 25.6M parameters in 161 tensors; BERT-base: 110M in
199), it times ``(params, state, grads) -> (params, state)`` jitted with params and
state donated, for effjax.lars / optax.lars and effjax.lamb / optax.lamb. Both sides use
the same maths: every parameter gets weight decay and the trust ratio.

The floor is the memory-bandwidth bound: the bytes an update must move (LARS reads w, g,
m and writes w, m; LAMB reads w, g, m, v and writes w, m, v), divided by the bandwidth of
a fused, donated elementwise triad ``x <- x + 0.5 * y`` over a buffer of the same size,
measured in the same run. The script prints medians, and each time as a multiple of its
floor.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("trees", ["resnet50", "bert_base"], "Parameter trees to time.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median reported).")


def resnet50_shapes():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from effjax import models  # pylint: disable=g-import-not-at-top
  v = jax.eval_shape(lambda: models.resnet50(1000).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return [x.shape for x in jax.tree.leaves(v["params"])]


def bert_base_shapes(layers=12, d=768, ff=3072, vocab=30522, pos=512):
  shapes = [(vocab, d), (pos, d), (2, d), (d,), (d,)]           # Embeddings + LayerNorm.
  for _ in range(layers):
    shapes += [(d, d), (d,)] * 4                                  # Q, K, V, output.
    shapes += [(d,), (d,)]                                        # LayerNorm.
    shapes += [(d, ff), (ff,), (ff, d), (d,)]                     # Feed-forward.
    shapes += [(d,), (d,)]                                        # LayerNorm.
  shapes += [(d, d), (d,)]                                        # Pooler.
  return shapes


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from effjax import optim  # pylint: disable=g-import-not-at-top

  def make_tree(shapes, seed):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {f"p{i:03d}": 0.05 * jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}

  def time_fn(fn, args):
    args = fn(*args)  # Compile and warm up; donated inputs are consumed, outputs reused.
    args = fn(*args)
    jax.block_until_ready(args)
    times = []
    for _ in range(FLAGS.repeats):
      t = time.perf_counter()
      args = fn(*args)
      jax.block_until_ready(args)
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  def opt_step(tx):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, grads
    return jax.jit(step, donate_argnums=(0, 1))

  def bandwidth(n_elems):
    """GB/s of a fused, donated triad over n_elems floats: reads 2, writes 1 per element."""
    x = jnp.ones((n_elems,), jnp.float32)
    y = jnp.ones((n_elems,), jnp.float32)
    triad = jax.jit(lambda x, y: (x + 0.5 * y, y), donate_argnums=(0,))
    t = time_fn(triad, (x, y))
    return 3 * n_elems * 4 / 1e9 / t

  print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, repeats={FLAGS.repeats} (median)")
  rows = []
  for tree_name in FLAGS.trees:
    shapes = {"resnet50": resnet50_shapes, "bert_base": bert_base_shapes}[tree_name]()
    n_params = sum(int(np.prod(s)) for s in shapes)
    grads = make_tree(shapes, 1)
    gbps = bandwidth(n_params)
    for opt in ("lars", "lamb"):
      n_state = 1 if opt == "lars" else 2
      gb = ((2 + n_state) + (1 + n_state)) * n_params * 4 / 1e9
      floor = gb / gbps
      impls = {
          "lars": {"effjax": optim.lars(0.1, weight_decay=1e-4, weight_decay_mask=True,
                                        trust_ratio_mask=True),
                   "optax": optax.lars(0.1, weight_decay=1e-4)},
          "lamb": {"effjax": optim.lamb(1e-3, weight_decay=1e-2, weight_decay_mask=True,
                                        trust_ratio_mask=True),
                   "optax": optax.lamb(1e-3, weight_decay=1e-2)},
      }[opt]
      times = {}
      for impl, tx in impls.items():
        params = make_tree(shapes, 0)
        times[impl] = time_fn(opt_step(tx), (params, tx.init(params), grads))
      rows.append((tree_name, opt, len(shapes), n_params, gb, floor, times))
      print(f"{tree_name:9s} {opt}: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
            f"{gb:.2f} GB moved; floor {floor * 1e3:.1f} ms (triad {gbps:.1f} GB/s); "
            + "; ".join(f"{k} {v * 1e3:.1f} ms = {v / floor:.2f}x floor" for k, v in times.items()))
  print()
  print(f"| tree | optimizer | floor (ms) | effjax (ms) | optax (ms) | effjax/floor | "
        f"optax/floor | effjax/optax |")
  print("|---|---|---|---|---|---|---|---|")
  for tree_name, opt, _, _, _, floor, t in rows:
    print(f"| {tree_name} | {opt} | {floor * 1e3:.1f} | {t['effjax'] * 1e3:.1f} | "
          f"{t['optax'] * 1e3:.1f} | {t['effjax'] / floor:.2f} | {t['optax'] / floor:.2f} | "
          f"{t['effjax'] / t['optax']:.2f} |")
  for tree_name, opt, _, _, _, floor, t in rows:
    print(f"({tree_name} effjax.{opt})/(floor) {t['effjax'] / floor:.3f}")
    print(f"({tree_name} effjax.{opt})/(optax.{opt}) {t['effjax'] / t['optax']:.3f}")


if __name__ == "__main__":
  app.run(main)
