"""Pallas splash attention (TPU) for causal self attention with padding or packed sequences.

The kernel takes segment ids and-ed with a static causal mask, so it never materialises [S, S]
scores and skips the causally dead blocks. A padded row passes real tokens as segment 1 and pads
as 0; a packed row passes its sequences' ids 1, 2, ... (pads 0), so no query sees another
sequence. Every row has at
least one allowed key (itself), so no softmax row is empty. Under a mesh set with
`jax.set_mesh`, the kernel runs inside `shard_map` over the batch and head axes (Mosaic kernels
cannot be partitioned automatically); without one it runs on unsharded operands.
`interpret=True` runs the same kernel in the Pallas interpreter (used by the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from fipo_jax import sharding as sharding_lib


def _block(t: int, block_size: int) -> int:
  """Largest power-of-two-times-128 block <= block_size dividing the padded length."""
  b = max(128, block_size)
  while b > 128 and t % b:
    b //= 2
  return b


def _kernel(num_heads: int, t: int, block: int, interpret: bool):
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(num_heads)])
  sizes = sa.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return sa.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _local(q, k, v, seg, *, block_size, interpret):
  """q [B, N, S, H], k/v [B, K, S, H], seg int32[B, S] (local shards) -> [B, N, S, H]."""
  kernel = _kernel(q.shape[1], q.shape[2], _block(q.shape[2], block_size), interpret)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))
  return jax.vmap(one)(q, k, v, seg)


def _mesh_axes(mesh, logical: str, size: int):
  """Mesh axes from the rules table for `logical` that exist in mesh and divide size."""
  return sharding_lib.mesh_axes(logical, size, mesh) or None


def splash_attention(
  q, k, v, *, kv_valid=None, segment_ids=None, block_size: int = 512, interpret: bool | None = None
):
  """q [B, S, N, H], k/v [B, S, K, H], kv_valid bool[B, S] or segment_ids int32[B, S]
  -> [B, S, N, H] (causal self attention; kv_valid is segment 1 for real tokens, 0 for pads).

  interpret=None runs the compiled kernel on TPU and the Pallas interpreter elsewhere.
  """
  b, t, n, h = q.shape
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  pad = (-t) % 128
  q = (q * jnp.asarray(h**-0.5, q.dtype)).swapaxes(1, 2)  # the kernel does not scale
  k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  if segment_ids is None:
    segment_ids = kv_valid
  seg = segment_ids.astype(jnp.int32)
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
  fn = functools.partial(_local, block_size=block_size, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch = _mesh_axes(mesh, "batch", b)
    heads = _mesh_axes(mesh, "kv_heads", k.shape[1])
    qkv = P(batch, heads, None, None)
    fn = jax.shard_map(
      fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False
    )
  out = fn(q, k, v, seg)
  return out[:, :, :t].swapaxes(1, 2)
