"""A paged KV cache for decoding: a page pool, a page table per slot, length-aware attention.

Layout: the pool k, v [L, K, Pg, page, H] (Pg pages of `page` tokens), a page table
int32[B, M] (M = pages per slot at most) and lengths int32[B]. A slot holds its tokens
contiguously in its pages, so token j of slot b sits in page page_table[b, j // page] at
offset j % page and is valid iff j < lengths[b].

Decode attention reads the pool as a loop invariant and gathers only the pages of the blocks
up to the batch's last live one (a dynamic trip count), with an online softmax seeded by the
new token's own k/v; the new k/v of every layer come back from the layer scan and are
scattered into the pool once per step (`write_tokens`), so no step copies the pool.

With the TPU ragged paged attention kernel (kernels.RPA_KERNELS, `PagedLayout.combined`) the
pool is one array k [L, Pg, page, 2K, H] (k/v heads interleaved, v None), the layout that
kernel reads; the decode layer scan carries it and each layer writes its token before the
kernel reads the pool (`write_and_attend`, models/tpu_paged.py). With the GPU Pallas paged
attention kernel (kernels.GPU_PAGED_KERNELS, `PagedLayout.folded`) the pools are k, v
[K, L, Pg, page, H] and the scan carries them the same way (models/gpu_paged.py).

Sharding: with a mesh whose batch axes split the B slots over D shards, the pool's pages are
split the same way and a slot's page ids are local to its shard; attention and writes run
under `shard_map` (pages and slots over the batch axes, kv heads over `tensor`), so every
gather and scatter stays on the shard that holds the pages and no pool is ever all-gathered.

Shapes: B slots, N query heads, K kv heads, G = N / K, H head_dim, L layers, Pg pages (per
shard inside shard_map), R inserted requests, P prefill bucket length.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fipo_jax.models import gpu_paged, kernels, tpu_paged

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class PagedLayout:
  """Static facts about the pool (hashable: part of the cache's tree structure)."""

  page_size: int
  pages_per_block: int  # pages gathered per attention loop step
  mesh: jax.sharding.Mesh | None = None
  batch_axes: tuple[str, ...] = ()  # mesh axes splitting slots and pages
  kv_axes: tuple[str, ...] = ()  # mesh axes splitting kv (and query) heads
  kernel: str | None = None  # decode formulation (kernels.DECODE_KERNELS); None: by platform
  # (the engine sets it from kernels.decode_kernel(platform, model cfg))

  @property
  def decode_kernel(self) -> str:
    """The decode attention formulation: `kernel`, or kernels.decode_kernel's choice for the
    platform of the mesh's devices (an AOT topology's included)."""
    return self.kernel or kernels.decode_kernel(kernels.platform_of(self.mesh))

  @property
  def combined(self) -> bool:
    """The pool is one [L, Pg, page, 2K, H] array (the ragged paged attention kernel's)."""
    return self.decode_kernel in kernels.RPA_KERNELS

  @property
  def folded(self) -> bool:
    """The pools are k, v [K, L, Pg, page, H] (the GPU paged attention kernel's)."""
    return self.decode_kernel in kernels.GPU_PAGED_KERNELS

  @property
  def carried(self) -> bool:
    """The decode layer scan carries the pool and each layer writes its token before its
    kernel reads the pool (`write_and_attend`); else the pool is read and written after."""
    return self.combined or self.folded

  @property
  def num_shards(self) -> int:
    if self.mesh is None:
      return 1
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def pool_spec(self) -> PartitionSpec:
    if self.combined:  # [L, Pg, page, 2K, H]: a kv head's k and v are adjacent, split together
      return PartitionSpec(None, _axes(self.batch_axes), None, _axes(self.kv_axes), None)
    if self.folded:  # [K, L, Pg, page, H]
      return PartitionSpec(_axes(self.kv_axes), None, _axes(self.batch_axes), None, None)
    return PartitionSpec(None, _axes(self.kv_axes), _axes(self.batch_axes), None, None)

  def slot_spec(self, ndim: int) -> PartitionSpec:
    return PartitionSpec(_axes(self.batch_axes), *([None] * (ndim - 1)))


def _axes(axes: tuple[str, ...]):
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


@flax.struct.dataclass
class PagedCache:
  k: jax.Array  # [L, K, Pg, page, H]; combined: k and v [L, Pg, page, 2K, H]; folded: [K, L, ..]
  v: jax.Array | None  # [L, K, Pg, page, H]; layout.combined: None; folded: [K, L, Pg, page, H]
  page_table: jax.Array  # int32[B, M] page ids, local to the slot's shard
  lengths: jax.Array  # int32[B] tokens held (the next write position)
  layout: PagedLayout = flax.struct.field(pytree_node=False)


def init_paged_cache(
  cfg, layout: PagedLayout, num_slots: int, num_pages: int, max_pages: int, dtype=None
) -> PagedCache:
  """Zeros pool of `num_pages` pages (all shards together) and empty slots."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, layout.page_size, cfg.head_dim)
  if layout.combined:
    shape = (cfg.num_layers, num_pages, layout.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
  elif layout.folded:
    shape = (cfg.num_kv_heads, cfg.num_layers, num_pages, layout.page_size, cfg.head_dim)
  return PagedCache(
    k=jnp.zeros(shape, dtype),
    v=None if layout.combined else jnp.zeros(shape, dtype),
    page_table=jnp.zeros((num_slots, max_pages), jnp.int32),
    lengths=jnp.zeros((num_slots,), jnp.int32),
    layout=layout,
  )


def _sharded(layout: PagedLayout, fn, in_specs, out_specs):
  """fn under shard_map over the layout's mesh (as is on one device)."""
  if layout.mesh is None or layout.mesh.size == 1:
    return fn
  return jax.shard_map(
    fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
  )


# ------------------------------------------------------------------ decode attention


def decode_attention(q, k_new, v_new, cache: PagedCache, layer, live) -> jax.Array:
  """q [B, N, H], k_new/v_new [B, K, H] (this step's token), live int32[B] old tokens to see.

  Query b attends to its slot's tokens j < live[b] in layer `layer` of the pool and to its
  own new k/v. Returns [B, N, H] in q's dtype.
  """
  lay = cache.layout
  heads = _axes(lay.kv_axes)
  bspec = _axes(lay.batch_axes)
  kernel = lay.decode_kernel
  if kernel not in kernels.DECODE_KERNELS or lay.carried:
    raise ValueError(f"not a gather decode kernel: {kernel!r}; known: {kernels.DECODE_KERNELS}")
  fn = _sharded(
    lay, lambda *a: _attend_local(*a, pages_per_block=lay.pages_per_block, kernel=kernel),
    in_specs=(PartitionSpec(bspec, heads, None), PartitionSpec(bspec, heads, None),
              PartitionSpec(bspec, heads, None), lay.pool_spec(), lay.pool_spec(),
              PartitionSpec(), lay.slot_spec(2), lay.slot_spec(1)),
    out_specs=PartitionSpec(bspec, heads, None),
  )  # fmt: skip
  return fn(q, k_new, v_new, cache.k, cache.v, layer, cache.page_table, live)


def _attend_local(q, k_new, v_new, pool_k, pool_v, layer, table, live, *, pages_per_block, kernel):
  """One shard's decode attention; see `decode_attention` (page ids local to the shard).

  Scores are float32 and then scaled by H**-0.5, and the unnormalised probabilities meet V in
  the compute dtype, as in the trainer's 'blockwise' kernel.
  """
  b, n, h = q.shape
  kh = k_new.shape[1]
  g = n // kh
  page = pool_k.shape[3]
  ppb = min(pages_per_block, table.shape[1])
  block = ppb * page
  table = jnp.pad(table, ((0, 0), (0, (-table.shape[1]) % ppb)))
  qg = q.reshape(b, kh, g, h)
  scale = h**-0.5
  f32 = jnp.float32
  # The new token's own score seeds the online softmax: (out, max, denominator).
  s_self = jnp.einsum("bkgh,bkh->bkg", qg, k_new.astype(q.dtype),
                      preferred_element_type=f32) * scale  # fmt: skip
  o = jnp.broadcast_to(v_new.astype(f32)[:, :, None, :], (b, kh, g, h))
  init = (o, s_self, jnp.ones_like(s_self))
  num_blocks = (jnp.max(live, initial=0) + block - 1) // block
  if kernel == "gather_per_head":
    qk = lambda kb: _per_head(
      lambda x: jnp.einsum("bkh,bksh->bks", x, kb, preferred_element_type=f32), qg
    )
    pv = lambda p, vb: _per_head(
      lambda x: jnp.einsum("bks,bksh->bkh", x, vb, preferred_element_type=f32), p
    )
  else:  # gather_grouped: one [G, H] x [H, block] matmul per kv head reads the block once
    qk = lambda kb: jnp.einsum("bkgh,bksh->bkgs", qg, kb, preferred_element_type=f32)
    pv = lambda p, vb: jnp.einsum("bkgs,bksh->bkgh", p, vb, preferred_element_type=f32)
  # 'clip' is XLA:CPU's fast gather; accelerators skip the clamp (ids are in range).
  mode = "clip" if kernel == "gather_per_head" else "promise_in_bounds"

  # The pool as rows of one page [L * K * Pg, page, H] (a free reshape): row of (layer, head, page).
  num_layers, _, num_pages = pool_k.shape[:3]
  flat_k, flat_v = (x.reshape(num_layers * kh * num_pages, page, h) for x in (pool_k, pool_v))
  head_rows = ((layer * kh + jnp.arange(kh, dtype=jnp.int32)) * num_pages)[None, :, None]

  def body(i, carry):
    o, m, l = carry
    ids = jax.lax.dynamic_slice_in_dim(table, i * ppb, ppb, axis=1)[:, None, :]  # [B, 1, ppb]
    rows = head_rows + ids  # [B, K, ppb]
    # One row gather per block straight into the dot's layout [B, K, ppb * page, H].
    kb = flat_k.at[rows].get(mode=mode).reshape(b, kh, block, h).astype(q.dtype)
    vb = flat_v.at[rows].get(mode=mode).reshape(b, kh, block, h).astype(q.dtype)
    sc = qk(kb) * scale
    pos = i * block + jnp.arange(block, dtype=jnp.int32)
    sc = jnp.where((pos[None] < live[:, None])[:, None, None], sc, _NEG)  # [B, K, G, block]
    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
    p = jnp.exp(sc - m_new[..., None])
    corr = jnp.exp(m - m_new)
    out = o * corr[..., None] + pv(p.astype(q.dtype), vb)
    return out, m_new, l * corr + jnp.sum(p, axis=-1)

  o, _, l = jax.lax.fori_loop(0, num_blocks, body, init)
  return (o / l[..., None]).reshape(b, n, h).astype(q.dtype)


def _per_head(fn, x):
  """fn over x[:, :, g] for each of the G query heads of a kv head, stacked on axis 2.

  CPU only (kernels.py): a batched matrix-vector product per head runs about twice as fast on
  XLA:CPU as one batched [G, H] x [H, block] product, but re-reads the block per head.
  """
  return jnp.stack([fn(x[:, :, g]) for g in range(x.shape[2])], axis=2)


def write_and_attend(q, k_new, v_new, pools, cache: PagedCache, layer, active):
  """One layer's decode on a carried pool (layout.carried): writes each active slot's
  k_new/v_new [B, K, H] at its length in layer `layer`, then attends q [B, N, H] to its
  tokens and the new one through the layout's kernel.

  pools (k, v) is the layer scan's carry (not the cache's arrays, which are the step's input):
  combined, k [L, Pg, page, 2K, H] and v None (the ragged paged attention kernel or its
  reference); folded, k and v [K, L, Pg, page, H] (the GPU Pallas paged attention kernel, or
  it in the Pallas interpreter). cache gives the page table, lengths and layout.
  Returns ((k, v), out [B, N, H]).
  """
  lay = cache.layout
  heads, bspec = _axes(lay.kv_axes), _axes(lay.batch_axes)
  qspec = PartitionSpec(bspec, heads, None)
  slots = (lay.slot_spec(2), lay.slot_spec(1), lay.slot_spec(1))
  if lay.combined:
    ref = lay.decode_kernel == "ragged_paged_attention_reference"
    fn = _sharded(
      lay, lambda p, lyr, *a: tpu_paged.write_and_attend(
        p, lyr, *a, pages_per_block=lay.pages_per_block, reference=ref),
      in_specs=(lay.pool_spec(), PartitionSpec(), qspec, qspec, qspec, *slots),
      out_specs=(lay.pool_spec(), qspec),
    )  # fmt: skip
    pool, out = fn(pools[0], layer, q, k_new, v_new, cache.page_table, cache.lengths, active)
    return (pool, None), out
  if not lay.folded:
    raise ValueError(f"not a carried-pool decode kernel: {lay.decode_kernel!r}")
  interpret = lay.decode_kernel == "pallas_paged_attention_interpret"
  fn = _sharded(
    lay, lambda *a: gpu_paged.write_and_attend(
      *a, pages_per_block=lay.pages_per_block, interpret=interpret),
    in_specs=(lay.pool_spec(), lay.pool_spec(), PartitionSpec(), qspec, qspec, qspec, *slots),
    out_specs=(lay.pool_spec(), lay.pool_spec(), qspec),
  )  # fmt: skip
  pk, pv, out = fn(*pools, layer, q, k_new, v_new, cache.page_table, cache.lengths, active)
  return (pk, pv), out


# ------------------------------------------------------------------ writes


def write_tokens(cache: PagedCache, k_new, v_new, active) -> PagedCache:
  """Appends each active slot's new k/v [L, B, K, H] at its length; lengths += active."""
  lay = cache.layout
  heads = _axes(lay.kv_axes)
  kv_spec = PartitionSpec(None, _axes(lay.batch_axes), heads, None)
  fn = _sharded(lay, _write_local,
                in_specs=(lay.pool_spec(), lay.pool_spec(), kv_spec, kv_spec, lay.slot_spec(2),
                          lay.slot_spec(1), lay.slot_spec(1)),
                out_specs=(lay.pool_spec(), lay.pool_spec()))  # fmt: skip
  k, v = fn(cache.k, cache.v, k_new, v_new, cache.page_table, cache.lengths, active)
  return cache.replace(k=k, v=v, lengths=cache.lengths + active.astype(jnp.int32))


def _write_local(pool_k, pool_v, k_new, v_new, table, lengths, active):
  page = pool_k.shape[3]
  page_id = jnp.take_along_axis(table, (lengths // page)[:, None], axis=1, mode="clip")[:, 0]
  page_id = jnp.where(active, page_id, pool_k.shape[2])  # out of range: dropped
  off = lengths % page

  def put(pool, new):
    # One scatter per layer (pool[l, :, page_id, off] is [B, K, H]): with the layer inside the
    # update window the TPU compiler re-lays the whole pool out (two pool-sized copies a call).
    for layer in range(pool.shape[0]):
      pool = pool.at[layer, :, page_id, off].set(new[layer].astype(pool.dtype), mode="drop")
    return pool

  return put(pool_k, k_new), put(pool_v, v_new)


def prefix_spec(layout: PagedLayout, num_rows: int) -> PartitionSpec:
  """The spec of prefix caches [L, Up, P, K, H]: rows over the batch axes (when they split Up)
  and kv heads over the kv axes, so a shard holds 1/D of the prompts (see `insert_prompts`)."""
  rows = _axes(layout.batch_axes) if num_rows % layout.num_shards == 0 else None
  return PartitionSpec(None, rows, None, _axes(layout.kv_axes), None)


def shard_prefix(layout: PagedLayout, k, v):
  """k, v [L, Up, P, K, H] constrained to `prefix_spec` (prefill's output)."""
  if layout.mesh is None or layout.mesh.size == 1:
    return k, v
  spec = jax.sharding.NamedSharding(layout.mesh, prefix_spec(layout, k.shape[1]))
  return jax.lax.with_sharding_constraint(k, spec), jax.lax.with_sharding_constraint(v, spec)


def insert_prompts(cache: PagedCache, k, v, rows, pages, shard, lengths) -> PagedCache:
  """Copies I requests' real prompt tokens from the prefix caches into their pages.

  k, v [L, Up, P, K, H] prefix caches (right-padded prompts, `prefix_spec`), rows int32[I] each
  request's prefix row, pages int32[I, M] its page ids (local to its shard `shard` int32[I]; a
  negative shard drops the request), lengths int32[I] real prompt tokens. The requests come
  shard-major: request i belongs to shard i // (I / D) or is dropped, so each shard gets only
  its own requests. The page table and lengths of the slots are the caller's.

  No shard holds the whole prefix: the D blocks of prefix rows pass round the ring of shards
  (`ppermute`); each shard copies its requests' rows from the block it holds (two at a time).
  """
  lay = cache.layout
  req, kv_spec = PartitionSpec(_axes(lay.batch_axes)), prefix_spec(lay, k.shape[1])
  axes = lay.batch_axes if lay.mesh is not None and lay.mesh.size > 1 else ()
  ring = lay.num_shards if axes and kv_spec[1] is not None else 1
  body = functools.partial(_insert_ring, batch_axes=axes, ring=ring, combined=lay.combined,
                           folded=lay.folded)
  if lay.combined:
    fn = _sharded(lay, lambda pool, *a: body((pool,), *a)[0],
                  in_specs=(lay.pool_spec(), kv_spec, kv_spec, req, lay.slot_spec(2), req, req),
                  out_specs=lay.pool_spec())  # fmt: skip
    return cache.replace(k=fn(cache.k, k, v, rows, pages, shard, lengths))
  fn = _sharded(lay, lambda pk, pv, *a: body((pk, pv), *a),
                in_specs=(lay.pool_spec(), lay.pool_spec(), kv_spec, kv_spec, req,
                          lay.slot_spec(2), req, req),
                out_specs=(lay.pool_spec(), lay.pool_spec()))  # fmt: skip
  pk, pv = fn(cache.k, cache.v, k, v, rows, pages, shard, lengths)
  return cache.replace(k=pk, v=pv)


def _insert_ring(pools, k, v, rows, pages, shard, lengths, *, batch_axes, ring, combined,
                 folded=False):
  """One shard's insert: pools (pool,) or (pool_k, pool_v); k, v [L, Ub, P, K, H] its block of
  prefix rows (all Up when ring == 1); rows, pages, shard, lengths its requests'. Step s writes
  the requests whose row is in shard me - s's block, then passes the block on."""
  me = jax.lax.axis_index(batch_axes) if batch_axes else 0
  num_pages, page = (pools[0].shape[1], pools[0].shape[2]) if combined else pools[0].shape[2:4]
  ids, off = _insert_rows(pages, shard, lengths, k.shape[2], page, num_pages, me)
  block, perm = k.shape[1], [(i, (i + 1) % ring) for i in range(ring)]

  def write(s, pools, k, v):
    mine = (rows // block == (me - s) % ring)[:, None]  # [I] its row is in this block
    kb, vb = k[:, rows % block], v[:, rows % block]  # [L, I, P, K, H]: this shard's requests
    return _write_prompts(pools, kb, vb, jnp.where(mine, ids, num_pages), off, combined, folded)

  def step(s, carry):
    pools, k, v = carry
    pools = write(s, pools, k, v)
    return pools, *(jax.lax.ppermute(x, batch_axes, perm) for x in (k, v))

  if ring > 1:
    pools, k, v = jax.lax.fori_loop(0, ring - 1, step, (pools, k, v))
  return write(ring - 1, pools, k, v)


def _insert_rows(pages, shard, lengths, prompt_len, page, num_pages, me):
  """(page ids, offsets) int32[I, P] of each prompt token in shard `me`'s pool; tokens past
  a prompt's length, or of another shard's request, get page id num_pages (dropped)."""
  j = jnp.arange(prompt_len, dtype=jnp.int32)
  ids = jnp.take(pages, j // page, axis=1, mode="clip")  # [I, P]
  keep = (j[None] < lengths[:, None]) & (shard == me)[:, None]
  return jnp.where(keep, ids, num_pages), jnp.broadcast_to(j % page, ids.shape)


def _write_prompts(pools, k, v, ids, off, combined, folded=False):
  """k, v [L, I, P, K, H] into pages ids int32[I, P] at offsets off (out of range: dropped)."""
  if combined:  # pool [L, Pg, page, 2K, H]; pool[l, ids, off] is [I, P, 2K, H]
    # A scatter per layer: the layer in the update window re-lays the pool out on TPU.
    (pool,) = pools
    upd = tpu_paged.combine(k, v).astype(pool.dtype)
    put = lambda lyr, pool: pool.at[lyr, ids, off].set(upd[lyr], mode="drop")
    return (jax.lax.fori_loop(0, pool.shape[0], put, pool),)

  order = (3, 0, 1, 2, 4) if folded else (0, 3, 1, 2, 4)

  def put(pool, new):  # pool[:, :, ids, off] is [L, K, I, P, H] (folded pool: [K, L, I, P, H])
    upd = new.transpose(order).astype(pool.dtype)
    return pool.at[:, :, ids, off].set(upd, mode="drop")

  return tuple(put(pool, new) for pool, new in zip(pools, (k, v), strict=True))
