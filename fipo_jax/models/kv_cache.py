"""Static-shape KV cache with per-row write positions (continuous batching friendly).

A call with Q new tokens for row b writes them at slots [index[b], index[b] + Q), sets `mask`
there from the attention mask (pads stay False) and advances index[b] by Q. New token i of row
b attends to slots j with mask[b, j] and j <= index_old[b] + i. The caller keeps
index[b] + Q <= S (writes past the end are dropped, and those tokens are lost). Writes are
scatters, so a jitted step that donates the cache updates it in place. This dense layout serves
prefill and the sampler's reference mode (EngineConfig(kv_layout='dense')); decode defaults to
the paged cache of models/paged.py.
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


def _slots(index: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
  """Row ids [B, 1] and write slots [B, Q] = index[b] + arange(Q)."""
  rows = jnp.arange(index.shape[0], dtype=jnp.int32)[:, None]
  return rows, index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [B, Q, ...] into buf [B, S, ...] at per-row offsets index [B].

  A scatter (in place under donation, unlike a vmapped dynamic_update_slice); writes past S
  are dropped.
  """
  rows, slots = _slots(index, new.shape[1])
  return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def write_layer_rows(buf: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array
                     ) -> jax.Array:
  """Writes new [B, Q, K, H] into buf [L, B, S, K, H] at `layer`, row offsets index [B]."""
  rows, slots = _slots(index, new.shape[1])
  return buf.at[layer, rows, slots].set(new.astype(buf.dtype), mode="drop")


def update_mask(cache: KVCache, new_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (mask with the new tokens' validity written, new index)."""
  t = new_mask.shape[1]
  mask = write_rows(cache.mask, new_mask.astype(bool), cache.index)
  return mask, cache.index + t
