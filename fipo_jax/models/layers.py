"""Pure per-layer math: RMSNorm, rotary embeddings, SwiGLU MLP, QKV projections.

Functions take plain arrays (one layer's slice of the stacked params) so the decoder can run
them inside `lax.scan`. Norms and RoPE run in float32 and cast back, as transformers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis: f32 statistics, result cast to x.dtype, then * scale."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
  return jnp.broadcast_to(scale.astype(x.dtype), normed.shape) * normed


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float
                 ) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables f32[B, Q, H] for int positions [B, Q] (HF's half-split layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, Q, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, Q, n, H] (n = N or K heads) by cos/sin [B, Q, H] (rotate_half), in f32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
  """einsum in the compute dtype (weights cast from their storage dtype)."""
  return jnp.einsum(spec, x, w.astype(dtype))


def swiglu_mlp(x: jax.Array, p: dict, dtype) -> jax.Array:
  """down(silu(gate(x)) * up(x)); x [B, Q, D] -> [B, Q, D]."""
  gate = dense(x, p["gate_proj"], "btd,df->btf", dtype)
  up = dense(x, p["up_proj"], "btd,df->btf", dtype)
  return dense(jax.nn.silu(gate) * up, p["down_proj"], "btf,fd->btd", dtype)


def qkv_proj(x: jax.Array, p: dict, cfg, cos: jax.Array, sin: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Projects x [B, Q, D] to q [B, Q, N, H], k, v [B, Q, K, H], with bias, q/k norm, RoPE."""
  dtype = x.dtype
  q = dense(x, p["q_proj"], "btd,dnh->btnh", dtype)
  k = dense(x, p["k_proj"], "btd,dkh->btkh", dtype)
  v = dense(x, p["v_proj"], "btd,dkh->btkh", dtype)
  if cfg.qkv_bias:
    q = q + p["q_bias"].astype(dtype)[None, None]
    k = k + p["k_bias"].astype(dtype)[None, None]
    v = v + p["v_bias"].astype(dtype)[None, None]
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
