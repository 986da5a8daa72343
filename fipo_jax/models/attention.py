"""Attention kernels behind one signature, chosen by `ModelConfig.attention_impl`.

Every implementation computes, for query i of row b, softmax attention over key slots j with
`kv_valid[b, j] and j <= q_slot[b, i]`. Without a cache q_slot = i (causal self attention with
padding); with a KV cache q_slot = index_old[b] + i. Packed self attention (several sequences
end to end in one row) also passes `segment_ids` int32[B, S] (0 = padding): then key j is seen
by query i only if `segment_ids[b, j] == segment_ids[b, i]`, so no attention crosses a sequence
boundary.

- 'plain': reference; materialises [B, N, Q, S] scores.
- 'blockwise': online-softmax over (q block, kv block) tiles in plain JAX; memory O(S * block);
  causally dead kv blocks are skipped. Portable fallback and the CPU test path.
- 'splash': Pallas splash attention (TPU only; see splash.py).
- 'cudnn': jax.nn.dot_product_attention(implementation='cudnn') (GPU only). Its public API takes
  per-row lengths, not segment ids, and a dense [S, S] mask does not scale to packed rows of
  22k tokens, so packed rows run 'pallas_flash'.
- 'pallas_flash': JAX's Pallas GPU flash attention with segment ids (pallas_gpu.py); where it
  does not fit (head_dim), 'blockwise' runs instead, logged once with the reason.
Which kernel 'auto' picks per platform is kernels.py's table.
Masked scores use a large finite negative, so rows with no valid key give a uniform average
instead of NaN (those rows are padding and their outputs are never used).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fipo_jax.models import kernels

_NEG = -1e30


def resolve_impl(impl: str, dtype=None, packed: bool = False) -> str:
  """The kernel `impl` runs on this backend (kernels.train_kernel: the per-platform table)."""
  return kernels.train_kernel(kernels.platform_of(), impl, dtype, packed)


# The kernels the sampler's cached (paged or dense) attention computes like.
_CACHED_KERNELS = ("plain", "blockwise")


def sampler_mismatch(
  model_dtype: str, sampler_dtype: str | None, attention_impl: str
) -> str | None:
  """Why the sampler's log-probs are not the trainer's, or None when they compute alike.

  The sampler runs `sampler_dtype` (None: the model's) and, with its KV cache, the portable
  XLA attention (paged decode: kernels.decode_kernel, the same float32 scores, scale and
  online softmax as 'blockwise', except the GPU paged kernel in 16-bit, which scales q before
  its dot: models/gpu_paged.py); the trainer runs `attention_impl` resolved on this backend
  for packed rows.
  """
  if sampler_dtype is not None and sampler_dtype != model_dtype:
    return (
      f"the sampler computes in {sampler_dtype} (rl.sampler_dtype) and the trainer in "
      f"{model_dtype} (model.dtype)"
    )
  sampler = jnp.dtype(sampler_dtype or model_dtype)
  if kernels.platform_of() == "gpu" and sampler.itemsize == 2:
    return (
      f"on GPU in {sampler.name} the sampler's decode kernel 'pallas_paged_attention' (where it "
      f"fits the model, kernels.decode_kernel) scales q by head_dim**-0.5 in {sampler.name} "
      "before its dot, the trainer scales float32 scores"
    )
  kernel = resolve_impl(attention_impl, jnp.dtype(model_dtype), packed=True)
  if kernel not in _CACHED_KERNELS:
    return (
      f"the trainer's attention kernel is '{kernel}' (model.attention_impl="
      f"'{attention_impl}') and the sampler's cached attention is 'blockwise'"
    )
  return None


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_slot: jax.Array,
  kv_valid: jax.Array,
  impl: str,
  block_size: int = 512,
  self_attention: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """q [B, Q, N, H], k/v [B, S, K, H], q_slot int32[B, Q], kv_valid bool[B, S] -> [B, Q, N, H].

  `self_attention` says q_slot == arange(Q) and S == Q (no cache), which the fused kernels need.
  `segment_ids` int32[B, S] (self attention only): attention stays inside each segment.
  """
  impl = resolve_impl(impl, q.dtype, packed=segment_ids is not None)
  if segment_ids is not None and not self_attention:
    raise ValueError("segment_ids need self attention (no KV cache)")
  seg = dict(segment_ids=segment_ids)
  if impl == "plain":
    return plain_attention(q, k, v, q_slot=q_slot, kv_valid=kv_valid, **seg)
  if impl == "blockwise":
    return blockwise_attention(
      q, k, v, q_slot=q_slot, kv_valid=kv_valid, block_size=block_size, **seg
    )
  if not self_attention:
    # Decode/prefill against a cache: short queries; the blockwise path bounds memory.
    return blockwise_attention(q, k, v, q_slot=q_slot, kv_valid=kv_valid, block_size=block_size)
  if impl == "pallas_flash":
    from fipo_jax.models import pallas_gpu  # GPU-kernel imports stay lazy.

    why = pallas_gpu.unfit(q.shape[-1])
    if why:
      pallas_gpu.log_fallback(why)
      return blockwise_attention(
        q, k, v, q_slot=q_slot, kv_valid=kv_valid, block_size=block_size, **seg
      )
    if segment_ids is None:
      segment_ids = kv_valid.astype(jnp.int32)  # real tokens 1, pads 0
    return pallas_gpu.flash_attention(q, k, v, segment_ids=segment_ids, block_size=block_size)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, kv_valid=kv_valid)
  if impl == "splash":
    from fipo_jax.models import splash  # TPU-only imports stay lazy.

    if segment_ids is None:
      segment_ids = kv_valid.astype(jnp.int32)  # real tokens 1, pads 0
    return splash.splash_attention(q, k, v, segment_ids=segment_ids, block_size=block_size)
  raise ValueError(f"unknown attention_impl {impl!r}")


def _group(q: jax.Array, num_kv: int) -> jax.Array:
  b, t, n, h = q.shape
  return q.reshape(b, t, num_kv, n // num_kv, h)


def plain_attention(q, k, v, *, q_slot, kv_valid, segment_ids=None):
  """Reference attention with explicit [B, K, N/K, Q, S] scores."""
  b, t, n, h = q.shape
  s = k.shape[1]
  qg = _group(q, k.shape[2])
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (h**-0.5)
  slots = jnp.arange(s, dtype=jnp.int32)
  mask = kv_valid[:, None, :] & (slots[None, None, :] <= q_slot[:, :, None])  # [B, Q, S]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  size = x.shape[axis]
  pad = (-size) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _segment_bounds(seg_blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per block of [n, B, blk] segment ids: (lowest real segment, highest segment), each [n].

  A q block needs a kv block only if some kv segment >= its lowest real segment; packed rows
  number segments in order, so the kv blocks of earlier sequences are skipped.
  """
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(seg_blocks > 0, seg_blocks, big), axis=(1, 2))
  return lo, jnp.max(seg_blocks, axis=(1, 2))


def blockwise_attention(q, k, v, *, q_slot, kv_valid, block_size: int = 512, segment_ids=None):
  """Online-softmax attention over tiles; never holds more than [B, N, bq, bk] scores.

  Each kv step is rematerialised in the backward pass, so autodiff saves only the running
  (out, max, denominator) per step instead of the probabilities. kv blocks in the causal
  future of a q block, or (with segment_ids) holding only earlier segments, are skipped.
  """
  b, t, n, h = q.shape
  s, num_kv = k.shape[1], k.shape[2]
  g = n // num_kv
  bq = min(block_size, t)
  bk = min(block_size, s)
  scale = h**-0.5
  qg = _pad_to(_group(q, num_kv), 1, bq)
  q_slot_p = _pad_to(q_slot, 1, bq, value=-1)
  k_p, v_p = _pad_to(k, 1, bk), _pad_to(v, 1, bk)
  kv_valid_p = _pad_to(kv_valid, 1, bk, value=False)
  nq, nk = qg.shape[1] // bq, k_p.shape[1] // bk
  packed = segment_ids is not None
  # Without segments every token is in segment 0: the same code, nothing skipped by segment.
  seg = segment_ids.astype(jnp.int32) if packed else jnp.zeros((b, t), jnp.int32)
  # [nq, B, bq, K, N/K, H] and [nk, B, bk, K, H] so scans run over the leading axis.
  q_blocks = qg.reshape(b, nq, bq, num_kv, g, h).swapaxes(0, 1)
  slot_blocks = q_slot_p.reshape(b, nq, bq).swapaxes(0, 1)
  q_seg = _pad_to(seg, 1, bq).reshape(b, nq, bq).swapaxes(0, 1)
  k_blocks = k_p.reshape(b, nk, bk, num_kv, h).swapaxes(0, 1)
  v_blocks = v_p.reshape(b, nk, bk, num_kv, h).swapaxes(0, 1)
  valid_blocks = kv_valid_p.reshape(b, nk, bk).swapaxes(0, 1)
  kv_seg = _pad_to(seg, 1, bk).reshape(b, nk, bk).swapaxes(0, 1) if packed else None
  kv_starts = jnp.arange(nk, dtype=jnp.int32) * bk
  q_lo = _segment_bounds(q_seg)[0] if packed else jnp.zeros((nq,), jnp.int32)
  kv_hi = _segment_bounds(kv_seg)[1] if packed else jnp.zeros((nk,), jnp.int32)

  def q_step(_, q_in):
    qb, slots, qs, lo = q_in  # [B, bq, K, N/K, H], [B, bq], [B, bq], []
    last_slot = jnp.max(slots)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def kv_step(carry, kv_in):
      kb, vb, valid, start, ks, hi = kv_in

      def update(carry):
        o, m, l = carry
        sc = jnp.einsum("bqkgh,bskh->bkgqs", qb, kb, preferred_element_type=jnp.float32)
        sc = sc * scale
        slots_k = start + jnp.arange(bk, dtype=jnp.int32)
        mask = valid[:, None, :] & (slots_k[None, None, :] <= slots[:, :, None])  # [B, bq, bk]
        if packed:
          mask = mask & (ks[:, None, :] == qs[:, :, None])
        sc = jnp.where(mask[:, None, None], sc, _NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l_new = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
          "bkgqs,bskh->bkgqh", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
        )
        return o * corr[..., None] + pv, m_new, l_new

      needed = (start <= last_slot) & (hi >= lo)
      return jax.lax.cond(needed, update, lambda c: c, carry), None

    init = (
      jnp.zeros((b, num_kv, g, bq, h), jnp.float32),
      jnp.full((b, num_kv, g, bq), _NEG, jnp.float32),
      jnp.zeros((b, num_kv, g, bq), jnp.float32),
    )
    kv_in = (k_blocks, v_blocks, valid_blocks, kv_starts, kv_seg if packed else valid_blocks, kv_hi)
    (o, _, l), _ = jax.lax.scan(kv_step, init, kv_in)
    out = o / jnp.maximum(l, 1e-30)[..., None]  # [B, K, N/K, bq, H]
    return None, out.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B, bq, K, N/K, H]

  _, out = jax.lax.scan(
    jax.checkpoint(q_step, prevent_cse=False), None, (q_blocks, slot_blocks, q_seg, q_lo)
  )
  out = out.swapaxes(0, 1).reshape(b, nq * bq, n, h)
  return out[:, :t]


def cudnn_attention(q, k, v, *, kv_valid, implementation: str = "cudnn"):
  """cuDNN flash attention for self attention over [pads][real tokens][pads] rows.

  Rows are rolled so real tokens start at slot 0; causal order among real tokens is kept, so
  `is_causal` plus key_value_seq_lengths reproduces the padding mask without a [S, S] mask.
  Assumes each row's real tokens are contiguous (left-padded prompt + right-padded response).
  cuDNN flash attention takes bfloat16/float16 only.
  """
  if implementation == "cudnn" and jnp.dtype(q.dtype).itemsize != 2:
    raise ValueError(
      f"attention_impl='cudnn' needs a 16-bit compute dtype, got {q.dtype}; "
      "use dtype='bfloat16' or attention_impl='blockwise'"
    )
  t = q.shape[1]
  valid = kv_valid.astype(jnp.int32)
  left = jnp.argmax(valid, axis=1).astype(jnp.int32)  # leading pads per row
  lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
  idx = (jnp.arange(t, dtype=jnp.int32)[None, :] + left[:, None]) % t  # rolled -> original
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  out = jax.nn.dot_product_attention(
    take(q),
    take(k),
    take(v),
    is_causal=True,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    implementation=implementation,
  )
  inv = (jnp.arange(t, dtype=jnp.int32)[None, :] - left[:, None]) % t  # original -> rolled
  return jnp.take_along_axis(out, inv[:, :, None, None], axis=1)
