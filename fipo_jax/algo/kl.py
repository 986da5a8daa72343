"""The KL-to-reference term: verl's actor-side `use_kl_loss` (kl_penalty, kl_loss)."""

import jax
import jax.numpy as jnp

from fipo_jax.algo import aggregation

KL_TYPES = ("kl", "abs", "mse", "low_var_kl")  # verl's kl_loss_type names (k1, -, k2, k3)
DEFAULT_KL_TYPE = "low_var_kl"  # rl.kl_loss_type's default (k3, verl's GRPO example)
_KL_LOG_RATIO_CLAMP = 20.0  # verl low_var_kl: clamp(ref - lp, -20, 20) before exp
_KL_VALUE_CLAMP = 10.0  # ... and the estimate to [-10, 10]


def kl_penalty(log_prob: jax.Array, ref_log_prob: jax.Array, kl_type: str) -> jax.Array:
  """verl `kl_penalty`: per-token estimate [B, T] of KL(pi || ref) from sampled tokens.

  'kl' (k1) lp - ref; 'abs' |lp - ref|; 'mse' (k2) (lp - ref)^2 / 2; 'low_var_kl' (k3)
  exp(k) - k - 1 with k = clamp(ref - lp, -20, 20), the result clamped to [-10, 10] (torch's
  clamp gradients).
  """
  if kl_type == "kl":
    return log_prob - ref_log_prob
  if kl_type == "abs":
    return jnp.abs(log_prob - ref_log_prob)
  if kl_type == "mse":
    return 0.5 * jnp.square(log_prob - ref_log_prob)
  if kl_type == "low_var_kl":
    k = aggregation.torch_clamp(ref_log_prob - log_prob, -_KL_LOG_RATIO_CLAMP, _KL_LOG_RATIO_CLAMP)
    return aggregation.torch_clamp(jnp.exp(k) - k - 1.0, -_KL_VALUE_CLAMP, _KL_VALUE_CLAMP)
  raise ValueError(f"unknown kl_loss_type {kl_type!r}; expected one of {KL_TYPES}")


def kl_loss(log_prob, ref_log_prob, response_mask, kl_type: str, loss_agg_mode: str):
  """verl's actor KL loss: `agg_loss(kl_penalty(lp, ref), mask, loss_agg_mode)` -> f32[]."""
  kld = kl_penalty(log_prob.astype(jnp.float32), ref_log_prob.astype(jnp.float32), kl_type)
  return aggregation.agg_loss(kld, response_mask, loss_agg_mode)
