"""Sampler-trainer agreement: rollout IS weights, mismatch metrics, rl.old_log_prob_source.

numpy references for verl's truncated IS weights (token / sequence, the threshold edge, masked
tokens) and the mismatch metrics; the weights in the FIPO, DAPO and GRPO losses on the padded
and packed layouts; config validation; and tiny_cpu runs through the CLI (slow).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import padded_layout as pl
import pytest
import test_tiny_golden as golden
from flax import nnx
from test_packing_step import P, T, _packed, _padded, _resp, setup  # noqa: F401 (fixture)

from fipo_jax import config as config_lib
from fipo_jax import models, recipes
from fipo_jax.algo import losses as losses_lib
from fipo_jax.algo import rollout_correction as rc_lib
from fipo_jax.config_schema import ConfigError
from fipo_jax.rl import log_probs, packing, sampler_policy, steps
from fipo_jax.rl import setup as setup_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISMATCH_KEYS = (
  "training/rollout_probs_diff_max",
  "training/rollout_probs_diff_mean",
  "training/rollout_probs_diff_std",
  "rollout_corr/kl",
  "rollout_corr/k3_kl",
  "rollout_corr/seq_log_ratio_abs_max",
  "rollout_corr/log_ppl_abs_diff",
)


def _np_weights(old, roll, mask, mode, thr):
  """verl compute_rollout_correction_weights, in float64 numpy."""
  lr = np.where(mask > 0, old.astype(np.float64) - roll, 0.0)
  if mode == "sequence":
    lr = np.broadcast_to(lr.sum(-1, keepdims=True), lr.shape)
  w = np.exp(np.clip(lr, -20, 20)) * (mask > 0)
  return np.minimum(w, thr)


def _inputs():
  """[3, 6] log-probs with exact log-ratios 0, +-log 2, 25 (past the safety bound), masked
  tokens holding garbage (nan, +-inf, large)."""
  old = np.log(
    np.array(
      [
        [0.5, 0.5, 0.25, 0.9, 0.1, 0.3],
        [0.2, 0.4, 0.6, 0.8, 0.5, 0.5],
        [0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
      ],
      np.float32,
    )
  )
  roll = old.copy()
  roll[0, 1] = np.log(np.float32(0.25))  # ratio exactly 2: the threshold edge
  roll[0, 2] = np.log(np.float32(0.5))  # ratio exactly 1/2
  roll[1, 0] = old[1, 0] - 25.0  # log-ratio 25: clamped to 20 before exp
  roll[1, 3] = old[1, 3] + 0.3
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], np.float32)
  roll[0, 4], roll[0, 5], roll[1, 5], old[2, 0] = np.nan, np.inf, -1e30, -np.inf
  return old, roll, mask


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("thr", [2.0, 1.0, 1e9])
def test_is_weights_match_numpy(mode, thr):
  old, roll, mask = _inputs()
  got = np.asarray(rc_lib.is_weights(old, roll, mask, mode=mode, threshold=thr))
  np.testing.assert_allclose(got, _np_weights(old, roll, mask, mode, thr), rtol=2e-6)
  assert np.all(got[mask == 0] == 0.0)
  if mode == "token":  # a weight exactly at the threshold stays there; log-ratio 25 -> e^20
    assert got[0, 0] == 1.0 and got[0, 2] == np.float32(0.5) * (thr >= 0.5)
    assert math.isclose(got[1, 0], min(thr, math.exp(20.0)), rel_tol=1e-6)


def _np_metrics(batches, mode, thr):
  """The mismatch metrics of several batches from their flattened tokens (float64)."""
  toks, seqs = [], []
  for old, roll, mask in batches:
    m = mask > 0
    o, r = old.astype(np.float64), roll.astype(np.float64)
    toks.append(np.stack([np.abs(np.exp(r) - np.exp(o))[m], (r - o)[m], (o - r)[m]]))
    lr = np.where(m, o - r, 0.0).reshape(-1, old.shape[-1])
    n = m.reshape(-1, old.shape[-1]).sum(-1)
    seqs.append(np.stack([lr.sum(-1)[n > 0], n[n > 0]]))
  tok, seq = np.concatenate(toks, 1), np.concatenate(seqs, 1)
  w = np.exp(np.clip(tok[2], -20, 20))
  seq_w = np.repeat(np.exp(np.clip(seq[0], -20, 20)), seq[1].astype(int))
  high = np.mean(seq[0] > np.log(thr)) if mode == "sequence" else np.mean(w > thr)
  return {
    "training/rollout_probs_diff_max": tok[0].max(),
    "training/rollout_probs_diff_mean": tok[0].mean(),
    "training/rollout_probs_diff_std": tok[0].std(ddof=1),
    "rollout_corr/kl": tok[1].mean(),
    "rollout_corr/k3_kl": np.mean(np.expm1(tok[2]) - tok[2]),
    "rollout_corr/log_ppl_diff": np.mean(-seq[0] / seq[1]),
    "rollout_corr/log_ppl_abs_diff": np.mean(np.abs(seq[0] / seq[1])),
    "rollout_corr/seq_log_ratio_mean": seq[0].mean(),
    "rollout_corr/seq_log_ratio_abs_max": np.abs(seq[0]).max(),
    "rollout_corr/rollout_is_mean": (seq_w if mode == "sequence" else w).mean(),
    "rollout_corr/rollout_is_ratio_fraction_high": high,
  }


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
def test_mismatch_metrics_over_batches_match_numpy(mode):
  rng = np.random.default_rng(0)
  old, roll, mask = _inputs()
  roll[1, 0] = old[1, 0] - 3.0  # keep the exp's in range for the numpy means
  # A second batch in the packed layout's rank ([NM, W, E, T]) with small drifts.
  old2 = np.log(rng.uniform(0.05, 1.0, (2, 1, 3, 6))).astype(np.float32)
  roll2 = (old2 + rng.normal(0, 0.05, old2.shape)).astype(np.float32)
  mask2 = (rng.uniform(size=old2.shape) < 0.7).astype(np.float32)
  batches = [(old, roll, mask), (old2, roll2, mask2)]
  stats = [rc_lib.correct(*b, mode=mode, threshold=1.05)[1] for b in batches]
  got = rc_lib.combine(jax.device_get(stats), mode=mode)
  want = _np_metrics(batches, mode, 1.05)
  assert got.keys() == want.keys()
  for k, w in want.items():
    assert math.isclose(got[k], w, rel_tol=1e-5, abs_tol=1e-7), (k, got[k], w)
  assert 0 < got["rollout_corr/rollout_is_ratio_fraction_high"] < 1


def test_identical_log_probs_give_zero_mismatch():
  old, _, mask = _inputs()
  got = rc_lib.combine(
    [rc_lib.correct(old, old, mask, mode="token", threshold=2.0)[1]], mode="token"
  )
  assert all(got[k] == 0.0 for k in MISMATCH_KEYS)
  assert got["rollout_corr/rollout_is_mean"] == 1.0


def _np_vanilla(lp, old, adv, mask, w, cfg):
  """verl compute_policy_loss_vanilla with rollout_is_weights, token-mean, float64."""
  ratio = np.exp(np.clip(lp - old, -20, 20))
  l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
  c1 = np.maximum(l1, l2)
  pg = np.where(adv < 0, np.minimum(-adv * cfg.clip_ratio_c, c1), c1) * w
  return np.sum(pg * mask) / (mask.sum() + 1e-8)


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("loss_mode", ["dapo", "grpo", "fipo"])
@pytest.mark.slow
def test_weights_multiply_the_per_token_policy_loss(loss_mode, mode):
  rng = np.random.default_rng(1)
  b, t = 4, 7
  mask = (np.arange(t) < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
  old = np.log(rng.uniform(0.1, 1, (b, t))).astype(np.float32)
  lp = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  roll = (old + rng.normal(0, 0.4, (b, t))).astype(np.float32)
  adv = (rng.normal(size=(b, 1)) * mask).astype(np.float32)
  cfg = losses_lib.PolicyLossConfig(clip_ratio_c=3.0, decay_rate=2.0, chunk_size=4)
  w = rc_lib.is_weights(old, roll, mask, mode=mode, threshold=1.5)
  assert 0 < float(jnp.mean(w[mask > 0] == 1.5)) < 1  # some truncated, some not
  args = (jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
  loss, _ = losses_lib.compute_policy_loss(loss_mode, *args, cfg, rollout_is_weights=w)
  plain, _ = losses_lib.compute_policy_loss(loss_mode, *args, cfg)
  ones, _ = losses_lib.compute_policy_loss(loss_mode, *args, cfg, rollout_is_weights=mask)
  assert float(ones) == float(plain) and abs(float(loss) - float(plain)) > 1e-4
  if loss_mode == "fipo":  # its pg_losses on A * f, sequence drop as the loss applies it
    terms = losses_lib.fipo_terms(*args, cfg)
    pg, keep = np.asarray(terms["pg_losses"]), np.asarray(terms["final_mask"])
    want = np.sum(pg * np.asarray(w) * keep) / (keep.sum() + 1e-8)
  else:
    want = _np_vanilla(lp, old, adv, mask, np.asarray(w), cfg)
  assert math.isclose(float(loss), want, rel_tol=1e-5, abs_tol=1e-7)
  # Detached: no gradient flows through the weights.
  total = lambda o: jnp.sum(rc_lib.is_weights(o, roll, mask, mode=mode, threshold=1e9))
  assert not np.any(np.asarray(jax.grad(total)(jnp.asarray(old))))


@pytest.mark.slow
def test_both_layouts_apply_the_weights_as_the_padded_reference(setup):  # noqa: F811
  s = setup
  rng = np.random.default_rng(2)
  mask = s["rows"]["response_mask"]
  w = (rng.uniform(0.2, 2.0, mask.shape) * mask).astype(np.float32)
  cfg = dataclasses.replace(s["upd"], num_micro_batches=2)
  # Forward only (compiles fast): the sum of the scaled micro-batch losses of each layout.
  loss = jax.jit(functools.partial(steps.micro_batch_loss, cfg=cfg), static_argnums=1)
  micro = lambda b, j: jax.tree.map(lambda x: x[j], b)

  def total(b):
    seqs = jnp.sum(b.seq_mask)
    return sum(
      float(loss(s["params"], s["graphdef"], micro(b, j), seqs)[0])
      for j in range(b.seq_mask.shape[0])
    )

  ref = jax.jit(functools.partial(pl.micro_loss, t=T, cfg=cfg, scale=0.5), static_argnums=1)
  resp = _resp(s, rollout_is_weights=w)
  pick = lambda j: (tuple(x[j::2] for x in s["tokens"]), jax.tree.map(lambda x: x[j::2], resp))
  want = sum(float(ref(s["params"], s["graphdef"], *pick(j))[0]) for j in range(2))
  for batch, plan, shape in (_packed(s, row_len=2 * (P + T), num_micro=2), _padded(s, 2)):
    weighted = batch.replace(rollout_is_weights=jnp.asarray(packing.to_slots(plan, shape, w)))
    got = total(weighted)
    assert math.isclose(got, want, rel_tol=1e-5)
    assert abs(got - total(batch)) > 1e-4


def _config(**rl):
  c = recipes.base()
  c.model.preset = "qwen2.5-0.5b"
  c.model.dtype = "float32"
  c.model.attention_impl = "blockwise"
  for k, v in rl.items():
    setattr(c.rl, k, v)
  return c


def test_validation_of_the_sampler_source():
  assert config_lib.validate(_config(old_log_prob_source="sampler"), check_paths=False)
  with pytest.raises(ConfigError, match=r"rl.old_log_prob_source: .*bfloat16 \(rl.sampler_dtype"):
    config_lib.validate(
      _config(old_log_prob_source="sampler", sampler_dtype="bfloat16"), check_paths=False
    )
  c = _config(old_log_prob_source="sampler")
  c.model.attention_impl = "splash"  # a trainer-only fused kernel
  with pytest.raises(ConfigError, match="attention kernel is 'splash'") as e:
    config_lib.validate(c, check_paths=False)
  assert "\n" not in str(e.value)
  c.rl.accept_sampler_mismatch = True
  assert config_lib.validate(c, check_paths=False).rl.accept_sampler_mismatch
  with pytest.raises(ConfigError, match="rl.rollout_is: 'token' needs rl.old_log_prob_source"):
    config_lib.validate(
      _config(old_log_prob_source="sampler", rollout_is="token"), check_paths=False
    )
  for bad in (
    dict(rollout_is="seq"),
    dict(rollout_is_threshold=0.0),
    dict(old_log_prob_source="engine"),
    dict(mismatch_metrics_every=-1),
    dict(sampler_dtype="fp8"),
  ):
    with pytest.raises(ConfigError, match="rl." + next(iter(bad))):
      config_lib.validate(_config(**bad), check_paths=False)


def test_metrics_due():
  rl = lambda **k: config_lib.validate(_config(**k), check_paths=False).rl
  assert all(sampler_policy.metrics_due(rl(), s) for s in range(5))
  every3 = rl(old_log_prob_source="sampler", mismatch_metrics_every=3)
  due = [sampler_policy.metrics_due(every3, s) for s in range(5)]
  assert due == [True, False, False, True, False]
  never = rl(old_log_prob_source="sampler", mismatch_metrics_every=0)
  assert not any(sampler_policy.metrics_due(never, s) for s in range(5))


def test_cli_refuses_a_bfloat16_sampler_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
    sys.executable,
    "-m",
    "fipo_jax.main",
    "--config",
    str(ROOT / "configs/tiny_cpu.py"),
    "--workdir",
    str(tmp_path),
    "--config.rl.old_log_prob_source=sampler",
    "--config.rl.sampler_dtype=bfloat16",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and "rl.accept_sampler_mismatch=True" in lines[0], proc.stderr


WEIGHT_BOUND_KEYS = ("actor/influence_weights", "actor/raw_influence_weights", "actor/neg_is_",
                     "actor/pos_is_")


@pytest.mark.slow
def test_tiny_cpu_sampler_log_probs_equal_the_trainers(tmp_path, warm_server):
  """float32, same kernels: the first step with old_log_prob_source=sampler matches trainer.

  The trainer-source step is the stored golden one (tests/test_tiny_golden.py checks that the
  same command reproduces it), so only the sampler-source step runs here."""
  trainer = json.loads(golden.GOLDEN.read_text())
  sampler = golden._one_step_metrics(
    tmp_path / "sampler", "--config.rl.old_log_prob_source=sampler", warm=warm_server
  )
  assert sorted(trainer) == sorted(sampler)
  for k, v in trainer.items():
    # FIPO's weights are exp of a discounted sum of up to T = 20 per-token log-ratios, so the
    # sampler's per-token differences (<= 4e-6, checked below) add up to <= 20 * 4e-6 = 8e-5 there.
    # The updates carry those weights into the policy, and the ratio quantiles (`*_is_*`) are
    # single tokens' exp(log-ratio) of the updated policy, not means: the same bound holds there.
    tol = 1e-4 if k.startswith(WEIGHT_BOUND_KEYS) else 1e-5
    assert math.isclose(sampler[k], v, rel_tol=tol, abs_tol=tol), (k, sampler[k], v)
  for k in MISMATCH_KEYS:
    assert 0.0 <= abs(trainer[k]) <= 1e-5, (k, trainer[k])
  assert trainer["rollout_corr/rollout_is_ratio_fraction_high"] == 0.0


@pytest.mark.slow
def test_tiny_cpu_bfloat16_sampler_mismatch_is_visible(tmp_path, warm_server):
  """A bfloat16 sampler against the float32 trainer: every mismatch metric finite and non-zero,
  the magnitudes far above the float32 run's (<= 4e-6 there), and token TIS runs."""
  got = golden._one_step_metrics(
    tmp_path, "--config.rl.sampler_dtype=bfloat16", "--config.rl.rollout_is=token",
    warm=warm_server
  )
  for k in MISMATCH_KEYS:
    assert math.isfinite(got[k]) and got[k] != 0.0, (k, got[k])
  for k in (
    "training/rollout_probs_diff_max",
    "training/rollout_probs_diff_mean",
    "rollout_corr/seq_log_ratio_abs_max",
    "rollout_corr/log_ppl_abs_diff",
  ):
    assert got[k] > 1e-4, (k, got[k])
  assert math.isfinite(got["actor/pg_loss"]) and got["rollout_corr/rollout_is_mean"] != 1.0


class _FakeSteps:
  """The trainer's jitted steps, faked: the actor's log-probs are the sampler's + 0.1."""

  def __init__(self):
    self.calls = 0

  def log_prob(self, params, b):
    self.calls += 1
    return b.old_log_probs + 0.1 * b.response_mask, jnp.ones_like(b.old_log_probs)


def _run_log_probs(step: int, **rl):
  rng = np.random.default_rng(3)
  mask = (np.arange(5) < np.array([[5], [2], [0]])).astype(np.float32)
  batches = [
    steps.Batch(
      input_ids=None,
      segment_ids=None,
      positions=None,
      token_index=None,
      response_mask=jnp.asarray(mask),
      advantages=jnp.asarray(mask),
      old_log_probs=jnp.asarray(-rng.uniform(0, 2, mask.shape) * mask),
      seq_mask=None,
      seq_index=None,
    )
    for _ in range(2)
  ]
  rc = config_lib.validate(_config(**rl), check_paths=False)
  fake, metrics = _FakeSteps(), {}
  env = types.SimpleNamespace(ref_params=None)
  state = setup_lib.TrainState(params=None, opt_state=None, step=step)
  out, tokens = log_probs.compute(rc, env, fake, state, batches, metrics)
  assert tokens == 2 * mask.sum()
  return batches, out, fake.calls, metrics


def test_trainer_source_replaces_old_log_probs_and_weighs():
  batches, out, calls, metrics = _run_log_probs(0, rollout_is="token", rollout_is_threshold=1.05)
  assert calls == 2 and metrics["actor/entropy"] == 1.0
  for b, o in zip(batches, out, strict=True):
    np.testing.assert_allclose(o.old_log_probs, b.old_log_probs + 0.1 * b.response_mask)
    np.testing.assert_allclose(o.rollout_is_weights, b.response_mask * 1.05, rtol=1e-6)
  assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == 1.0  # e^0.1 > 1.05
  assert math.isclose(metrics["rollout_corr/kl"], -0.1, rel_tol=1e-5)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_sampler_source_keeps_its_log_probs_and_skips_the_pass(step):
  batches, out, calls, metrics = _run_log_probs(
    step, old_log_prob_source="sampler", mismatch_metrics_every=2
  )
  due = step % 2 == 0
  assert calls == (2 if due else 0)
  assert ("training/rollout_probs_diff_max" in metrics) == due
  assert ("actor/entropy" in metrics) == due
  for b, o in zip(batches, out, strict=True):
    assert o.old_log_probs is b.old_log_probs and o.rollout_is_weights is None


@pytest.mark.slow
def test_bfloat16_sampler_model_runs_the_trainers_params():
  cfg = models.ModelConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    dtype="float32",
    attention_impl="blockwise",
  )
  graphdef, params = nnx.split(models.init_model(cfg, seed=0))
  assert sampler_policy.sampler_model(cfg, graphdef, None) == (cfg, graphdef)
  assert sampler_policy.sampler_model(cfg, graphdef, "float32") == (cfg, graphdef)
  bf_cfg, bf_graphdef = sampler_policy.sampler_model(cfg, graphdef, "bfloat16")
  assert bf_cfg.dtype == "bfloat16" and bf_cfg.param_dtype == cfg.param_dtype
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  f32 = nnx.merge(graphdef, params)(ids)
  bf16 = nnx.merge(bf_graphdef, params)(ids)
  gap = float(jnp.max(jnp.abs(bf16 - f32)))
  assert 0 < gap < 0.1 * float(jnp.max(jnp.abs(f32)))
