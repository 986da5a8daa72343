"""GPU decode attention through JAX's Pallas paged attention, the new token written first.

`jax.experimental.pallas.ops.gpu.paged_attention` (Triton) takes k/v pages [K, pages, page, H]
and returns no log-sum-exp, so the new token's k/v cannot be merged afterwards as
models/paged.py does: each layer writes its token into the pool first, then calls it.

Pool layout for this kernel: k, v [K, L * Pg, page, H] (the layer folded into the page ids:
page p of layer l is page l * Pg + p), so the kernel gets the whole layer-scan-carried pool
and reads it in place; `pool[layer]` of an [L, K, Pg, page, H] pool would be a per-layer slice
XLA copies (docs/kernels.md measures that for TPU). The kernel does not scale: q is scaled by
H**-0.5 in its dtype before the call, so in bf16 its scores round differently from the
trainer's float32-then-scale (float32 compute is exact to the trainer's order).

Not yet wired into the engine (docs/kernels.md says what that needs).
Shapes: B slots, N query heads, K kv heads, H head_dim, L layers, Pg pages per layer, M pages
per slot at most.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged


def _splits(m: int, pages_per_block: int) -> tuple[int, int]:
  """(k_splits, pages per compute block): the kernel wants M % k_splits == 0 and the pages per
  split a multiple of the block; up to 16 splits spread a long slot over programs."""
  k_splits = max(d for d in range(1, 17) if m % d == 0)
  per_split = m // k_splits
  block = max(d for d in range(1, min(pages_per_block, per_split) + 1) if per_split % d == 0)
  return k_splits, block


def write_and_attend(
  pool_k, pool_v, layer, q, k_new, v_new, page_table, lengths, active, *, num_layers: int,
  pages_per_block: int = 8, interpret: bool | None = None,
):  # fmt: skip
  """One layer's decode: write each active slot's token at its length, then attend.

  pool_k, pool_v [K, L * Pg, page, H]; layer int32[]; q [B, N, H]; k_new, v_new [B, K, H];
  page_table int32[B, M] (page ids within a layer); lengths int32[B] tokens held before this
  one; active bool[B] (an inactive slot writes nothing; its output is unused).
  interpret=None runs the compiled kernel on GPU and the Pallas interpreter elsewhere.
  Returns (pool_k, pool_v, out [B, N, H]).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  total, page = pool_k.shape[1], pool_k.shape[2]
  per_layer = total // num_layers
  page_id = jnp.take_along_axis(page_table, (lengths // page)[:, None], axis=1, mode="clip")
  rows = jnp.where(active, layer * per_layer + page_id[:, 0], total)  # out of range: dropped
  off = lengths % page

  def put(pool, new):  # pool[:, rows, off] is [K, B, H]
    return pool.at[:, rows, off].set(new.swapaxes(0, 1).astype(pool.dtype), mode="drop")

  pool_k, pool_v = put(pool_k, k_new), put(pool_v, v_new)
  k_splits, block = _splits(page_table.shape[1], pages_per_block)
  qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  out = gpu_paged.paged_attention(
    qs, pool_k, pool_v, page_table + layer * per_layer, jnp.where(active, lengths + 1, 1),
    k_splits=k_splits, pages_per_compute_block=block, interpret=interpret,
  )  # fmt: skip
  return pool_k, pool_v, out
