"""The GRPO baseline: its KL-to-reference term, the reference policy and the recipe end to end.

numpy references (float64) are written from verl's `kl_penalty` and `compute_policy_loss_vanilla`
(verl/trainer/ppo/core_algos.py) and its dp_actor (policy loss + kl_loss_coef * KL), with
torch's clamp gradients (1 inside [lo, hi] including the ends, 0 outside).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import types

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import padded_layout as pl
import pytest
from flax import nnx

from configs import grpo_qwen2_5_7b_math
from fipo_jax import config as config_lib
from fipo_jax import models, recipes
from fipo_jax import policy as policy_lib
from fipo_jax.algo import losses
from fipo_jax.models import build as build_lib
from fipo_jax.rl import optimizer, steps
from fipo_jax.rl import setup as setup_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _np_kl(lp, ref, kind):
  """verl kl_penalty [B, T] and its derivative wrt lp."""
  d = lp - ref
  if kind == "kl":
    return d, np.ones_like(d)
  if kind == "abs":
    return np.abs(d), np.sign(d)
  if kind == "mse":
    return 0.5 * d**2, d
  k_raw = ref - lp
  k = np.clip(k_raw, -20, 20)
  v_raw = np.exp(k) - k - 1
  v = np.clip(v_raw, -10, 10)
  inside = (np.abs(k_raw) <= 20) & (np.abs(v_raw) <= 10)
  return v, np.where(inside, -(np.exp(k) - 1), 0.0)


def _np_agg_weights(mask, mode):
  """d agg_loss / d loss_mat [B, T] (agg_loss is linear in the per-token loss)."""
  m = mask.astype(np.float64)
  if mode == "token-mean":
    return m / (m.sum() + 1e-8)
  assert mode == "seq-mean-token-mean"
  n = m.sum(-1, keepdims=True)
  rows = (n > 0).sum()
  return np.where(n > 0, m / np.maximum(n, 1), 0.0) / (rows + 1e-8)


def _np_vanilla(lp, old, adv, low, high, c):
  """verl's vanilla per-token loss [B, T] and its derivative wrt lp (no tie cases here)."""
  raw = lp - old
  ratio = np.exp(np.clip(raw, -20, 20))
  live = np.abs(raw) <= 20
  l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high)
  in_range = (ratio >= 1 - low) & (ratio <= 1 + high)
  lc = np.maximum(l1, l2)
  dlc = np.where((l1 > l2) | in_range, -adv * ratio * live, 0.0)
  l3 = -adv * c
  dual = (adv < 0) & (lc > l3)
  return np.where(dual, l3, lc), np.where(dual, 0.0, dlc)


def _kl_inputs(seed=0, b=4, t=9):
  rng = np.random.default_rng(seed)
  lp = rng.normal(-1.5, 0.6, (b, t))
  diff = rng.normal(0.0, 0.5, (b, t))
  diff[0, :4] = [25.0, -25.0, 4.0, -3.5]  # log-ratio clamp, k3 value clamp, k3 tail
  mask = (np.arange(t)[None] < np.array([t, t - 3, 1, 0])[:, None]).astype(np.float32)
  return lp.astype(np.float32), (lp + diff).astype(np.float32), mask


@pytest.mark.parametrize("kind", losses.KL_TYPES)
def test_kl_penalty_matches_numpy(kind):
  lp, ref, mask = _kl_inputs()
  got, grad = jax.value_and_grad(
    lambda x: (losses.kl_penalty(x, jnp.asarray(ref), kind) * mask).sum()
  )(jnp.asarray(lp))
  want, dwant = _np_kl(lp.astype(np.float64), ref.astype(np.float64), kind)
  np.testing.assert_allclose(got, (want * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(grad, dwant * mask, rtol=1e-5, atol=1e-6)
  per_token = np.asarray(losses.kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind))
  np.testing.assert_allclose(per_token, want, rtol=1e-5, atol=1e-6)
  if kind == "low_var_kl":  # verl's clamps: |ref - lp| <= 20 before exp, the value <= 10
    assert per_token.max() == 10.0 and per_token.min() >= 0.0
  for mode in ("token-mean", "seq-mean-token-mean"):
    agg = losses.kl_loss(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask), kind, mode)
    np.testing.assert_allclose(agg, (want * _np_agg_weights(mask, mode)).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="kl_loss_type"):
    losses.kl_penalty(jnp.asarray(lp), jnp.asarray(ref), "k9")


@functools.cache
def _tiny():
  cfg = models.get_preset(
    "qwen2.5-0.5b", param_dtype="float32", dtype="float32", **recipes.tiny_model().to_dict()
  )
  return nnx.split(models.init_model(cfg, seed=0))


@functools.cache
def _log_prob_fns():
  """Jitted (log_prob [NM, W, E, T], vjp of log_prob wrt params): the pass the update
  differentiates, in the batch's response layout (rows: `pl.rows_of`)."""
  graphdef, _ = _tiny()
  lp_fn = lambda p, b: steps.log_prob_step(graphdef, p, b, cfg=steps.UpdateConfig())[0]  # noqa: E731
  vjp = lambda p, b, ct: jax.vjp(lambda q: lp_fn(q, b), p)[1](ct)[0]  # noqa: E731
  return jax.jit(lp_fn), jax.jit(vjp)


def _batch(b=4, p=3, t=6, num_micro=1) -> steps.Batch:
  """Four sequences of a P-token prompt and 6, 4, 6 and 3 response tokens, padded layout."""
  ids = (np.arange(b * (p + t)).reshape(b, p + t) * 7 % 50 + 3).astype(np.int32)
  lengths = [t, t - 2, t, 3]
  responses = [ids[i, p : p + n] for i, n in enumerate(lengths)]
  adv = np.array([1.0, -1.0, 0.5, -0.7], np.float32)
  return pl.batch(list(ids[:, :p]), responses, adv, p=p, t=t, num_micro=num_micro)


def _micro(batch, j: int = 0):
  return jax.tree.map(lambda x: x[j], batch)


def _loss(params, graphdef, micro, *, cfg):
  """A micro-batch's loss, unscaled (its own sequences are the mini-batch)."""
  return steps.micro_batch_loss(params, graphdef, micro, jnp.sum(micro.seq_mask), cfg=cfg)


_CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


# Every KL type; the KL term takes the policy loss's aggregation (one case off token-mean).
@pytest.mark.parametrize(
  "kind,agg",
  [
    ("kl", "token-mean"),
    ("abs", "token-mean"),
    ("mse", "seq-mean-token-mean"),
    ("low_var_kl", "token-mean"),
  ],
)
@pytest.mark.slow
def test_grpo_update_with_kl_term_matches_numpy(kind, agg):
  """One micro-batch of the GRPO update: loss, KL metrics and parameter gradient vs numpy."""
  graphdef, params = _tiny()
  lp_fn, vjp_fn = _log_prob_fns()
  coef = 0.3
  cfg = steps.UpdateConfig(
    loss_mode="grpo",
    policy_loss=losses.PolicyLossConfig(loss_agg_mode=agg, **_CLIP),
    use_kl_loss=True,
    kl_loss_coef=coef,
    kl_loss_type=kind,
  )
  batch = _batch()
  lp64 = pl.rows_of(batch, lp_fn(params, batch)).astype(np.float64)
  rng = np.random.default_rng(1)
  # old: clip-higher, lower clip and dual clip all active; ref: both KL clamps reached.
  old = lp64 - rng.choice([-0.5, -0.1, 0.0, 0.15, 0.25, 1.5], lp64.shape)
  ref = lp64 + rng.normal(0.0, 0.4, lp64.shape)
  ref[0, :2] += [24.0, 4.5]
  batch = batch.replace(
    old_log_probs=pl.slots(batch, old.astype(np.float32)),
    ref_log_probs=pl.slots(batch, ref.astype(np.float32)),
  )
  (loss, metrics), grads = jax.jit(
    jax.value_and_grad(lambda p, b: _loss(p, graphdef, _micro(b), cfg=cfg), has_aux=True)
  )(params, batch)

  rows = lambda x: pl.rows_of(batch, x).astype(np.float64)
  mask, adv = rows(batch.response_mask), rows(batch.advantages)
  old, ref = rows(batch.old_log_probs), rows(batch.ref_log_probs)
  w = _np_agg_weights(mask, agg)
  pg, dpg = _np_vanilla(
    lp64, old, adv, _CLIP["clip_ratio_low"], _CLIP["clip_ratio_high"], _CLIP["clip_ratio_c"]
  )
  kl, dkl = _np_kl(lp64, ref, kind)
  want_kl = (kl * w).sum()
  np.testing.assert_allclose(metrics["actor/kl_loss"], want_kl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["actor/kl_coef"], coef, rtol=1e-7)
  np.testing.assert_allclose(metrics["actor/pg_loss"], (pg * w).sum(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, (pg * w).sum() + coef * want_kl, rtol=1e-5, atol=1e-7)
  # d loss / d params = J^T (d loss / d log_prob): the chain rule through the same model pass.
  want_grads = vjp_fn(params, batch, pl.slots(batch, ((dpg + coef * dkl) * w).astype(np.float32)))
  for g, wg in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, wg, rtol=2e-4, atol=1e-6 * max(1.0, float(jnp.abs(wg).max())))


@pytest.mark.slow
def test_train_step_with_kl_term_averages_micro_batches_and_needs_reference():
  graphdef, params = _tiny()
  cfg = steps.UpdateConfig(
    loss_mode="grpo", num_micro_batches=2, use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type="mse"
  )
  batch = _batch(num_micro=2)
  lp = pl.rows_of(batch, _log_prob_fns()[0](params, batch)).astype(np.float64)
  ref = lp + np.linspace(-1.0, 1.0, lp.size).reshape(lp.shape)
  batch = batch.replace(
    old_log_probs=pl.slots(batch, lp.astype(np.float32)),
    ref_log_probs=pl.slots(batch, ref.astype(np.float32)),
  )
  tx, _ = optimizer.make_optimizer(
    config_lib.OptimSection(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
    total_updates=1)
  step = jax.jit(lambda p, o, b: steps.train_step(graphdef, p, o, b, cfg=cfg, tx=tx))
  new_params, _, m = step(params, tx.init(params), batch)
  # Micro-batch j holds rows j, j + 2 (strided). verl's dp_actor logs each micro-batch's kl loss
  # times its loss scale (1 / gradient accumulation = 1/2) and averages the list over the step.
  mask = pl.rows_of(batch, batch.response_mask)
  per_micro = [
    ((0.5 * (lp - ref) ** 2)[j::2] * _np_agg_weights(mask[j::2], "token-mean")).sum()
    for j in range(2)
  ]
  np.testing.assert_allclose(m["actor/kl_loss"], np.mean(per_micro) / 2, rtol=1e-5)
  assert float(m["train/skipped_step"]) == 0.0 and float(m["actor/kl_coef"]) == np.float32(0.01)
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)))
  with pytest.raises(ValueError, match="ref_log_probs"):
    _loss(params, graphdef, _micro(_batch()), cfg=cfg)


def test_grpo_loss_is_verl_vanilla_with_both_clip_ratios():
  """A ratio of 1.25 on A > 0 sits inside clip-higher 0.28 and outside 0.2; c caps A < 0."""
  lp = jnp.log(jnp.asarray([[1.25, 5.0]], jnp.float32))
  zeros, mask = jnp.zeros((1, 2), jnp.float32), jnp.ones((1, 2), jnp.float32)
  adv = jnp.asarray([[1.0, 0.0]], jnp.float32)
  for high, want in ((0.28, -1.25), (0.2, -1.2)):
    cfg = losses.PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=high)
    loss, _ = losses.compute_policy_loss(
      "grpo", lp[:, :1], zeros[:, :1], adv[:, :1], mask[:, :1], cfg
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)
  neg = jnp.asarray([[0.0, -1.0]], jnp.float32)  # ratio 5 > c = 3: the dual clip gives 3 |A|
  loss, m = losses.compute_policy_loss("grpo", lp, zeros, neg, mask, {"clip_ratio_c": 3.0})
  np.testing.assert_allclose(loss, 3.0 / 2, rtol=1e-6)
  assert float(m["actor/pg_clipfrac_lower"]) == 0.5


def test_loss_config_is_built_once_from_the_rl_section():
  # The schema's loss defaults and PolicyLossConfig's (the public API's) are the same values.
  rl_defaults = config_lib.RLSection()
  assert losses.PolicyLossConfig.from_config(rl_defaults) == losses.PolicyLossConfig()
  rc = config_lib.validate(grpo_qwen2_5_7b_math.get_config(), check_paths=False)
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 1})
  upd = setup_lib.update_config(rc, mesh, rc.data.max_prompt_length + rc.rl.max_response_length)
  pl = upd.policy_loss
  assert isinstance(pl, losses.PolicyLossConfig)
  assert (pl.clip_ratio_low, pl.clip_ratio_high, pl.clip_ratio_c) == (0.2, 0.2, 10.0)
  assert (upd.loss_mode, upd.use_kl_loss, upd.kl_loss_type) == ("grpo", True, "low_var_kl")
  assert upd.kl_loss_coef == 0.001
  assert hash(upd) == hash(setup_lib.update_config(rc, mesh, 10240))  # a static jit argument
  with pytest.raises(ValueError, match="kl_loss_type"):
    steps.UpdateConfig(kl_loss_type="full")
  with pytest.raises(ValueError, match="unknown policy loss"):
    steps.UpdateConfig(loss_mode="ppo2")


@pytest.mark.slow  # two full setups (data, model, engine): ~50 s on 2 busy cores
def test_reference_is_a_frozen_copy_rebuilt_identically(tmp_path):
  rc = config_lib.validate(
    grpo_qwen2_5_7b_math.get_config("runlocal"), num_devices=jax.device_count()
  )
  env, state = setup_lib.build(rc, str(tmp_path))
  ref = env.ref_params
  same = lambda a, b: bool(jnp.array_equal(a, b))  # noqa: E731
  assert all(jax.tree.leaves(jax.tree.map(same, ref, state.params)))
  assert all(jax.tree.leaves(jax.tree.map(lambda r, s: r.sharding == s, ref, env.param_sharding)))
  # Own buffers: donating the params (as every update does) leaves the reference intact.
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(state.params)
  assert all(not x.is_deleted() for x in jax.tree.leaves(ref))
  # A resumed run builds it again from the seed: the same values.
  again = setup_lib.build(rc, str(tmp_path))[0].ref_params
  assert all(jax.tree.leaves(jax.tree.map(same, ref, again)))


@pytest.mark.slow
def test_aot_counts_the_reference_params():
  aot = pytest.importorskip("fipo_jax.aot")
  from fipo_jax import sharding  # noqa: PLC0415

  mesh = sharding.make_mesh(1, -1, 1)
  tree = {
    "w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=sharding.batch_sharding(mesh, 2)),
    "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=sharding.replicated(mesh)),
  }
  assert aot.bytes_per_chip(tree) == 64 * 8 * 4 // jax.device_count() + 8 * 2
  # The GRPO train step compiled here (CPU): the frozen reference, one shard of every param per
  # chip, is added to the step's own memory.
  run = config_lib.validate(grpo_qwen2_5_7b_math.get_config("runlocal"), check_paths=False)
  mesh = sharding.make_mesh(*run.mesh.resolve(jax.device_count()))
  res = aot.train_step_result(run, policy_lib.model_config(run), mesh, jax.device_count())
  m = res.memory
  assert res.error is None and "+reference params" in res.shapes
  _, abstract, shardings = build_lib.param_shardings(policy_lib.model_config(run), mesh)
  want = sum(
    math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
  )
  assert m["reference"] == want > 0
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"] + want


@pytest.mark.slow  # two CLI runs of the tiny GRPO recipe: ~1.5 min on 2 busy cores
def test_grpo_recipe_runlocal_runs_with_kl_and_resumes(tmp_path, warm_server):
  # Both runs fork from the test run's warm server (conftest.py, tests/warm_python.py).
  warm = warm_server.with_env(conftest.child_env())
  work = tmp_path / "w"
  cmd = [
    "-m",
    "fipo_jax.main",
    "--config",
    "configs/grpo_qwen2_5_7b_math.py:runlocal",
    "--workdir",
    str(work),
    "--config.eval_every=0",  # not what this checks (test_config_cli's runlocal runs evaluate)
  ]
  res = warm.run(*cmd, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  trained = [r for r in rows if "actor/loss" in r]
  assert [r["step"] for r in trained] == [1, 2]
  for r in trained:
    assert r["actor/kl_loss"] >= 0.0 and np.isfinite(r["actor/kl_loss"])  # k3 >= 0
    assert r["actor/kl_coef"] == pytest.approx(0.001)
  # The second step's policy has moved away from the reference.
  assert trained[1]["actor/kl_loss"] > 0.0
  # Checkpoints hold the policy only; the reference is rebuilt from the seed on resume. (No
  # eval, so no best-metric item either.)
  assert sorted(p.name for p in (work / "checkpoints" / "2").iterdir() if p.is_dir()) == [
    "extra",
    "opt_state",
    "params",
  ]
  res = warm.run(*cmd, "--config.total_steps=3", cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 3 and last["actor/kl_loss"] > 0.0


@pytest.mark.slow
def test_logged_losses_are_scaled_as_verls_dp_actor():
  """verl logs each micro-batch's pg_loss and kl_loss times 1/gradient_accumulation and averages
  the list: with 2 micro-batches the logged value is half the mean unscaled micro-batch loss."""
  graphdef, params = _tiny()
  lp_fn, _ = _log_prob_fns()
  batch = _batch(num_micro=2)
  lp = np.asarray(lp_fn(params, batch))
  old = lp - np.random.default_rng(3).normal(0.0, 0.3, lp.shape)
  batch = batch.replace(old_log_probs=jnp.asarray(old, jnp.float32),
                        ref_log_probs=jnp.asarray(lp + 0.2, jnp.float32))
  kw = dict(loss_mode="grpo", use_kl_loss=True, kl_loss_coef=0.1)
  cfg = steps.UpdateConfig(num_micro_batches=2, **kw)
  tx = optax.sgd(0.0)
  _, _, got = jax.jit(lambda p, o, b: steps.train_step(graphdef, p, o, b, cfg=cfg, tx=tx))(
    params, tx.init(params), batch)
  parts = [_loss(params, graphdef, _micro(batch, j), cfg=cfg) for j in range(2)]
  for key in ("actor/pg_loss", "actor/kl_loss"):
    unscaled = np.mean([float(m[key]) for _, m in parts])
    np.testing.assert_allclose(got[key], unscaled / 2, rtol=1e-5)
  # Fractions are not scaled: the plain micro-batch mean.
  frac = np.mean([float(m["actor/pg_clipfrac"]) for _, m in parts])
  np.testing.assert_allclose(got["actor/pg_clipfrac"], frac, rtol=1e-6)
  np.testing.assert_allclose(got["actor/loss"], sum(float(x) for x, _ in parts) / 2, rtol=1e-5)

