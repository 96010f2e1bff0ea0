r"""One jitted, donated optimizer update: effjax vs optax, against an honest memory floor.

  python benchmarks/optimizers.py [--trees=resnet50,bert_base] [--repeats=20]

For each parameter tree (ResNet-50: 25.6M parameters in 161 tensors; BERT-base: 110M in
199), it times ``(params, state, grads) -> (params, state)`` jitted with params and
state donated, for effjax.lars / optax.lars and effjax.lamb / optax.lamb. Both sides use
the same maths: every parameter gets weight decay and the trust ratio.

The floor is a lower bound measured on the same tree and dtype with the same donation:
the bytes the update must move (LARS reads w, g, m and writes w, m; LAMB reads w, g, m,
v and writes w, m, v) divided by the bandwidth of a fused, donated elementwise pass
``x <- x + 0.5 * y`` (read 2 arrays, write 1) over the same tree, and over one flat
buffer of the same size; the faster of the two. A ratio below 0.95 means the floor is
not a floor, and is printed as BROKEN FLOOR, not as a result.

It also reads the optimized HLO of each update and counts, on the largest tensor, the
kernels (fusions) that read or write arrays of its size, and their reads and writes:
the passes over memory, against one fused pass's minimum. Prints medians, each time as a
multiple of its floor, and ``(tree impl)/(floor) X`` lines.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("trees", ["resnet50", "bert_base"], "Parameter trees to time.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (median reported).")


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


def hlo_passes(compiled, shape) -> tuple[int, int, int]:
  """``(kernels, reads, writes)`` of arrays of ``shape`` in the entry computation of a
  compiled function's optimized HLO: each fusion (or other op) that reads or writes one
  is a pass over memory."""
  import re  # pylint: disable=g-import-not-at-top
  txt = compiled.as_text()
  entry = txt[txt.index("\nENTRY"):]
  dims = ",".join(map(str, shape))
  big = re.compile(r"f32\[" + re.escape(dims) + r"\]")
  shapes, kernels, reads, writes = {}, 0, 0, 0
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+(?: \S+)*?) ([a-z-]+)\((.*?)\)", line)
    if not m:
      continue
    name, out, op, operands = m.groups()
    shapes[name] = bool(big.match(out))
    if op in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
      continue
    r = sum(shapes.get(o.strip().lstrip("%"), False) for o in operands.split(","))
    w = int(bool(big.match(out)))
    if r or w:
      kernels, reads, writes = kernels + 1, reads + r, writes + w
  return kernels, reads, writes


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
    # grads donated too, so that returning them (to call again) copies nothing.
    return jax.jit(step, donate_argnums=(0, 1, 2))

  def bandwidth(shapes, n_elems):
    """GB/s of a fused, donated pass ``x <- x + 0.5 * y`` (reads 2, writes 1 per
    element): over the parameter tree itself, and over one flat buffer; the faster."""
    # Both inputs donated: y comes back in its own buffer, not as a copy.
    tree_pass = jax.jit(lambda x, y: (jax.tree.map(lambda a, b: a + 0.5 * b, x, y), y),
                        donate_argnums=(0, 1))
    t_tree = time_fn(tree_pass, (make_tree(shapes, 2), make_tree(shapes, 3)))
    flat_pass = jax.jit(lambda x, y: (x + 0.5 * y, y), donate_argnums=(0, 1))
    t_flat = time_fn(flat_pass, (jnp.ones((n_elems,), jnp.float32),
                                 jnp.ones((n_elems,), jnp.float32)))
    gbps = lambda t: 3 * n_elems * 4 / 1e9 / t
    return max(gbps(t_tree), gbps(t_flat)), gbps(t_tree), gbps(t_flat)

  print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, repeats={FLAGS.repeats} (median)")
  rows = []
  for tree_name in FLAGS.trees:
    shapes = {"resnet50": resnet50_shapes, "bert_base": bert_base_shapes}[tree_name]()
    n_params = sum(int(np.prod(s)) for s in shapes)
    grads = make_tree(shapes, 1)
    gbps, tree_gbps, flat_gbps = bandwidth(shapes, n_params)
    largest = tuple(max(shapes, key=lambda s: int(np.prod(s))))
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
      times, passes = {}, {}
      for impl, tx in impls.items():
        params = make_tree(shapes, 0)
        fn = opt_step(tx)
        k, r, w = hlo_passes(fn.lower(params, tx.init(params), grads).compile(), largest)
        same = sum(tuple(x) == tuple(largest) for x in shapes)  # Tensors of that shape.
        passes[impl] = (k / same, r / same, w / same)
        times[impl] = time_fn(fn, (params, tx.init(params), make_tree(shapes, 1)))
      rows.append((tree_name, opt, len(shapes), n_params, gb, floor, times))
      print(f"{tree_name:9s} {opt}: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
            f"{gb:.2f} GB moved; floor {floor * 1e3:.1f} ms (fused pass: tree "
            f"{tree_gbps:.1f} GB/s, flat {flat_gbps:.1f} GB/s)")
      for impl, (k, r, w) in passes.items():
        k, r, w = (f"{v:g}" for v in (k, r, w))
        t = times[impl]
        flag = "  BROKEN FLOOR (ratio < 0.95)" if t / floor < 0.95 else ""
        print(f"  {impl:6s} {t * 1e3:7.1f} ms = {t / floor:.2f}x floor; largest tensor "
              f"{list(largest)}: {k} kernels, {r} reads + {w} writes (one fused pass: "
              f"{2 + n_state} reads + {1 + n_state} writes){flag}")
  print()
  print(f"| tree | optimizer | floor (ms) | effjax (ms) | optax (ms) | effjax/floor | "
        f"optax/floor | effjax/optax |")
  print("|---|---|---|---|---|---|---|---|")
  for tree_name, opt, _, _, _, floor, t in rows:
    print(f"| {tree_name} | {opt} | {floor * 1e3:.1f} | {t['effjax'] * 1e3:.1f} | "
          f"{t['optax'] * 1e3:.1f} | {t['effjax'] / floor:.2f} | {t['optax'] / floor:.2f} | "
          f"{t['effjax'] / t['optax']:.2f} |")
  for tree_name, opt, _, _, _, floor, t in rows:
    for impl in ("effjax", "optax"):
      ratio = t[impl] / floor
      print(f"({tree_name} {impl}.{opt})/(floor) {ratio:.3f}"
            + ("  BROKEN FLOOR" if ratio < 0.95 else ""))


if __name__ == "__main__":
  app.run(main)
