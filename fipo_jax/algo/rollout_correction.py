"""Sampler-trainer agreement: mismatch metrics and truncated rollout importance sampling.

The sampler returns, for every response token, log pi_sampler = log_softmax(logits / T) of
the model it ran (`Sample.response_logprobs`); the trainer's old-log-prob pass recomputes the
same quantity as log pi_old. They differ only where the two compute differently (a bfloat16
sampler, another attention kernel); in float32 with the same kernels they agree within 1e-5.

Semantics follow verl's rollout correction (docs/fipo_spec.md §11; verl
`trainer/ppo/rollout_corr_helper.py` and `utils/debug/metrics.py`, volcengine/verl at
0b4e2a8 / 123d744):

  log_ratio = log pi_old - log pi_sampler                          [..., T]
  token:    w_t = min(exp(clamp(log_ratio_t, -20, 20)), threshold)
  sequence: w_t = min(exp(clamp(sum_t log_ratio_t, -20, 20)), threshold) for every t of the row
  w = 0 on masked tokens, detached; the policy loss is agg(pg_losses * w).

Pure jax/numpy (the algorithm package): which model the sampler runs and on which steps the
trainer checks it are the training system's (`fipo_jax.rl.sampler_policy`).

Every function here is layout-agnostic: the last axis is T, every leading index is one
sequence slot (padded [B, T] rows or packed [NM, W, E, T] slots; an empty slot has mask 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "token", "sequence")  # rl.rollout_is
_SAFETY_BOUND = 20.0  # verl SAFETY_BOUND: log-ratios clamped to [-20, 20] before exp


def _log_ratio(old_log_probs, rollout_log_probs, mask):
  """log pi_old - log pi_sampler [..., T], 0 on masked tokens (pads may hold anything)."""
  d = old_log_probs.astype(jnp.float32) - rollout_log_probs.astype(jnp.float32)
  return jnp.where(mask > 0, d, 0.0)


def _untruncated(log_ratio, mask, mode: str):
  """verl's weights before truncation [..., T]: per token, or the row's product broadcast."""
  if mode == "sequence":
    log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True)
  w = jnp.exp(jnp.clip(log_ratio, -_SAFETY_BOUND, _SAFETY_BOUND))
  return jnp.where(mask > 0, jnp.broadcast_to(w, mask.shape), 0.0)


def is_weights(old_log_probs, rollout_log_probs, mask, *, mode: str, threshold: float):
  """Truncated, detached rollout IS weights f32[..., T] (0 on masked tokens).

  mode 'token' or 'sequence' (verl's rollout_is); a weight equal to the threshold stays.
  """
  if mode not in MODES[1:]:
    raise ValueError(f"rollout_is mode {mode!r} not in {MODES[1:]}")
  w = _untruncated(_log_ratio(old_log_probs, rollout_log_probs, mask), mask, mode)
  return jax.lax.stop_gradient(jnp.minimum(w, jnp.float32(threshold)))


def batch_stats(old_log_probs, rollout_log_probs, mask, *, mode: str, threshold: float):
  """Sufficient statistics {name: f32[]} of one batch, combined over batches by `combine`.

  Token terms over response tokens (n_tok of them), sequence terms over the slots holding
  at least one response token (n_seq).
  """
  m = mask > 0
  old = old_log_probs.astype(jnp.float32)
  roll = rollout_log_probs.astype(jnp.float32)
  lr = _log_ratio(old, roll, mask)
  n_tok = jnp.sum(m.astype(jnp.float32))
  diff = jnp.where(m, jnp.abs(jnp.exp(roll) - jnp.exp(old)), 0.0)
  diff_mean = jnp.sum(diff) / jnp.maximum(n_tok, 1.0)
  lr_safe = jnp.clip(lr, -_SAFETY_BOUND, _SAFETY_BOUND)
  seq_len = jnp.sum(m.astype(jnp.float32), axis=-1)
  present = seq_len > 0
  seq_lr = jnp.sum(lr, axis=-1)  # log of the sequence-level IS weight
  log_ppl_diff = jnp.where(present, -seq_lr / jnp.maximum(seq_len, 1.0), 0.0)
  w = _untruncated(lr, mask, "sequence" if mode == "sequence" else "token")
  if mode == "sequence":  # verl: the share of sequences over the threshold
    high = jnp.sum((present & (seq_lr > math.log(threshold))).astype(jnp.float32))
  else:  # the share of tokens
    high = jnp.sum((m & (w > threshold)).astype(jnp.float32))
  return {
    "n_tok": n_tok,
    "n_seq": jnp.sum(present.astype(jnp.float32)),
    "diff_max": jnp.max(diff),  # diff >= 0 and 0 off the mask
    "diff_mean": diff_mean,
    "diff_m2": jnp.sum(jnp.where(m, jnp.square(diff - diff_mean), 0.0)),
    "kl_sum": -jnp.sum(lr),  # sum of log pi_sampler - log pi_old
    "abs_log_ratio_sum": jnp.sum(jnp.abs(lr)),  # partial rollouts: |lp_prox - lp_behav|
    "k3_sum": jnp.sum(jnp.where(m, jnp.expm1(lr_safe) - lr_safe, 0.0)),
    "log_ppl_diff_sum": jnp.sum(log_ppl_diff),
    "log_ppl_abs_diff_sum": jnp.sum(jnp.abs(log_ppl_diff)),
    "seq_log_ratio_sum": jnp.sum(jnp.where(present, seq_lr, 0.0)),
    "seq_log_ratio_abs_max": jnp.max(jnp.where(present, jnp.abs(seq_lr), 0.0)),
    "is_high": high,
    "is_weight_sum": jnp.sum(w),
  }


def combine(stats: Sequence[dict], *, mode: str) -> dict[str, float]:
  """The step's mismatch metrics from the batches' `batch_stats` (host, float64).

  verl names: training/rollout_probs_diff_{max,mean,std} (|p_sampler - p_old| per token, std
  with Bessel's correction as torch.std), rollout_corr/kl (token mean of log pi_sampler -
  log pi_old, KL(sampler || trainer)), rollout_corr/k3_kl, rollout_corr/log_ppl_diff and
  log_ppl_abs_diff (per-sequence token-mean log-ratio sampler - trainer, averaged over
  sequences), rollout_corr/rollout_is_mean (untruncated weight, token mean) and
  rollout_is_ratio_fraction_high (share over the threshold: tokens, or sequences in
  'sequence' mode). Ours: rollout_corr/seq_log_ratio_{mean,abs_max}, the log of the
  sequence-level weight, sum_t (log pi_old - log pi_sampler).
  """
  s = {k: np.asarray([float(x[k]) for x in stats], np.float64) for k in stats[0]}
  n, n_seq = s["n_tok"].sum(), s["n_seq"].sum()
  mean = float(np.sum(s["n_tok"] * s["diff_mean"]) / max(n, 1.0))
  # Chan et al.'s pairwise update: per-batch centred sums, then the between-batch term.
  m2 = float(np.sum(s["diff_m2"]) + np.sum(s["n_tok"] * np.square(s["diff_mean"] - mean)))
  tok = lambda k: float(s[k].sum() / max(n, 1.0))
  seq = lambda k: float(s[k].sum() / max(n_seq, 1.0))
  return {
    "training/rollout_probs_diff_max": float(s["diff_max"].max()),
    "training/rollout_probs_diff_mean": mean,
    "training/rollout_probs_diff_std": math.sqrt(max(m2, 0.0) / max(n - 1.0, 1.0)),
    "rollout_corr/kl": tok("kl_sum"),
    "rollout_corr/k3_kl": tok("k3_sum"),
    "rollout_corr/log_ppl_diff": seq("log_ppl_diff_sum"),
    "rollout_corr/log_ppl_abs_diff": seq("log_ppl_abs_diff_sum"),
    "rollout_corr/seq_log_ratio_mean": seq("seq_log_ratio_sum"),
    "rollout_corr/seq_log_ratio_abs_max": float(s["seq_log_ratio_abs_max"].max()),
    "rollout_corr/rollout_is_mean": tok("is_weight_sum"),
    "rollout_corr/rollout_is_ratio_fraction_high": (
      seq("is_high") if mode == "sequence" else tok("is_high")
    ),
  }


def _correct(old_log_probs, rollout_log_probs, mask, *, mode: str, threshold: float):
  stats = batch_stats(old_log_probs, rollout_log_probs, mask, mode=mode, threshold=threshold)
  if mode == "none":
    return None, stats
  return is_weights(old_log_probs, rollout_log_probs, mask, mode=mode, threshold=threshold), stats


# (old_log_probs, rollout_log_probs, mask) -> (weights [..., T] or None, batch_stats), jitted.
correct = jax.jit(_correct, static_argnames=("mode", "threshold"))
