"""Packed and padded layouts give the same loss, gradients and metrics on one rollout batch."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import fipo_qwen2_5_32b
from fipo_jax import config as config_lib
from fipo_jax import models, policy, sharding
from fipo_jax.algo import advantages as adv_lib
from fipo_jax.algo import aggregation
from fipo_jax.algo import losses as losses_lib
from fipo_jax.rl import packed_step as ps
from fipo_jax.rl import packing
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.rl import setup as setup_lib
from fipo_jax.rl import train_step as ts

P, T, GROUPS, N = 8, 12, 4, 4  # max prompt / response length; M = 16 sequences
M = GROUPS * N


@dataclasses.dataclass
class _Rollouts:
  """What rollout.pack_batch reads."""

  prompt_ids: list
  response_ids: list
  response_logprobs: list

  def __len__(self):
    return len(self.response_ids)


@pytest.fixture(scope="module")
def setup():
  cfg = models.ModelConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    attention_impl="blockwise",
    attention_block_size=8,
  )
  graphdef, params = nnx.split(models.init_model(cfg, seed=1))
  rng = np.random.default_rng(0)
  # Mixed lengths: prompts of 1..P tokens, responses of 0..T (some empty, some full).
  prompts = [rng.integers(1, 64, rng.integers(1, P + 1)).astype(np.int32) for _ in range(M)]
  lens = rng.integers(0, T + 1, M)
  lens[:2] = (T, 0)
  responses = [rng.integers(1, 64, n).astype(np.int32) for n in lens]
  scores = rng.choice([-1.0, 1.0], M).astype(np.float32)
  adv = adv_lib.grpo_outcome_advantages(scores, np.repeat(np.arange(GROUPS), N))
  rollouts = _Rollouts(prompts, responses, [np.zeros(len(r), np.float32) for r in responses])
  arrays = rollout_lib.pack_batch(
    rollouts, adv, max_prompt_length=P, max_response_length=T, pad_id=0
  )
  # Old log-probs away from the current policy, so ratios, clips, the future-KL weights and
  # FIPO's sequence drop (clip_ratio_c 1.5 below) all take effect.
  upd = ts.UpdateConfig(
    policy_loss=losses_lib.PolicyLossConfig(clip_ratio_c=1.5, decay_rate=4.0, chunk_size=4),
    logprob_chunk_size=8,
  )
  padded = ts.PolicyBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
  lp, _ = jax.jit(functools.partial(ts.log_prob_step, graphdef, cfg=upd))(params, padded)
  noise = rng.normal(0, 0.5, (M, T)).astype(np.float32)
  arrays["old_log_probs"] = (np.asarray(lp) + noise) * arrays["response_mask"]
  return dict(graphdef=graphdef, params=params, rollouts=rollouts, adv=adv, arrays=arrays, upd=upd)


def _padded(s, **changes):
  return ts.PolicyBatch(**{k: jnp.asarray(v) for k, v in {**s["arrays"], **changes}.items()})


def _packed(s, *, row_len, num_micro, num_shards=1):
  r = s["rollouts"]
  out = packing.pack_rollouts(
    r.prompt_ids,
    r.response_ids,
    r.response_logprobs,
    s["adv"],
    mini=M,
    max_prompt_length=P,
    max_response_length=T,
    row_len=row_len,
    num_shards=num_shards,
    num_micro=num_micro,
    pad_id=0,
  )
  (arrays,), (plan,) = out.batches, out.plans
  arrays["old_log_probs"] = packing.to_slots(plan, out.shape, s["arrays"]["old_log_probs"])
  return ps.PackedBatch(**{k: jnp.asarray(v) for k, v in arrays.items()}), plan, out.shape


def _padded_grads(s, batch, cfg):
  """The padded train step's accumulation: sum over micro-batches of grad(micro loss)."""
  grad = jax.grad(ts.micro_batch_loss, has_aux=True)

  @jax.jit
  def total(params, batch):
    micro = ts.split_micro_batches(batch, cfg.num_micro_batches)
    gs = [
      grad(params, s["graphdef"], jax.tree.map(lambda x, j=j: x[j], micro), cfg=cfg)[0]
      for j in range(cfg.num_micro_batches)
    ]
    return jax.tree.map(lambda *x: sum(x), *gs)

  return total(s["params"], batch)


def _assert_same_grads(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    rel = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
    assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)


def _assert_same_metrics(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def _steps(s, cfg, step_fn):
  tx = optax.sgd(0.1)
  fn = jax.jit(functools.partial(step_fn, s["graphdef"], cfg=cfg, tx=tx))
  return lambda batch: fn(s["params"], tx.init(s["params"]), batch)[2]


@pytest.mark.slow
def test_fixed_micro_batches_packed_equal_padded(setup):
  s = setup
  cfg = dataclasses.replace(s["upd"], num_micro_batches=2)
  packed, _, shape = _packed(s, row_len=2 * (P + T), num_micro=2)
  assert shape.rows * shape.row_len < M // 2 * (P + T)  # fewer tokens than 8 padded rows
  padded = _padded(s)
  assert float(jnp.sum(padded.response_mask)) > 0
  _assert_same_metrics(_steps(s, cfg, ps.train_step)(packed), _steps(s, cfg, ts.train_step)(padded))
  grads, loss, _ = jax.jit(functools.partial(ps.accumulate_gradients, s["graphdef"], cfg=cfg))(
    s["params"], packed
  )
  _assert_same_grads(grads, _padded_grads(s, padded, cfg))


def test_old_log_prob_pass_packed_equals_padded(setup):
  s = setup
  packed, plan, _ = _packed(s, row_len=24, num_micro=None)
  lp, ent = jax.jit(functools.partial(ps.log_prob_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], packed
  )
  ref_lp, ref_ent = jax.jit(functools.partial(ts.log_prob_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], _padded(s)
  )
  mask = s["arrays"]["response_mask"] > 0
  for got, ref in ((lp, ref_lp), (ent, ref_ent)):
    np.testing.assert_allclose(
      packing.from_slots(plan, np.asarray(got))[mask], np.asarray(ref)[mask], rtol=1e-5, atol=1e-5
    )


def _dynamic_reference(s, plan, cfg):
  """verl's dynamic batch size on padded rows: each micro-batch's loss x n_j / M, summed (and
  logged x n_j / M, averaged over micro-batches)."""
  one = dataclasses.replace(cfg, num_micro_batches=1)
  full = _padded(s)
  grad = jax.jit(
    jax.value_and_grad(
      functools.partial(ts.micro_batch_loss, graphdef=s["graphdef"], cfg=one), has_aux=True
    )
  )
  total, loss, metrics = None, 0.0, []
  for j in range(plan.num_micro):
    rows = np.flatnonzero(plan.micro == j)
    micro = jax.tree.map(lambda x, rows=rows: x[rows], full)
    (lj, mj), g = grad(s["params"], micro=micro)
    w = len(rows) / M
    g = jax.tree.map(lambda x, w=w: x * w, g)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    loss += float(lj) * w
    metrics.append(aggregation.scale_loss_metrics(mj, w))  # logged as verl's dp_actor logs
  return total, loss, {k: np.mean([float(m[k]) for m in metrics]) for k in metrics[0]}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.slow
def test_token_budget_micro_batches_follow_verls_scaling(setup, agg):
  s = setup
  policy = dataclasses.replace(s["upd"].policy_loss, loss_agg_mode=agg)
  cfg = dataclasses.replace(s["upd"], policy_loss=policy)
  packed, plan, shape = _packed(s, row_len=P + T + 4, num_micro=None)
  assert plan.num_micro >= 3 and shape.num_micro > plan.num_micro  # a padding micro-batch
  grads, loss, metrics = jax.jit(
    functools.partial(ps.accumulate_gradients, s["graphdef"], cfg=cfg)
  )(s["params"], packed)
  ref_grads, ref_loss, ref_metrics = _dynamic_reference(s, plan, cfg)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  _assert_same_grads(grads, ref_grads)
  _assert_same_metrics(metrics, ref_metrics)


@pytest.mark.slow
def test_packed_step_on_a_two_shard_mesh_equals_one_device(setup):
  """Batch shards over devices: each gathers its own rows, same numbers as one device."""
  s = setup
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  cfg = dataclasses.replace(s["upd"], num_micro_batches=2)
  one, _, _ = _packed(s, row_len=P + T, num_micro=2)
  two, _, _ = _packed(s, row_len=P + T, num_micro=2, num_shards=2)
  param_sharding = sharding.state_shardings(s["params"], mesh)
  params = jax.device_put(s["params"], param_sharding)
  put = lambda x: jax.device_put(x, sharding.named_sharding(mesh, (None, "batch"), x.shape))
  two = jax.tree.map(put, two)
  tx = optax.sgd(0.1)
  opt = tx.init(params)
  steps = ps.jit_steps(
    s["graphdef"],
    cfg=cfg,
    tx=tx,
    param_sharding=param_sharding,
    opt_sharding=jax.tree.map(lambda x: x.sharding, opt),
  )
  ref = _steps(s, cfg, ps.train_step)(one)
  params = jax.tree.map(jnp.copy, params)  # the jitted step donates its params
  _assert_same_metrics(steps.train(params, opt, two)[2], ref)


def test_influence_dump_of_packed_rows_equals_the_padded_dump(setup):
  s = setup
  packed, _, _ = _packed(s, row_len=P + T + 4, num_micro=None)
  got = jax.jit(functools.partial(ps.influence_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], packed
  )
  ref = jax.jit(functools.partial(ts.influence_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], _padded(s)
  )
  # Two epochs over one mini-batch: every dump maps back through its mini-batch.
  dumps, (fields,) = ps.dump_rows([jax.device_get(got)] * 2, [jax.device_get(packed)])
  mask = s["arrays"]["response_mask"] > 0
  for dump in dumps:
    for k, v in ref.items():
      np.testing.assert_allclose(dump[k][mask], np.asarray(v)[mask], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fields["response_mask"], s["arrays"]["response_mask"])
  np.testing.assert_array_equal(fields["advantages"], s["arrays"]["advantages"])
  np.testing.assert_array_equal(fields["response_ids"], s["arrays"]["input_ids"][:, P:])


@pytest.mark.slow
def test_32b_recipe_packed_train_step_builds_abstractly():
  """The packed train step of the 32B recipe at its token budget, traced with eval_shape."""
  rc = config_lib.validate(fipo_qwen2_5_32b.get_config(), check_paths=False)
  assert rc.rl.use_remove_padding and rc.rl.use_dynamic_bsz
  cfg = policy.model_config(rc)
  graphdef, abstract, _ = models.build.param_shardings(cfg, None)
  tx = optax.adamw(1e-6)
  opt = jax.eval_shape(tx.init, abstract)
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 64, "tensor": 1})
  upd = setup_lib.update_config(rc, mesh, rc.data.max_prompt_length + rc.rl.max_response_length)
  settings = ps.layout(rc, mesh, upd)
  assert settings == {"row_len": 22528, "num_micro": None, "num_shards": 64}
  # 1024 responses of ~8k tokens on 64 chips: ~6 rows of 22528 tokens per chip.
  shape = packing.Shape(num_micro=8, num_shards=64, rows=1, slots=4, row_len=22528)
  batch = ps.abstract_batch(shape, rc.rl.max_response_length)
  fn = functools.partial(ps.train_step, graphdef, cfg=upd, tx=tx)
  new_params, new_opt, metrics = jax.eval_shape(fn, abstract, opt, batch)
  assert models.count_params(new_params) == 32_763_876_352
  assert jax.tree.structure(new_opt) == jax.tree.structure(opt)
  for key in ("actor/pg_loss", "actor/influence_weights_mean_raw", "actor/grad_norm"):
    assert metrics[key].shape == ()
