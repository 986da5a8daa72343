"""The packed and padded layouts of the one set of steps (rl/steps.py) give the loss, gradients
and metrics of a padded reference written in the test (tests/padded_layout.py)."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import padded_layout as pl
import pytest
from flax import nnx

from configs import fipo_qwen2_5_32b
from fipo_jax import config as config_lib
from fipo_jax import models, policy, sharding
from fipo_jax.algo import advantages as adv_lib
from fipo_jax.algo import losses as losses_lib
from fipo_jax.rl import layouts, packing, rollout_dump, steps
from fipo_jax.rl import setup as setup_lib

P, T, GROUPS, N = 8, 12, 4, 4  # max prompt / response length; M = 16 sequences
M = GROUPS * N
RESPONSE_FIELDS = ("old_log_probs", "advantages", "response_mask")


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
  # Old log-probs away from the current policy, so ratios, clips, the future-KL weights and
  # FIPO's sequence drop (clip_ratio_c 1.5 below) all take effect.
  upd = steps.UpdateConfig(
    policy_loss=losses_lib.PolicyLossConfig(clip_ratio_c=1.5, decay_rate=4.0, chunk_size=4),
    logprob_chunk_size=8,
  )
  *tokens, mask = pl.pad_rows(prompts, responses, p=P, t=T)
  lp, _ = jax.jit(functools.partial(pl.log_probs, graphdef, t=T, cfg=upd))(params, tokens)
  noise = rng.normal(0, 0.5, (M, T)).astype(np.float32)
  rows = {
    "old_log_probs": (np.asarray(lp) + noise) * mask,
    "advantages": adv[:, None] * mask,
    "response_mask": mask,
  }
  return dict(
    graphdef=graphdef,
    params=params,
    prompts=prompts,
    responses=responses,
    adv=adv,
    tokens=tokens,
    rows=rows,
    upd=upd,
  )


def _resp(s, **changes) -> steps.Responses:
  return steps.Responses(**{k: jnp.asarray(v) for k, v in {**s["rows"], **changes}.items()})


def _batch(s, layout: packing.Layout):
  """The rollouts on `layout`, old log-probs from the setup -> (Batch, plan, shape)."""
  out = packing.pack_rollouts(
    s["prompts"],
    s["responses"],
    [np.zeros(len(r), np.float32) for r in s["responses"]],
    s["adv"],
    mini=M,
    max_prompt_length=P,
    max_response_length=T,
    layout=layout,
    pad_id=0,
  )
  (arrays,), (plan,) = out.batches, out.plans
  arrays["old_log_probs"] = packing.to_slots(plan, out.shape, s["rows"]["old_log_probs"])
  return steps.Batch(**{k: jnp.asarray(v) for k, v in arrays.items()}), plan, out.shape


def _padded(s, num_micro=1, num_shards=1):
  return _batch(s, packing.Layout(P + T, num_micro, num_shards, padded=True))


def _packed(s, *, row_len, num_micro, num_shards=1):
  return _batch(s, packing.Layout(row_len, num_micro, num_shards))


def _assert_same_grads(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    rel = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
    assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)


def _assert_same_metrics(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def _steps(s, cfg):
  tx = optax.sgd(0.1)
  fn = jax.jit(functools.partial(steps.train_step, s["graphdef"], cfg=cfg, tx=tx))
  return lambda batch: fn(s["params"], tx.init(s["params"]), batch)[2]


def _reference(s, cfg):
  ref = jax.jit(functools.partial(pl.train_reference, graphdef=s["graphdef"], t=T, cfg=cfg))
  return ref(s["params"], tokens=s["tokens"], resp=_resp(s))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.slow
def test_fixed_micro_batches_equal_the_padded_reference(setup, layout):
  s = setup
  cfg = dataclasses.replace(s["upd"], num_micro_batches=2)
  if layout == "packed":
    batch, _, shape = _packed(s, row_len=2 * (P + T), num_micro=2)
    assert shape.rows * shape.row_len < M // 2 * (P + T)  # fewer tokens than 8 padded rows
  else:
    batch, _, shape = _padded(s, num_micro=2)
    assert (shape.rows, shape.slots, shape.row_len) == (M // 2, M // 2, P + T)
  assert float(jnp.sum(batch.response_mask)) > 0
  ref_grads, ref_loss, ref_metrics = _reference(s, cfg)
  got = _steps(s, cfg)(batch)
  _assert_same_metrics({k: got[k] for k in ref_metrics}, ref_metrics)
  np.testing.assert_allclose(float(got["actor/loss"]), float(ref_loss), rtol=1e-5)
  grads, loss, _ = jax.jit(functools.partial(steps.accumulate_gradients, s["graphdef"], cfg=cfg))(
    s["params"], batch
  )
  _assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_old_log_prob_pass_equals_the_padded_reference(setup, layout):
  s = setup
  if layout == "packed":
    batch, plan, _ = _packed(s, row_len=24, num_micro=None)
  else:
    batch, plan, _ = _padded(s, num_micro=4, num_shards=2)
  lp, ent = jax.jit(functools.partial(steps.log_prob_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], batch
  )
  ref_lp, ref_ent = jax.jit(functools.partial(pl.log_probs, s["graphdef"], t=T, cfg=s["upd"]))(
    s["params"], s["tokens"]
  )
  mask = s["rows"]["response_mask"] > 0
  for got, ref in ((lp, ref_lp), (ent, ref_ent)):
    np.testing.assert_allclose(
      packing.from_slots(plan, np.asarray(got))[mask], np.asarray(ref)[mask], rtol=1e-5, atol=1e-5
    )


def _dynamic_reference(s, plan, cfg):
  """verl's dynamic batch size on padded rows: each micro-batch's loss x n_j / M, summed (and
  logged x n_j / M, averaged over micro-batches)."""
  grad = jax.jit(
    jax.value_and_grad(functools.partial(pl.micro_loss, t=T, cfg=cfg), has_aux=True),
    static_argnums=1,
  )
  total, loss, metrics = None, 0.0, []
  for j in range(plan.num_micro):
    rows = np.flatnonzero(plan.micro == j)
    w = len(rows) / M
    resp = jax.tree.map(lambda x, rows=rows: x[rows], _resp(s))
    tokens = tuple(x[rows] for x in s["tokens"])
    (lj, mj), g = grad(s["params"], s["graphdef"], tokens, resp, scale=w)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    loss += float(lj)
    metrics.append(mj)
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
    functools.partial(steps.accumulate_gradients, s["graphdef"], cfg=cfg)
  )(s["params"], packed)
  ref_grads, ref_loss, ref_metrics = _dynamic_reference(s, plan, cfg)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  _assert_same_grads(grads, ref_grads)
  _assert_same_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.slow
def test_steps_on_a_two_shard_mesh_equal_one_device(setup, layout):
  """Batch shards over devices: each gathers its own rows, same numbers as one device."""
  s = setup
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  cfg = dataclasses.replace(s["upd"], num_micro_batches=2)
  if layout == "packed":
    one, _, _ = _packed(s, row_len=P + T, num_micro=2)
    two, _, _ = _packed(s, row_len=P + T, num_micro=2, num_shards=2)
  else:
    (one, _, _), (two, _, _) = _padded(s, 2), _padded(s, 2, num_shards=2)
  param_sharding = sharding.state_shardings(s["params"], mesh)
  params = jax.device_put(s["params"], param_sharding)
  put = lambda x: jax.device_put(x, sharding.named_sharding(mesh, (None, "batch"), x.shape))
  two = jax.tree.map(put, two)
  tx = optax.sgd(0.1)
  opt = tx.init(params)
  compiled = steps.jit_steps(
    s["graphdef"],
    cfg=cfg,
    tx=tx,
    param_sharding=param_sharding,
    opt_sharding=jax.tree.map(lambda x: x.sharding, opt),
  )
  ref = _steps(s, cfg)(one)
  params = jax.tree.map(jnp.copy, params)  # the jitted step donates its params
  _assert_same_metrics(compiled.train(params, opt, two)[2], ref)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_influence_dump_rows_equal_the_padded_reference(setup, layout):
  s = setup
  if layout == "packed":
    batch, _, _ = _packed(s, row_len=P + T + 4, num_micro=None)
  else:
    batch, _, _ = _padded(s, num_micro=2)
  got = jax.jit(functools.partial(steps.influence_step, s["graphdef"], cfg=s["upd"]))(
    s["params"], batch
  )
  ref_lp = functools.partial(pl.log_probs, s["graphdef"], t=T, cfg=s["upd"], entropy=False)
  lp = jax.jit(ref_lp)(s["params"], s["tokens"])
  r = _resp(s)
  ref = steps.influence_terms(lp, r.old_log_probs, r.advantages, r.response_mask, s["upd"])
  # Two epochs over one mini-batch: every dump maps back through its mini-batch.
  dumps, (fields,) = rollout_dump.row_arrays([jax.device_get(got)] * 2, [jax.device_get(batch)])
  mask = s["rows"]["response_mask"] > 0
  for dump in dumps:
    for k, v in ref.items():
      np.testing.assert_allclose(dump[k][mask], np.asarray(v)[mask], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fields["response_mask"], s["rows"]["response_mask"])
  np.testing.assert_array_equal(fields["advantages"], s["rows"]["advantages"])
  np.testing.assert_array_equal(fields["response_ids"], s["tokens"][0][:, P:])


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
  assert layouts.for_run(rc, mesh, upd) == packing.Layout(22528, None, 64)
  # 1024 responses of ~8k tokens on 64 chips: ~6 rows of 22528 tokens per chip.
  shape = packing.Shape(num_micro=8, num_shards=64, rows=1, slots=4, row_len=22528)
  batch = layouts.abstract_batch(shape, rc.rl.max_response_length)
  fn = functools.partial(steps.train_step, graphdef, cfg=upd, tx=tx)
  new_params, new_opt, metrics = jax.eval_shape(fn, abstract, opt, batch)
  assert models.count_params(new_params) == 32_763_876_352
  assert jax.tree.structure(new_opt) == jax.tree.structure(opt)
  for key in ("actor/pg_loss", "actor/influence_weights_mean_raw", "actor/grad_norm"):
    assert metrics[key].shape == ()
