"""TPU decode attention through JAX's ragged paged attention kernel, the new token written first.

`jax.experimental.pallas.ops.tpu.ragged_paged_attention` (the kernel behind vLLM-TPU) reads
the cache and returns no log-sum-exp, so the new token's k/v cannot be merged afterwards as
models/paged.py does; here each layer writes its token into the pool first, then calls it.

Pool layout for this kernel: kv [L, Pg, page, 2K, H], the layer leading and k/v heads
interleaved (k0, v0, k1, v1, ...) as the kernel reads them. The layer is folded into the page
ids: page p of layer l is row l * Pg + p of the pool reshaped to [L * Pg, page, 2K, H] (a free
reshape), so the kernel reads the layer-scan-carried pool in place. Passing `pool[layer]`
instead makes XLA materialise one layer's pool per layer per step (libtpu 0.0.52, v5p AOT: a
[1, Pg, page, 2K, H] dynamic-slice, temp memory growing with the pool); the AOT test
tests/test_tpu_paged_aot.py pins the difference. The kernel scales float32 scores by
H**-0.5, as the trainer's kernels do.

The engine calls it through models/paged.py (`write_and_attend`) when kernels.decode_kernel
chooses 'ragged_paged_attention' (TPU); the pool then has this layout and the decode layer
scan carries it (models/transformer.py). Neither Pallas interpreter of jax 0.10.2 runs this
kernel, and JAX's own reference (`ref_ragged_paged_attention`) is eager only (it loops over
concrete lengths), so CPU runs `reference_attention`: the kernel's decode semantics in
jittable JAX, pinned to JAX's reference in tests/test_tpu_paged.py.

Shapes: B slots, N query heads, K kv heads, H head_dim, L layers, Pg pages per layer, M pages
per slot at most.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa


def combine(k: jax.Array, v: jax.Array) -> jax.Array:
  """k, v [..., K, H] -> [..., 2K, H] interleaved k0, v0, k1, v1, ... (the kernel's layout)."""
  return jnp.stack([k, v], axis=-2).reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def write_and_attend(
  pool, layer, q, k_new, v_new, page_table, lengths, active, *, pages_per_block: int = 8,
  queries_per_block: int = 8, reference: bool = False,
):  # fmt: skip
  """One layer's decode: write each active slot's token at its length, then attend.

  pool [L, Pg, page, 2K, H]; layer int32[]; q [B, N, H]; k_new, v_new [B, K, H]; page_table
  int32[B, M] (page ids within a layer); lengths int32[B] tokens held before this one; active
  bool[B] (an inactive slot writes nothing; its output is garbage and unused).
  reference: run `reference_attention` instead of the kernel (CPU; jittable).
  Returns (pool, out [B, N, H]).
  """
  num_layers, num_pages, page = pool.shape[:3]
  b = q.shape[0]
  page_id = jnp.take_along_axis(page_table, (lengths // page)[:, None], axis=1, mode="clip")
  rows = jnp.where(active, layer * num_pages + page_id[:, 0], num_layers * num_pages)  # drop
  flat = pool.reshape(num_layers * num_pages, *pool.shape[2:])
  new = combine(k_new, v_new).astype(pool.dtype)
  flat = flat.at[rows, lengths % page].set(new, mode="drop")
  # An inactive slot reads one token of its first page (kv_lens >= 1 keeps its softmax finite).
  kv_lens = jnp.where(active, lengths + 1, 1).astype(jnp.int32)
  if reference:
    kernel = reference_attention
  else:
    kernel = functools.partial(
      rpa.ragged_paged_attention, num_queries_per_block=queries_per_block,
      num_kv_pages_per_block=min(pages_per_block, page_table.shape[1]),
    )  # fmt: skip
  out = kernel(
    q, flat, kv_lens, page_table + layer * num_pages, jnp.arange(b + 1, dtype=jnp.int32),
    jnp.array([b], jnp.int32), sm_scale=q.shape[-1] ** -0.5,
  )  # fmt: skip
  return flat.reshape(pool.shape), out


def reference_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale):
  """rpa.ragged_paged_attention for one query per sequence (decode), in jittable JAX.

  q [B, N, H]; kv_pages [P, page, 2K, H] (k/v interleaved); kv_lens int32[B]; page_indices
  int32[B, M]; cu_q_lens must be arange(B + 1) and num_seqs [B] (decode: not read). As JAX's
  `ref_ragged_paged_attention`: float32 scores times sm_scale, the softmax cast to the pool's
  dtype before meeting V. Returns [B, N, H] in q's dtype.
  """
  del cu_q_lens, num_seqs
  b, n, h = q.shape
  kh = kv_pages.shape[2] // 2
  kv = kv_pages[page_indices].reshape(b, -1, 2 * kh, h)  # [B, M * page, 2K, H]
  k, v = kv[:, :, 0::2], kv[:, :, 1::2]
  qg = q.reshape(b, kh, n // kh, h)
  s = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
  valid = jnp.arange(kv.shape[1], dtype=jnp.int32)[None] < kv_lens[:, None]  # [B, S]
  s = jnp.where(valid[:, None, None], s, rpa.DEFAULT_MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgs,bskh->bkgh", p, v).reshape(b, n, h).astype(q.dtype)
