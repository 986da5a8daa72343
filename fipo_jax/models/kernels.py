"""Which attention kernel runs where: the one table for training, decode and the aot report.

Training attention (self attention over [B, T] rows; packed rows carry segment ids):

  | platform | padded rows                      | packed rows (segment ids)              |
  | -------- | -------------------------------- | -------------------------------------- |
  | tpu      | 'splash'                         | 'splash'                               |
  | gpu      | 'cudnn' (16-bit compute)         | 'pallas_flash' (16-bit compute)        |
  | cpu      | 'blockwise'                      | 'blockwise'                            |

  GPU in float32 runs 'blockwise' (cuDNN flash takes 16-bit inputs only). 'pallas_flash' is
  JAX's Pallas GPU flash attention with segment ids (models/pallas_gpu.py); cuDNN's public API
  in jax takes per-row lengths, not segment ids. An explicit `attention_impl` other than
  'auto' is kept, except that 'cudnn' on packed rows runs 'pallas_flash'.

Decode attention (one token per slot against the page pool, models/paged.py):

  - 'gather_per_head' (cpu): one matrix-vector product per query head over each gathered K/V
    block. On XLA:CPU that is about twice as fast as one small [G, H] x [H, block] matmul,
    but each of the G heads re-reads the block, so it costs ~G/2 times the K/V traffic of a
    grouped read on TPU/GPU.
  - 'gather_grouped' (gpu; tpu for other head sizes): one [G, H] x [H, block] matmul per kv
    head and K/V block, so each gathered K/V byte is read once.
  - 'ragged_paged_attention' (tpu, head_dim a multiple of 128): JAX's TPU ragged paged
    attention kernel (models/tpu_paged.py). It reads the pool as [L, Pg, page, 2K, H] (k/v
    heads interleaved), so choosing it changes the pool's layout (`PagedLayout.combined`),
    and each layer writes its token into the pool before the kernel reads it.
    'ragged_paged_attention_reference' is the same wiring with a jittable pure-JAX reference
    of the kernel (CPU tests).
  - 'pallas_paged_attention' (gpu, 16-bit compute, head_dim a power of two >= 16, pages a
    power of two; else 'gather_grouped'): JAX's Pallas GPU (Triton) paged attention
    (models/gpu_paged.py). Its pool is k, v [K, L, Pg, page, H] each (`PagedLayout.folded`),
    each layer writes its token before the kernel reads it. In float32 it stays on
    'gather_grouped', as training does ('blockwise'): Triton's float32 dot may round through
    TF32. 'pallas_paged_attention_interpret' is the same kernel and wiring in the Pallas
    interpreter (CPU tests).

  | platform | decode kernel (pool layout)                                   | otherwise        |
  | -------- | ------------------------------------------------------------- | ---------------- |
  | tpu      | 'ragged_paged_attention' (combined) if H % 128 == 0            | 'gather_grouped' |
  | gpu      | 'pallas_paged_attention' (folded) if 16-bit, H and page pow2   | 'gather_grouped' |
  | cpu      | 'gather_per_head' (the gather pools)                           |                  |

The gather kernels and 'ragged_paged_attention' scale float32 scores by H**-0.5 as the trainer's
kernels do (models/attention.py). The GPU kernel does not scale: q is scaled in float32 and cast
back before it, so in 16-bit its scores differ from the trainer's, and
`attention.sampler_mismatch` says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TRAIN_KERNELS = ("plain", "blockwise", "splash", "cudnn", "pallas_flash")
RPA_KERNELS = ("ragged_paged_attention", "ragged_paged_attention_reference")
GPU_PAGED_KERNELS = ("pallas_paged_attention", "pallas_paged_attention_interpret")
DECODE_KERNELS = ("gather_per_head", "gather_grouped", *RPA_KERNELS, *GPU_PAGED_KERNELS)
PLATFORMS = ("cpu", "gpu", "tpu")


def platform_of(mesh=None) -> str:
  """'cpu' | 'gpu' | 'tpu': the platform of `mesh`'s devices (a concrete Mesh, e.g. an AOT
  topology's), else of the default backend."""
  devices = getattr(mesh, "devices", None)
  if devices is not None and getattr(devices, "size", 0):
    name = devices.flat[0].platform
  else:
    name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def train_kernel(platform: str, impl: str, dtype=None, packed: bool = False) -> str:
  """The training attention kernel for `attention_impl` = impl on `platform` (see the table).

  dtype: the compute dtype (None: unknown, taken as 32-bit); packed: rows carry segment ids.
  """
  sixteen = dtype is not None and jnp.dtype(dtype).itemsize == 2
  if impl == "auto":
    if platform == "tpu":
      return "splash"
    if platform == "gpu" and sixteen:
      return "pallas_flash" if packed else "cudnn"
    return "blockwise"
  if impl == "cudnn" and packed:
    return "pallas_flash"
  return impl


def decode_kernel(platform: str, cfg=None, page_size: int | None = None) -> str:
  """The paged decode attention formulation on `platform` for the ModelConfig `cfg` and pages
  of `page_size` tokens (None: unknown).

  The TPU kernel needs head_dim a multiple of 128 (its softmax statistics span the 128 lanes);
  the GPU kernel 16-bit compute and `gpu_paged_fits`. Otherwise, or with an unknown cfg,
  they gather ('gather_grouped').
  """
  if platform == "tpu" and cfg is not None and cfg.head_dim % 128 == 0:
    return "ragged_paged_attention"
  if platform == "gpu" and cfg is not None and gpu_paged_fits(cfg, page_size):
    return "pallas_paged_attention"
  return "gather_per_head" if platform == "cpu" else "gather_grouped"


def gpu_paged_fits(cfg, page_size: int | None) -> bool:
  """Whether JAX's Pallas GPU paged attention takes this model and page size: 16-bit compute,
  head_dim a power of two >= 16 (Triton's power-of-two blocks and 16-row dots) and pages a
  power of two. Any head grouping fits (the kernel pads a kv head's G query heads to 16)."""
  pow2 = lambda n: n > 0 and n & (n - 1) == 0
  sixteen = jnp.dtype(cfg.dtype).itemsize == 2
  return sixteen and cfg.head_dim >= 16 and pow2(cfg.head_dim) and pow2(page_size or 0)


def unsupported(impl: str, platform: str) -> str | None:
  """Why `attention_impl` = impl cannot run on `platform` (one line), or None."""
  if impl == "splash" and platform != "tpu":
    return (
      f"'splash' is a TPU kernel and this backend is '{platform}' (it would run in the "
      "Pallas interpreter); use 'auto'"
    )
  if impl == "cudnn" and platform != "gpu":
    return f"'cudnn' is a GPU kernel and this backend is '{platform}'; use 'auto'"
  return None
