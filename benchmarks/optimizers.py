r"""One jitted, donated optimizer update: effjax vs optax, against an honest memory floor.

  python benchmarks/optimizers.py [--trees=resnet50,bert_base] [--repeats=20]

For each parameter tree (ResNet-50: 25.6M parameters in 161 tensors; BERT-base: 110M in
199), it times the update ``(params, state, grads) -> (params, state)`` for effjax.lars /
optax.lars and effjax.lamb / optax.lamb, ``--inner`` updates in a ``fori_loop`` inside
one jitted call with params and state donated: the device's time per update, as inside
a train step, without the host's per-call dispatch of the tree's hundreds of arrays.
Both sides use the same maths: every parameter gets weight decay and the trust ratio.

The floor is a lower bound measured on the same tree and dtype, in the same loop:
the bytes the update must move (LARS reads w, g, m and writes w, m; LAMB reads w, g, m,
v and writes w, m, v) divided by the bandwidth of a fused, donated elementwise pass
``x <- x + 0.5 * y`` (read 2 arrays, write 1) over the same tree, and over one flat
buffer of the same size; the faster of the two. A ratio below 0.95 means the floor is
not a floor, and is printed as BROKEN FLOOR, not as a result.

It also reads the optimized HLO of each update and counts, on the largest tensor, the
kernels (fusions) that read or write arrays of its size, and their reads and writes:
the passes over memory, against one fused pass's minimum; and the kernels of the whole
update (on a GPU, each is a launch: with many small tensors, their number bounds the
time as much as the bytes do). Prints medians, each time as a
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
flags.DEFINE_integer("inner", 10, "Updates (or floor passes) per timed call, in one jit.")
flags.DEFINE_bool("pool_host_memory", True, "Pool the host allocator's large blocks "
                  "(effjax.distributed.pool_host_memory), as GPU and TPU runtimes pool "
                  "theirs; off, XLA:CPU faults each call's temporaries in anew.")


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


def hlo_passes(compiled, shape) -> tuple[int, int, int, int]:
  """``(kernels, reads, writes, all kernels)``: the kernels that read or write arrays of
  ``shape`` in the entry computation of a compiled function's optimized HLO (each is a
  pass over memory), their reads and writes, and the entry's kernels in all."""
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
    # Operands from the sixth on carry an ``/*index=5*/`` comment.
    operands = re.sub(r"/\*.*?\*/", "", operands)
    r = sum(shapes.get(o.strip().lstrip("%"), False) for o in operands.split(","))
    w = int(bool(big.match(out)))
    if r or w:
      kernels, reads, writes = kernels + 1, reads + r, writes + w
  total = sum(1 for line in entry.splitlines()
              if re.search(r" (fusion|custom-call|copy|reduce|add|multiply)\(", line))
  return kernels, reads, writes, total


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from benchmarks.common import time_interleaved  # pylint: disable=g-import-not-at-top
  from effjax import distributed, optim  # pylint: disable=g-import-not-at-top

  pooled = FLAGS.pool_host_memory and distributed.pool_host_memory()

  def make_tree(shapes, seed):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {f"p{i:03d}": 0.05 * jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}

  def loop(body, carry, extra):
    """A run for ``benchmarks.common.time_interleaved``: ``carry <- body(carry, extra)``
    ``--inner`` times inside one jitted, donated call, compiled and warmed up. Timed per
    call, it is the device's time for the work, without the host's per-call dispatch of
    hundreds of arrays (on an H100 that dispatch took 2-10 ms per call, 2-6 times the
    update itself). ``extra`` (the gradients) is the same in every iteration; XLA may
    hoist work that reads only it, but no update timed here makes a pass over the
    gradients alone (every norm and moment also reads the parameters or the state), so
    hoisting cannot save bytes."""
    inner = jax.jit(lambda c, e: jax.lax.fori_loop(0, FLAGS.inner, lambda _, c: body(c, e), c),
                    donate_argnums=(0,))
    call = lambda c, e: (inner(c, e), ())
    carry, _ = call(carry, extra)
    jax.block_until_ready(carry)
    return [call, carry, extra, []]

  def opt_step(tx):
    def step(carry, grads):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return step

  def floor_runs(shapes, n_elems):
    """The fused pass ``x <- x + 0.5 * y`` (reads 2, writes 1 per element) in the same
    loop as the updates: over the parameter tree itself, and over one flat buffer."""
    return {"pass_tree": loop(lambda x, y: jax.tree.map(lambda a, b: a + 0.5 * b, x, y),
                              make_tree(shapes, 2), make_tree(shapes, 3)),
            "pass_flat": loop(lambda x, y: x + 0.5 * y, jnp.ones((n_elems,), jnp.float32),
                              jax.random.normal(jax.random.key(4), (n_elems,)))}

  print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, {FLAGS.inner} per call x {FLAGS.repeats} calls (median), "
        f"pooled host memory={pooled}")
  rows = []
  optimizers = {
      "lars": {"effjax": optim.lars(0.1, weight_decay=1e-4, weight_decay_mask=True,
                                    trust_ratio_mask=True),
               "optax": optax.lars(0.1, weight_decay=1e-4)},
      "lamb": {"effjax": optim.lamb(1e-3, weight_decay=1e-2, weight_decay_mask=True,
                                    trust_ratio_mask=True),
               "optax": optax.lamb(1e-3, weight_decay=1e-2)},
  }
  for tree_name in FLAGS.trees:
    shapes = {"resnet50": resnet50_shapes, "bert_base": bert_base_shapes}[tree_name]()
    n_params = sum(int(np.prod(s)) for s in shapes)
    grads = make_tree(shapes, 1)
    largest = tuple(max(shapes, key=lambda s: int(np.prod(s))))
    same = sum(tuple(x) == tuple(largest) for x in shapes)  # Tensors of that shape.
    runs, passes = floor_runs(shapes, n_params), {}
    for opt, impls in optimizers.items():
      for impl, tx in impls.items():
        params = make_tree(shapes, 0)
        step = opt_step(tx)
        k, r, w, total = hlo_passes(jax.jit(step, donate_argnums=(0,)).lower(
            (params, tx.init(params)), grads).compile(), largest)
        passes[(opt, impl)] = (k / same, r / same, w / same, total)
        runs[(opt, impl)] = loop(step, (params, tx.init(params)), grads)
    # Interleaved in every repeat, so that this machine's drift (the fused pass gave
    # 28-60 GB/s in runs an hour apart) hits the floor and the updates alike.
    times = {k: t / FLAGS.inner
             for k, t in time_interleaved(runs, steps=1, repeats=FLAGS.repeats).items()}
    gbps = {k: 3 * n_params * 4 / 1e9 / times[k] for k in ("pass_tree", "pass_flat")}
    for opt in optimizers:
      n_state = 1 if opt == "lars" else 2
      gb = ((2 + n_state) + (1 + n_state)) * n_params * 4 / 1e9
      floor = gb / max(gbps.values())
      t = {impl: times[(opt, impl)] for impl in optimizers[opt]}
      rows.append((tree_name, opt, len(shapes), n_params, gb, floor, t))
      print(f"{tree_name:9s} {opt}: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
            f"{gb:.2f} GB moved; floor {floor * 1e3:.2f} ms (fused pass: tree "
            f"{gbps['pass_tree']:.1f} GB/s, flat {gbps['pass_flat']:.1f} GB/s)")
      for impl in optimizers[opt]:
        k, r, w, total = passes[(opt, impl)]
        k, r, w = (f"{v:g}" for v in (k, r, w))
        flag = "  BROKEN FLOOR (ratio < 0.95)" if t[impl] / floor < 0.95 else ""
        print(f"  {impl:6s} {t[impl] * 1e3:7.2f} ms = {t[impl] / floor:.2f}x floor; largest "
              f"tensor {list(largest)}: {k} kernels, {r} reads + {w} writes (one fused pass: "
              f"{2 + n_state} reads + {1 + n_state} writes); {total} kernels in all{flag}")
    del runs
  print()
  print(f"| tree | optimizer | floor (ms) | effjax (ms) | optax (ms) | effjax/floor | "
        f"optax/floor | effjax/optax |")
  print("|---|---|---|---|---|---|---|---|")
  for tree_name, opt, _, _, _, floor, t in rows:
    print(f"| {tree_name} | {opt} | {floor * 1e3:.2f} | {t['effjax'] * 1e3:.2f} | "
          f"{t['optax'] * 1e3:.2f} | {t['effjax'] / floor:.2f} | {t['optax'] / floor:.2f} | "
          f"{t['effjax'] / t['optax']:.2f} |")
  for tree_name, opt, _, _, _, floor, t in rows:
    for impl in ("effjax", "optax"):
      ratio = t[impl] / floor
      print(f"({tree_name} {impl}.{opt})/(floor) {ratio:.3f}"
            + ("  BROKEN FLOOR" if ratio < 0.95 else ""))


if __name__ == "__main__":
  app.run(main)
