"""Static-shape KV cache with per-row write positions (continuous batching friendly).

A call with T new tokens for row b writes them at slots [index[b], index[b] + T), sets `mask`
there from the attention mask (pads stay False) and advances index[b] by T. New token i of row
b attends to slots j with mask[b, j] and j <= index_old[b] + i. The caller keeps
index[b] + T <= S (writes past the end are clamped by dynamic_update_slice and would corrupt
the row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  mask: jax.Array  # bool[B, S]: slot holds a real token
  index: jax.Array  # int32[B]: next write slot per row

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """Zeros cache for `cfg`; dtype defaults to the compute dtype."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 mask=jnp.zeros((batch_size, max_len), bool),
                 index=jnp.zeros((batch_size,), jnp.int32))


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buf [B, S, ...] at per-row offsets index [B]."""

  def one(b_buf, b_new, i):
    starts = (i,) + (0,) * (b_buf.ndim - 1)
    return jax.lax.dynamic_update_slice(b_buf, b_new.astype(b_buf.dtype), starts)

  return jax.vmap(one)(buf, new, index)


def update_mask(cache: KVCache, new_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (mask with the new tokens' validity written, new index)."""
  t = new_mask.shape[1]
  mask = write_rows(cache.mask, new_mask.astype(bool), cache.index)
  return mask, cache.index + t
