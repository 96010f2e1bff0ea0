"""The LM: packing, the loss against numpy, shard_map vs pmap vs one device, stacked layers,
dropout and batch warmup across a resume, and the python_stdlib dataset."""

import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import data, models, optim, steps, tasks, trainer
from effjax.data import text
from effjax.parallel import Runner
from helpers import assert_trees_close, lm_config

SEQ = 32


def _model(**kw):
  base = dict(vocab_size=text.VOCAB_SIZE, max_len=SEQ, width=32, num_layers=2, num_heads=2)
  return models.DecoderLM(**{**base, **kw})


@pytest.fixture(scope="module")
def lm_params():
  model = _model()
  v = tasks.LanguageModelTask().init_variables(model, jax.random.key(0), (SEQ,))
  return model, v


def _nll(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_packing_is_exact_each_document_scores_as_if_alone(lm_params):
  model, v = lm_params
  docs = [b"def f(x): x", b"import os", b"a = 1"]  # 12 + 10 + 6 tokens with BOS.
  packed = text.PackedSource(text.encode(docs), SEQ, pad_tail=True)
  assert len(packed) == 1
  batch = packed.gather([0])
  # Index arithmetic: the inputs are the stream itself, and each document restarts.
  np.testing.assert_array_equal(batch["inputs"][0, :12], text.encode(docs[:1]))
  np.testing.assert_array_equal(np.unique(batch["segment_ids"][0]), [0, 1, 2, 3])
  assert batch["positions"][0, 12] == 0 and batch["positions"][0, 22] == 0
  assert batch["positions"][0, 21] == 9
  logits = model.apply(v, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"])
  packed_nll = _nll(logits, batch["targets"])[0]
  start = 0
  for doc in docs:
    alone = text.PackedSource(text.encode([doc]), SEQ, pad_tail=True).gather([0])
    n = len(doc)  # BOS predicts byte 1, ..., byte n-1 predicts byte n.
    out = model.apply(v, alone["inputs"], segment_ids=alone["segment_ids"],
                      positions=alone["positions"])
    np.testing.assert_allclose(packed_nll[start:start + n], _nll(out, alone["targets"])[0, :n],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch["weights"][0, start:start + n], 1.0)
    if start + n < SEQ:  # The last byte's target is the next document's BOS: not scored.
      assert batch["weights"][0, start + n] == 0.0
    start += n + 1
  # Without segment ids the second document attends to the first: the numbers differ.
  leaky = model.apply(v, batch["inputs"], positions=batch["positions"])
  assert not np.allclose(_nll(leaky, batch["targets"])[0, 12:21], packed_nll[12:21], rtol=1e-3)


def test_lm_loss_equals_numpy_on_a_tiny_batch(lm_params):
  model, v = lm_params
  docs = [bytes(range(40, 90)), b"abc", bytes(range(97, 123))]
  src = text.PackedSource(text.encode(docs), SEQ, pad_tail=True)
  batch = src.gather(np.arange(len(src)))
  out = tasks.LanguageModelTask().loss(model.apply, v, batch, jax.random.key(1))
  logits = np.asarray(model.apply(v, batch["inputs"], segment_ids=batch["segment_ids"],
                                  positions=batch["positions"]))
  # Reference weights straight from the stream: a pair counts iff both tokens exist and
  # no BOS starts a new document at the target.
  stream = text.encode(docs)
  idx = np.arange(len(src))[:, None] * SEQ + np.arange(SEQ)
  ref_w = ((idx + 1 < len(stream)) & (stream[np.minimum(idx + 1, len(stream) - 1)] != text.BOS))
  np.testing.assert_array_equal(batch["weights"], ref_w.astype(np.float32))
  nll = _nll(logits, batch["targets"])
  np.testing.assert_allclose(float(out.weight), ref_w.sum())
  np.testing.assert_allclose(float(out.loss), (nll * ref_w).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["accuracy"]),
                             ((logits.argmax(-1) == batch["targets"]) * ref_w).sum())


def _lm_state(model, tx):
  return steps.create_train_state(jax.random.key(0), model, tx, lambda s: 1e-3, (SEQ,),
                                  task=tasks.LanguageModelTask())


def test_lm_step_equals_under_shard_map_pmap_and_one_device():
  """Dropout on, replicas with different token counts: the step's loss and update are
  those of the mean over all real tokens of the global batch."""
  model = _model(dropout=0.1, num_layers=1)  # The reduction is the point, not the depth.
  tx = optax.adamw(1e-3)
  rng = np.random.default_rng(0)
  docs = [rng.integers(32, 127, size=rng.integers(5, 80)).astype(np.uint8).tobytes()
          for _ in range(40)]
  src = text.PackedSource(text.encode(docs), SEQ, pad_tail=True)
  batch = src.gather(np.arange(16) % len(src))
  batch["weights"][8:] *= (np.arange(SEQ) < 9)  # Replicas 4..7 hold far fewer real tokens.
  step = functools.partial(steps.train_step, task=tasks.LanguageModelTask(), seed=3)
  results = {}
  for mode in ("shard_map", "pmap"):
    runner = Runner(mode)
    fn = runner.compile(step)
    state = _lm_state(model, tx)
    state = state.replace(**runner.replicate(state.items()))
    for _ in range(2):
      state, metrics = fn(state, runner.shard_batch(batch))
    results[mode] = (runner.to_host(metrics), jax.device_get(runner.unreplicate(state).params))
  assert_trees_close(results["pmap"], results["shard_map"], "pmap vs shard_map", rtol=1e-5,
                     atol=1e-7)
  # One device holding the global batch, without dropout (its masks are per replica).
  state = _lm_state(_model(num_layers=1), tx)
  one = Runner("shard_map", jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  eight = Runner("shard_map")
  s1 = state.replace(**one.replicate(state.items()))
  s8 = state.replace(**eight.replicate(state.items()))
  plain = functools.partial(steps.train_step, task=tasks.LanguageModelTask())
  _, m1 = one.compile(plain)(s1, one.shard_batch(batch))
  _, m8 = eight.compile(plain)(s8, eight.shard_batch(batch))
  m1, m8 = one.to_host(m1), eight.to_host(m8)
  for k in ("train/loss", "grad_norm", "update_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
  # The wrong variant, a mean of per-replica means, differs from the global token mean.
  logits = np.asarray(model.apply(state.variables(), batch["inputs"],
                                  segment_ids=batch["segment_ids"],
                                  positions=batch["positions"]))
  nll, w = _nll(logits, batch["targets"]), batch["weights"]
  per_replica = [(nll[i:i + 2] * w[i:i + 2]).sum() / w[i:i + 2].sum() for i in range(0, 16, 2)]
  np.testing.assert_allclose(m1["train/loss"], (nll * w).sum() / w.sum(), rtol=1e-5)
  assert abs(np.mean(per_replica) - m1["train/loss"]) > 1e-3


def test_scanned_layers_equal_unrolled_and_lamb_takes_one_ratio_per_layer(lm_params):
  model, v = lm_params
  scanned = _model(scan_layers=True)
  # Jitted, not op by op: each eager op compiles on its own (hundreds of compiles).
  update = lambda tx, g, p: jax.jit(tx.update)(g, jax.jit(tx.init)(p), p)
  stacked = models.stack_layers(v["params"], 2)
  assert jax.tree.structure(stacked) == jax.tree.structure(jax.eval_shape(
      lambda: scanned.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32)))["params"])
  x = jnp.asarray(np.random.default_rng(0).integers(2, 200, (2, SEQ)), jnp.int32)
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, x),
                             jax.jit(model.apply)(v, x), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2) * 1e-4))(
      v["params"])
  for name in ("lamb", "lars"):
    build = {"lamb": functools.partial(optim.lamb, 1e-2, weight_decay=0.01),
             "lars": functools.partial(optim.lars, 0.1, weight_decay=1e-4)}[name]
    ref_tx, tx = build(), build(stacked=optim.stacked_mask)
    u_ref, _ = update(ref_tx, grads, v["params"])
    u, st = update(tx, models.stack_layers(grads, 2), stacked)
    assert_trees_close(models.unstack_layers(u, 2), u_ref, name, rtol=1e-5, atol=1e-8)
    assert max(np.size(r) for r in optim.trust_ratios(st)) == 2  # One per layer.
    # One ratio over the whole stack (no stacked axis) is a different update.
    u_whole, _ = update(ref_tx, models.stack_layers(grads, 2), stacked)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), u_whole[models.STACKED_NAME],
                        u[models.STACKED_NAME])
    assert max(jax.tree.leaves(diff)) > 1e-6, name
  # From a config: model.scan_layers gives the optimizer the stacked axis, and the default
  # masks count it out (a stacked LayerNorm scale is [L, d]: neither decay nor ratio).
  config = lm_config("unused", **{"optimizer.name": "lamb", "model.scan_layers": True,
                                 "model.num_layers": 2,
                                 "schedule.warmup_epochs": 0.0, "schedule.decay": "constant"})
  tx, _ = optim.create_optimizer(config, 10)
  u_cfg, st = update(tx, models.stack_layers(grads, 2), stacked)
  ref_tx = optim.lamb(config.optimizer.learning_rate, weight_decay=0.1,
                      stacked=optim.stacked_mask)
  assert_trees_close(u_cfg, update(ref_tx, models.stack_layers(grads, 2), stacked)[0],
                     "config", rtol=1e-6)
  masks = optim.default_mask(stacked, optim.stacked_mask)
  assert not masks[models.STACKED_NAME]["norm1"]["scale"]
  assert masks[models.STACKED_NAME]["mlp_in"]["kernel"] and not masks["position"]


def test_python_stdlib_split_is_deterministic_and_recorded(data_dir):
  builder = data.get_builder("python_stdlib", data_dir)
  meta = builder.info.metadata
  assert meta["python_version"] == sys.version.split()[0]
  assert len(meta["content_sha256"]) == 64 and meta["num_files"] > 500
  spec = data.get_spec("python_stdlib")
  train = data.load_split(builder, "train", spec, seq_len=64)
  val = data.load_split(builder, "validation", spec, seq_len=64, train=False)
  n_train, n_val = int((train.stream == text.BOS).sum()), int((val.stream == text.BOS).sum())
  files = text.stdlib_files()
  assert n_val == sum(text.is_validation_file(f) for f in files) > 10
  assert n_train + n_val == meta["num_files"] <= len(files)
  assert len(train.stream) > 8_000_000  # About 10 MB of text.
  decoded = text.decode(val.stream[:5000])
  assert b"def " in decoded or b"import " in decoded
  # Every within-document neighbour pair of the eval stream is scored exactly once.
  total = val.gather(np.arange(len(val)))["weights"].sum()
  assert total == text.pair_counts(val).sum()


def _assert_lr_follows_the_sqrt_rule(config, rows):
  """Each logged LR is the schedule at the base step before the step, times sqrt(m)."""
  schedule = optim.warmup_schedule(config.optimizer.learning_rate, config.num_train_steps,
                                   config.schedule.warmup_steps, config.schedule.decay)
  for r in rows:
    m = r["batch_size"] // config.batch_size
    np.testing.assert_allclose(r["lr"], float(schedule(r["step"] - m)) * math.sqrt(m),
                               rtol=1e-5, err_msg=str(r["step"]))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_lm_with_dropout_and_batch_warmup_resumes_bitwise(data_dir, tmp_path):
  """Killed-and-resumed equals uninterrupted with dropout on, under a batch warmup whose
  batch, LR and data position continue where they were."""
  overrides = {"model.dropout": 0.1, "batch_schedule": "warmup",
               "batch_warmup.final_batch_size": 64, "batch_warmup.tokens": 6 * 16 * 32,
               "log_every": 1, "checkpoint.every_steps": 4}
  config = lm_config(data_dir, **overrides)
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"), verbose=False)
  part = trainer.train_and_evaluate(config, str(tmp_path / "part"), verbose=False,
                                    stop_after=4)
  assert part["stopped"] and part["final_step"] == 5  # The step 3 -> 5 crosses 4.
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "part"), verbose=False)
  assert resumed["eval/loss"] == full["eval/loss"]
  a, b = _rows(tmp_path / "full"), _rows(tmp_path / "part")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for k in ("train/loss", "lr", "batch_size", "param_norm"):
      assert ra[k] == rb[k], (ra["step"], k)
  # The batch doubles 16 -> 32 -> 64 over 6 base batches of tokens (96 examples, two
  # doublings: one per 48 examples, i.e. at base steps 3 and 7), and the LR is the
  # schedule at the base step times sqrt(m) (AdamW's square-root rule).
  assert [(r["step"], r["batch_size"]) for r in a[:6]] == [(1, 16), (2, 16), (3, 16),
                                                           (5, 32), (7, 32), (11, 64)]
  _assert_lr_follows_the_sqrt_rule(config, a)
  assert full["eval/bits_per_byte"] == pytest.approx(full["eval/loss"] / math.log(2))
  assert full["baseline/bigram_bits_per_byte"] > 2 and full["tokens"] == full["examples"] * 32


def test_adaptive_batch_follows_the_lm_noise_scale(data_dir, tmp_path):
  """The noise-scale-driven batch works on the LM task: B_simple (over tokens' gradients,
  per replica) is estimated every step, the batch grows once the estimate has a horizon
  of data, and the LR follows the square-root rule."""
  config = lm_config(data_dir, **{"batch_schedule": "adaptive", "noise_scale.enabled": True,
                                  "noise_scale.decay": 0.5, "adaptive.multiple": 1000.0,
                                  "adaptive.max_batch_size": 64, "log_every": 1})
  summary = trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
  rows = _rows(tmp_path)
  assert all(np.isfinite(r["noise_scale/b_simple"]) for r in rows)
  sizes = [r["batch_size"] for r in rows]
  # The last step is cut to what is left of the 16 base batches (never past the end).
  assert sizes[:2] == [16, 16] and sizes[:-1] == sorted(sizes[:-1]) and max(sizes) == 64
  assert summary["final_batch_size"] == 64 and summary["final_step"] == 16
  _assert_lr_follows_the_sqrt_rule(config, rows)
