"""GPU decode attention through JAX's Pallas paged attention, the new token written first.

`jax.experimental.pallas.ops.gpu.paged_attention` (Triton) takes k/v pages [K, pages, page, H]
and returns no log-sum-exp, so the new token's k/v cannot be merged afterwards as the gather
kernels of models/paged.py do: each layer writes its token into the pool first, then calls it.

Pool layout for this kernel: k, v [K, L, Pg, page, H] each (`PagedLayout.folded`); one
shard's block reshapes for free to [K, L * Pg, page, H] (the layer folded into the page ids:
page p of layer l is page l * Pg + p), so the kernel gets the whole layer-scan-carried pool
and reads it in place; `pool[layer]` would be a per-layer slice XLA copies (docs/kernels.md
measures that for TPU).

The kernel does not scale scores: q is scaled by H**-0.5 in float32 and cast back to its dtype
before the call. In float32 that equals the trainer's float32-scores-then-scale up to float32
rounding; in bf16 the scaled q is rounded to bf16 first (exact when H**-0.5 is a power of two:
H = 16, 64, 256), so `attention.sampler_mismatch` names it.

Triton constraints (the Pallas Triton lowering wants power-of-two block sizes, tl.dot 16 or
more rows): head_dim a power of two >= 16 and the page size a power of two
(kernels.gpu_paged_fits); the page table is padded so the blocks and splits divide it.
Shapes: B slots, N query heads, K kv heads, H head_dim, L layers, Pg pages per layer, M pages
per slot at most.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged

_MAX_SPLITS = 16  # the kernel's default k_splits: programs a long slot spreads over


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def blocking(m: int, page: int, pages_per_block: int) -> tuple[int, int, int]:
  """(k_splits, pages per compute block, padded M) for a page table of M pages per slot.

  The compute block is a power of two of pages with at least 16 keys (Triton's dot); the
  kernel wants padded M % k_splits == 0 and the pages per split a multiple of the block.
  Padding pages lie past every slot's length: the kernel skips them.
  """
  block = _pow2_floor(min(pages_per_block, m))
  block = max(block, -(-16 // page))
  block = 1 << (block - 1).bit_length()  # 16 / page rounded up to a power of two
  blocks = -(-m // block)
  k_splits = min(_MAX_SPLITS, blocks)
  return k_splits, block, -(-blocks // k_splits) * k_splits * block


def write_and_attend(
  pool_k, pool_v, layer, q, k_new, v_new, page_table, lengths, active, *,
  pages_per_block: int = 8, interpret: bool = False,
):  # fmt: skip
  """One layer's decode: write each active slot's token at its length, then attend.

  pool_k, pool_v [K, L, Pg, page, H]; layer int32[]; q [B, N, H]; k_new, v_new [B, K, H];
  page_table int32[B, M] (page ids within a layer); lengths int32[B] tokens held before this
  one; active bool[B] (an inactive slot writes nothing; its output is unused).
  interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns (pool_k, pool_v, out [B, N, H]).
  """
  shape = pool_k.shape
  per_layer, page = shape[2], shape[3]
  total = shape[1] * per_layer
  # [K, L * Pg, page, H]: a free reshape, the layer folded into the page ids.
  pool_k, pool_v = (x.reshape(shape[0], total, *shape[3:]) for x in (pool_k, pool_v))
  page_id = jnp.take_along_axis(page_table, (lengths // page)[:, None], axis=1, mode="clip")
  rows = jnp.where(active, layer * per_layer + page_id[:, 0], total)  # out of range: dropped
  off = lengths % page

  def put(pool, new):  # pool[:, rows, off] is [K, B, H]
    return pool.at[:, rows, off].set(new.swapaxes(0, 1).astype(pool.dtype), mode="drop")

  pool_k, pool_v = put(pool_k, k_new), put(pool_v, v_new)
  k_splits, block, padded = blocking(page_table.shape[1], page, pages_per_block)
  table = jnp.pad(page_table, ((0, 0), (0, padded - page_table.shape[1]))) + layer * per_layer
  qs = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
  out = gpu_paged.paged_attention(
    qs, pool_k, pool_v, table, jnp.where(active, lengths + 1, 1).astype(jnp.int32),
    k_splits=k_splits, pages_per_compute_block=block, interpret=interpret,
  )  # fmt: skip
  return pool_k.reshape(shape), pool_v.reshape(shape), out
