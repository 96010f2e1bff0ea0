"""Mixture of experts: routing with capacity, the load-balancing loss over the global batch
(8 simulated devices against one device holding it), and the MoE LM's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from effjax import models, moe, tasks, trainer
from effjax.parallel import DATA_AXIS, Runner
from tests.helpers import assert_trees_close, lm_config

T, D, E = 8 * 32, 16, 4  # Tokens (global), width, experts.


def _router_inputs():
  k = jax.random.split(jax.random.key(0), 2)
  # Tokens of two kinds, each replica holding mostly one kind: the replicas' own expert
  # fractions differ from the global ones.
  x = jax.random.normal(k[0], (T, D)) + jnp.repeat(jnp.arange(8) % 2, T // 8)[:, None] * 2.0
  return {"w": jax.random.normal(k[1], (D, E)) * 0.5}, x


def _lbl(params, x, axis_name, top_k=2):
  r = moe.top_k_routing(x @ params["w"], top_k, moe.expert_capacity(x.shape[0], E, top_k, 1.0))
  return moe.balance_loss(r.probs, r.assigned, axis_name)[0]


def test_global_balance_loss_on_8_replicas_equals_one_device_and_micro_differs():
  params, x = _router_inputs()
  ref, ref_grad = jax.value_and_grad(_lbl)(params, x, None)
  mesh = jax.make_mesh((8,), (DATA_AXIS,))

  def per_replica(axis_name):
    f = lambda p, xs: jax.lax.pmean(jax.value_and_grad(_lbl)(p, xs, axis_name), DATA_AXIS)
    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(),
                               check_vma=False))
    return fn(params, jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS))))

  got, got_grad = per_replica(DATA_AXIS)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert_trees_close(got_grad, ref_grad, "global LBL gradient", rtol=1e-4, atol=1e-7)
  micro, micro_grad = per_replica(None)
  assert abs(float(micro) - float(ref)) > 0.05, (micro, ref)
  assert float(jnp.abs(micro_grad["w"] - ref_grad["w"]).max()) > 1e-3


def test_top_k_routing_fills_experts_in_priority_order_up_to_capacity():
  logits = np.asarray(jax.random.normal(jax.random.key(3), (40, E)))
  cap = 7
  r = moe.top_k_routing(jnp.asarray(logits), 2, cap)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=1)[:, :2]
  gates = np.take_along_axis(probs, order, 1)
  gates = gates / gates.sum(1, keepdims=True)
  dispatch = np.zeros((40, E, cap))
  combine = np.zeros((40, E, cap))
  filled = np.zeros(E, int)
  for j in range(2):  # All first choices, then all second choices, in token order.
    for t in range(40):
      e = order[t, j]
      if filled[e] < cap:
        dispatch[t, e, filled[e]] = 1
        combine[t, e, filled[e]] = gates[t, j]
      filled[e] += 1
  np.testing.assert_array_equal(r.dispatch, dispatch)
  np.testing.assert_allclose(r.combine, combine, rtol=1e-6)
  assert dispatch.sum() < 80  # Some tokens were dropped: the capacity binds.
  np.testing.assert_array_equal(np.asarray(r.assigned).sum(1), 2)


def test_moe_layer_is_each_tokens_expert_mlp_times_its_gate():
  layer = models.MoEFeedForward(num_experts=E, top_k=1, capacity_factor=E * 1.0, hidden=8)
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  variables = layer.init(jax.random.key(2), x)
  y, aux = layer.apply(variables, x, mutable=["aux"])
  p = variables["params"]
  tok = np.asarray(x.reshape(-1, D))
  logits = tok @ np.asarray(p["router"]["kernel"])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  e = probs.argmax(1)
  gelu = lambda v: np.asarray(jax.nn.gelu(jnp.asarray(v)))
  ref = np.stack([probs[t, e[t]] * (gelu(tok[t] @ p["w_in"][e[t]] + p["b_in"][e[t]])
                                    @ p["w_out"][e[t]] + p["b_out"][e[t]]) for t in range(10)])
  np.testing.assert_allclose(np.asarray(y).reshape(10, D), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(aux["aux"]["expert"][0].reshape(-1), e)
  np.testing.assert_allclose(aux["aux"]["load"][0], np.bincount(e, minlength=E) / 10, rtol=1e-6)


def _moe_step(config, runner):
  setup = trainer.build(config, runner=runner, with_data=False)
  fn = runner.compile(trainer.make_train_step(config, task=setup.task))
  state = setup.state.replace(**runner.replicate(setup.state.items()))
  batch = trainer.example_batch(setup.spec, config, config.batch_size)
  rng = np.random.default_rng(0)
  n, length = batch["inputs"].shape
  kinds = np.repeat(np.arange(n) % 2, 1)[:, None]  # Replicas see different byte ranges.
  batch["inputs"] = (rng.integers(3, 60, (n, length)) + 120 * kinds).astype(batch["inputs"].dtype)
  batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
  _, metrics = fn(state, runner.shard_batch(batch))
  return runner.to_host(metrics)


def test_moe_lm_step_global_balance_equals_one_device(data_dir):
  """The LM train step with 4 experts: on 8 replicas with the global balance loss the
  loss (NLL + alpha * LBL), the LBL and the loads equal one device holding the batch; the
  micro balance loss differs. Loads sum to 1 and the router entropy is at most ln 4."""
  # Capacity E/k x the fair share: no token is dropped, so that the capacity (counted per
  # replica's tokens) does not make the 8-replica and one-device models differ.
  overrides = {"model.moe.num_experts": E, "model.moe.top_k": 2,
               "model.moe.balance_coef": 0.1, "model.moe.capacity_factor": E / 2}
  one = Runner("shard_map", jax.sharding.Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,)))
  m1 = _moe_step(lm_config(data_dir, **overrides), one)
  m8 = _moe_step(lm_config(data_dir, **overrides), Runner("shard_map"))
  for k in ("train/loss", "train/moe/balance_loss", *[f"train/moe/load/{i}" for i in range(E)]):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
  loads = [m8[f"train/moe/load/{i}"] for i in range(E)]
  np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
  assert 0 < m8["train/moe/entropy"] <= np.log(E) + 1e-6
  micro = _moe_step(lm_config(data_dir, **overrides, **{"model.moe.balance": "micro"}),
                    Runner("shard_map"))
  assert abs(micro["train/moe/balance_loss"] - m1["train/moe/balance_loss"]) > 1e-3


def test_scanned_moe_stack_sows_the_same_statistics(data_dir):
  """``scan_layers`` stacks the MoE blocks: with the unrolled model's parameters stacked
  (``stack_layers``), logits and the per-layer balance loss, load and entropy that the LM
  task reads are the same."""
  overrides = {"model.moe.num_experts": E, "model.moe.top_k": 2, "model.moe.balance": "micro",
               "model.num_layers": 2}
  flat = trainer.build(lm_config(data_dir, **overrides), with_data=False)
  scan = trainer.build(lm_config(data_dir, **overrides, **{"model.scan_layers": True}),
                       with_data=False)
  batch = trainer.example_batch(flat.spec, flat.config, 4)
  batch["inputs"] = np.random.default_rng(0).integers(3, 200, batch["inputs"].shape)
  params = flat.state.params
  stacked = models.stack_layers(params, flat.config.model.num_layers)
  out = {}
  for name, setup, p in (("flat", flat, params), ("scan", scan, stacked)):
    logits, aux = jax.jit(lambda p, b, m=setup.model: m.apply(
        {"params": p}, b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"],
        mutable=["aux"]))(p, batch)
    out[name] = (logits, tasks.moe_statistics(aux["aux"]))
  np.testing.assert_allclose(out["scan"][0], out["flat"][0], rtol=1e-5, atol=1e-5)
  assert_trees_close(out["scan"][1], out["flat"][1], "moe statistics", rtol=1e-5)
  assert out["flat"][1]["load"].shape == (E,)
