"""JAX's Pallas GPU flash attention (Triton) for causal self attention over packed rows.

`jax.experimental.pallas.ops.gpu.attention.mha` takes segment ids and a causal flag, so a packed
row (sequences numbered 1, 2, ... end to end, pads 0) never materialises [T, T] scores and no
query sees another sequence; a padded row passes real tokens as segment 1 and pads as 0. It
has a fused backward (its own custom_vjp). The kernel wants as many k/v heads as query heads,
so grouped k/v are repeated G times along the heads (the repeat's gradient sums them back); the
row length is padded to a multiple of the block with segment 0 (seen by no real query).
Scores are float32 and scaled by H**-0.5 inside the kernel, as the other kernels do. Under a
mesh set with `jax.set_mesh`, the kernel runs inside `shard_map` over the batch and head axes
(a Triton call cannot be partitioned automatically), as splash does. `interpret=True` runs the
same kernel in the Pallas interpreter (the CPU tests).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.sharding import PartitionSpec as P

from fipo_jax import sharding as sharding_lib

# Triton's dot needs every tile dim >= 16; the kernel pads H to a power of two itself.
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256


def unfit(head_dim: int) -> str | None:
  """Why the kernel does not fit heads of `head_dim` (one line), or None."""
  if not _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM:
    return f"head_dim {head_dim} is outside the kernel's [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]"
  return None


@functools.cache
def log_fallback(reason: str) -> None:
  """Logs once per reason that packed rows run 'blockwise' instead of this kernel."""
  logging.info("attention: packed rows use 'blockwise' instead of 'pallas_flash': %s", reason)


def _block(t: int, block_size: int) -> int:
  """A power-of-two block in [16, min(block_size, 128)] (Triton tiles; 128 is JAX's default)."""
  b = 16
  while b * 2 <= min(block_size, 128) and b * 2 <= max(t, 16):
    b *= 2
  return b


def flash_attention(q, k, v, *, segment_ids, block_size: int = 128, interpret: bool | None = None):
  """q [B, T, N, H], k/v [B, T, K, H], segment_ids int32[B, T] (0 = pad) -> [B, T, N, H].

  Causal attention within each segment. interpret=None runs the compiled kernel on GPU and
  the Pallas interpreter elsewhere.
  """
  b, t, n, h = q.shape
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  g = n // k.shape[2]
  if g > 1:  # [B, T, K, H] -> [B, T, N, H], query head i reads kv head i // G
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  blk = _block(t, block_size)
  pad = (-t) % blk
  seg = segment_ids.astype(jnp.int32)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
  bwd = min(blk, 32)  # JAX's default backward tiles (shared memory per program)
  sizes = gpu_attention.BlockSizes(
    block_q=blk, block_k=blk, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
  )
  fn = functools.partial(
    gpu_attention.mha, sm_scale=h**-0.5, causal=True, block_sizes=sizes, interpret=interpret
  )
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch = sharding_lib.mesh_axes("batch", b, mesh) or None
    heads = sharding_lib.mesh_axes("heads", n, mesh) or None
    qkv = P(batch, None, heads, None)
    fn = jax.shard_map(
      fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False
    )
  return fn(q, k, v, seg)[:, :t]
