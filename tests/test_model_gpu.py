"""GPU-only checks (skipped on CPU): cuDNN attention and the bf16 model against plain paths.

Run on a GPU machine with: JAX_PLATFORMS=cuda python3 -m pytest tests/test_model_gpu.py -q
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import models
from fipo_jax.models import attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _qkv(b, t, n, k, h, dtype, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return f(b, t, n, h), f(b, t, k, h), f(b, t, k, h)


@pytest.mark.parametrize("t", [256, 1000])
def test_cudnn_matches_plain_bf16(t):
  b = 3
  q, k, v = _qkv(b, t, 8, 2, 128, jnp.bfloat16)
  valid = np.zeros((b, t), bool)
  valid[0, 17:t - 40] = True
  valid[1, :] = True
  valid[2, t // 2:] = True
  valid = jnp.asarray(valid)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  f32 = lambda x: x.astype(jnp.float32)
  ref = attention.plain_attention(f32(q), f32(k), f32(v), q_slot=slots, kv_valid=valid)
  out = jax.jit(lambda q, k, v, m: attention.cudnn_attention(q, k, v, kv_valid=m))(q, k, v, valid)
  m = np.asarray(valid)
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))[m].max()
  assert err < 2e-2, err  # bf16 inputs and outputs; reference in f32
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * m[:, :, None, None]
  g = lambda fn: jax.grad(lambda q: jnp.sum(fn(q).astype(jnp.float32) * w))(q)
  g_cudnn = g(lambda q: attention.cudnn_attention(q, k, v, kv_valid=valid))
  g_ref = g(lambda q: attention.plain_attention(q, k, v, q_slot=slots, kv_valid=valid))
  scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))
  assert float(jnp.max(jnp.abs((g_cudnn - g_ref).astype(jnp.float32)))) < 3e-2 * scale


def test_model_auto_cudnn_matches_blockwise_bf16():
  cfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=64, param_dtype="float32",
                           dtype="bfloat16")
  assert attention.resolve_impl("auto", jnp.bfloat16) == "cudnn"
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 300)), jnp.int32)
  mask = jnp.ones((2, 300), jnp.int32).at[0, :20].set(0)
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  a = models.init_model(cfg.replace(attention_impl="auto"), seed=0)
  b = models.init_model(cfg.replace(attention_impl="blockwise"), seed=0)
  la = a(ids, positions=pos, attention_mask=mask)
  lb = b(ids, positions=pos, attention_mask=mask)
  m = np.asarray(mask, bool)
  assert np.abs(np.asarray(la) - np.asarray(lb))[m].max() < 5e-2


def test_pallas_flash_compiled_matches_plain_on_packed_rows_bf16():
  """The compiled Triton kernel (not the interpreter) on a packed row: ragged segments, pads,
  GQA groups of 7, a length off the block grid; bf16 tolerance as for cuDNN above."""
  from fipo_jax.models import pallas_gpu

  t = 1000
  q, k, v = _qkv(2, t, 14, 2, 64, jnp.bfloat16)
  seg = np.zeros((2, t), np.int32)
  seg[0, :300], seg[0, 300:710], seg[0, 710:950] = 1, 2, 3
  seg[1] = 1
  seg = jnp.asarray(seg)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  f32 = lambda x: x.astype(jnp.float32)
  ref = attention.plain_attention(f32(q), f32(k), f32(v), q_slot=slots, kv_valid=seg > 0,
                                  segment_ids=seg)  # fmt: skip
  out = jax.jit(lambda q, k, v, s: pallas_gpu.flash_attention(q, k, v, segment_ids=s))(q, k, v, seg)
  m = np.asarray(seg > 0)
  assert np.abs(np.asarray(out, np.float32) - np.asarray(ref))[m].max() < 2e-2
  assert attention.resolve_impl("auto", jnp.bfloat16, packed=True) == "pallas_flash"


def test_paged_decode_on_gpu_is_grouped_and_matches_plain():
  """The GPU decode formulation (one grouped matmul per K/V block) against plain attention."""
  from fipo_jax.models import paged

  rng = np.random.default_rng(0)
  b, n, kh, h, page, m = 8, 14, 2, 64, 16, 8
  lengths = np.asarray([0, 1, 15, 16, 17, 100, 127, 128], np.int32)
  pool = [rng.normal(size=(1, kh, b * m, page, h)).astype(np.float32) for _ in range(2)]
  table = rng.permutation(b * m).reshape(b, m).astype(np.int32)
  q = rng.normal(size=(b, n, h)).astype(np.float32)
  kv = [rng.normal(size=(b, kh, h)).astype(np.float32) for _ in range(2)]
  ks, vs = (np.zeros((b, m * page + 1, kh, h), np.float32) for _ in range(2))
  valid = np.zeros((b, m * page + 1), bool)
  for i in range(b):
    for j in range(lengths[i]):
      pid = table[i, j // page]
      ks[i, j], vs[i, j] = pool[0][0, :, pid, j % page], pool[1][0, :, pid, j % page]
    ks[i, lengths[i]], vs[i, lengths[i]] = kv[0][i], kv[1][i]
    valid[i, : lengths[i] + 1] = True
  want = attention.plain_attention(q[:, None], ks, vs, q_slot=jnp.full((b, 1), m * page),
                                   kv_valid=valid)[:, 0]  # fmt: skip
  layout = paged.PagedLayout(page_size=page, pages_per_block=2)
  assert layout.decode_kernel == "gather_grouped"
  cache = paged.PagedCache(k=pool[0], v=pool[1], page_table=table, lengths=lengths, layout=layout)
  got = jax.jit(paged.decode_attention)(q, kv[0], kv[1], cache, 0, lengths)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)  # float32 (no TF32 in einsum)


def test_pallas_paged_decode_compiled_matches_gather_bf16():
  """JAX's Pallas GPU paged attention compiled (Triton), written-first on the folded pools,
  against the gather path on the same bf16 pool; the table picks it for a bf16 model."""
  from fipo_jax.models import kernels, paged

  cfg = models.ModelConfig(head_dim=64, dtype="bfloat16")
  assert kernels.decode_kernel("gpu", cfg, 16) == "pallas_paged_attention"
  rng = np.random.default_rng(1)
  b, n, kh, h, page, m, layers = 8, 14, 2, 64, 16, 8, 2
  bf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)
  pool = [bf(layers, kh, b * m, page, h) for _ in range(2)]
  table = jnp.asarray(rng.permutation(b * m).reshape(b, m), jnp.int32)
  lengths = jnp.asarray([0, 1, 15, 16, 17, 100, 126, 127], jnp.int32)
  q, k_new, v_new = bf(b, n, h), bf(b, kh, h), bf(b, kh, h)
  gather = paged.PagedLayout(page_size=page, pages_per_block=2, kernel="gather_grouped")
  cache = paged.PagedCache(k=pool[0], v=pool[1], page_table=table, lengths=lengths, layout=gather)
  want = jax.jit(paged.decode_attention)(q, k_new, v_new, cache, 1, lengths)
  folded = paged.PagedLayout(page_size=page, pages_per_block=2, kernel="pallas_paged_attention")
  active = jnp.ones((b,), bool)
  step = jax.jit(lambda p, c: paged.write_and_attend(q, k_new, v_new, p, c, 1, active))
  _, got = step(tuple(x.swapaxes(0, 1) for x in pool), cache.replace(layout=folded))
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max()
  assert err < 2e-2, err  # bf16 outputs; the kernel scales q in bf16 (models/gpu_paged.py)
