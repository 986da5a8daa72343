"""Every attention implementation equals plain attention (forward and gradients) on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import models, sharding
from fipo_jax.models import attention, splash
from tests import test_model_helpers as mh


def _qkv(b, t, s, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(b, t, n, h), f(b, s, k, h), f(b, s, k, h)


def _padded_valid(b, t):
  valid = np.ones((b, t), bool)
  valid[0, :t // 5] = False  # left padding
  valid[-1, t - t // 3:] = False  # right padding
  return jnp.asarray(valid)


def _causal_slots(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _grads(fn, q, k, v, valid):
  w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  m = valid[:, :, None, None].astype(jnp.float32)
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w * m), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("t,block", [(13, 4), (16, 16), (37, 8), (8, 64)])
@pytest.mark.slow
def test_blockwise_self_attention_matches_plain(t, block):
  q, k, v = _qkv(3, t, t, 4, 2, 8)
  valid, slots = _padded_valid(3, t), _causal_slots(3, t)
  ref = lambda q, k, v: attention.plain_attention(q, k, v, q_slot=slots, kv_valid=valid)
  blk = lambda q, k, v: attention.blockwise_attention(q, k, v, q_slot=slots, kv_valid=valid,
                                                       block_size=block)
  m = np.asarray(valid)
  assert np.abs(np.asarray(blk(q, k, v)) - np.asarray(ref(q, k, v)))[m].max() < 1e-5
  for a, b in zip(_grads(blk, q, k, v, valid), _grads(ref, q, k, v, valid), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_blockwise_cache_masks_match_plain():
  """Queries at per-row cache offsets against a cache with holes (KV-cache semantics)."""
  b, t, s = 3, 3, 20
  q, k, v = _qkv(b, t, s, 4, 1, 8, seed=1)
  rng = np.random.default_rng(2)
  valid = jnp.asarray(rng.random((b, s)) > 0.3)
  slots = jnp.asarray([[5, 6, 7], [0, 1, 2], [17, 18, 19]], jnp.int32)
  ref = attention.plain_attention(q, k, v, q_slot=slots, kv_valid=valid)
  for block in (4, 7, 32):
    out = attention.blockwise_attention(q, k, v, q_slot=slots, kv_valid=valid, block_size=block)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_splash_interpreted_matches_plain():
  b, t = 2, 200  # not a multiple of 128: exercises the padding
  q, k, v = _qkv(b, t, t, 4, 2, 16, seed=3)
  valid, slots = _padded_valid(b, t), _causal_slots(b, t)
  ref = lambda q, k, v: attention.plain_attention(q, k, v, q_slot=slots, kv_valid=valid)
  spl = lambda q, k, v: splash.splash_attention(q, k, v, kv_valid=valid, block_size=128,
                                                interpret=True)
  m = np.asarray(valid)
  assert np.abs(np.asarray(spl(q, k, v)) - np.asarray(ref(q, k, v)))[m].max() < 1e-5
  for a, b_ in zip(_grads(spl, q, k, v, valid), _grads(ref, q, k, v, valid), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=0)


def test_splash_under_mesh_uses_shard_map():
  b, t = 4, 128
  q, k, v = _qkv(b, t, t, 4, 2, 16, seed=4)
  valid, slots = _padded_valid(b, t), _causal_slots(b, t)
  ref = attention.plain_attention(q, k, v, q_slot=slots, kv_valid=valid)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, m: splash.splash_attention(q, k, v, kv_valid=m, interpret=True))
    out = fn(q, k, v, valid)
  m = np.asarray(valid)
  assert np.abs(np.asarray(out) - np.asarray(ref))[m].max() < 1e-5


def test_cudnn_roll_logic_with_xla_backend():
  """The cuDNN path's roll-to-front + seq-lengths trick, run with the XLA implementation."""
  b, t = 3, 12
  q, k, v = _qkv(b, t, t, 4, 2, 8, seed=5)
  valid = np.zeros((b, t), bool)
  valid[0, 3:10] = True  # left and right padding
  valid[1, :] = True
  valid[2, 5:] = True
  valid = jnp.asarray(valid)
  ref = attention.plain_attention(q, k, v, q_slot=_causal_slots(b, t), kv_valid=valid)
  out = attention.cudnn_attention(q, k, v, kv_valid=valid, implementation="xla")
  m = np.asarray(valid)
  assert np.abs(np.asarray(out) - np.asarray(ref))[m].max() < 1e-5


def test_model_with_splash_matches_transformers(tmp_path):
  hf = mh.random_hf_model("qwen2", seed=7)
  hf.save_pretrained(tmp_path)
  model = models.from_pretrained(tmp_path, attention_impl="splash", attention_block_size=128)
  ids, mask, pos = mh.padded_batch(np.random.default_rng(0), 96, [9, 6], [2, 4], 12)
  ours = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos),
                          attention_mask=jnp.asarray(mask)))
  ref = mh.hf_logits(hf, ids, mask, pos)
  m = mask.astype(bool)
  assert np.abs(ours[m] - ref[m]).max() < 1e-4


def test_auto_resolves_by_backend():
  assert attention.resolve_impl("auto") == "blockwise"  # CPU test backend
  assert attention.resolve_impl("plain") == "plain"


def _packed_segments(b, t):
  """Ragged sequences end to end (ids 1, 2, ...) then pads (0); the last row is one sequence."""
  seg = np.zeros((b, t), np.int32)
  seg[0, :17], seg[0, 17:45], seg[0, 45:t - 10] = 1, 2, 3
  seg[1:, :] = 1
  return jnp.asarray(seg)


@pytest.mark.slow  # ~20 s a dtype: tracing the interpreted forward and backward kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_gpu_flash_interpreted_matches_plain_on_packed_rows(dtype):
  """JAX's Pallas GPU flash attention with segment ids (the GPU kernel for packed rows, run in
  the Pallas interpreter) == plain attention: outputs and q/k/v gradients on real tokens, with
  ragged segments and pads, a row length off the block grid (80 -> 96, 3 blocks of 32) and
  GQA groups of 3.

  float32: the kernel's exp2 with log2(e) folded into the scale and its own summation order
  differ from plain's in the last bits (1e-5). bfloat16: inputs and the kernel's output are
  bf16 (8 mantissa bits, ~4e-3 relative per rounding) and it multiplies bf16 probabilities
  into V, while the reference runs float32 on the same bf16 inputs: 2e-2 of the outputs' and
  gradients' scale, as the cuDNN check in test_model_gpu.py.
  """
  from fipo_jax.models import pallas_gpu

  b, t = 1, 80  # the packed row of _packed_segments
  q, k, v = (x.astype(dtype) for x in _qkv(b, t, t, 3, 1, 16))
  seg = _packed_segments(b, t)
  valid, slots = seg > 0, _causal_slots(b, t)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention.plain_attention(f32(q), f32(k), f32(v), q_slot=slots,
                                                  kv_valid=valid, segment_ids=seg)
  fused = lambda q, k, v: f32(pallas_gpu.flash_attention(q, k, v, segment_ids=seg,
                                                         block_size=32, interpret=True))
  tol = 1e-5 if dtype == "float32" else 2e-2
  m = np.asarray(valid)
  want = np.asarray(ref(q, k, v))
  err = np.abs(np.asarray(fused(q, k, v)) - want)[m].max()
  assert err < tol * np.abs(want).max(), err
  for a, r in zip(_grads(fused, q, k, v, valid), _grads(ref, q, k, v, valid), strict=True):
    a, r = np.asarray(f32(a)), np.asarray(f32(r))
    assert np.abs(a - r).max() < tol * np.abs(r).max(), (np.abs(a - r).max(), np.abs(r).max())


def test_cudnn_packed_rows_run_the_pallas_kernel_and_fall_back_by_head_dim(monkeypatch):
  """'cudnn' (and 'auto' on a GPU) with segment ids runs 'pallas_flash'; a head_dim the kernel
  cannot tile runs 'blockwise' instead, logged once with the reason."""
  from fipo_jax.models import pallas_gpu

  calls = []
  monkeypatch.setattr(pallas_gpu, "flash_attention", lambda *a, **kw: calls.append(1) or a[0])
  b, t = 1, 16
  seg = _packed_segments(2, 80)[1:, :t]
  for h, want in ((16, 1), (8, 0)):
    q, k, v = _qkv(b, t, t, 2, 1, h)
    calls.clear()
    attention.attention(q, k, v, q_slot=_causal_slots(b, t), kv_valid=seg > 0, impl="cudnn",
                        self_attention=True, segment_ids=seg)
    assert len(calls) == want, h
  assert pallas_gpu.unfit(8) and pallas_gpu.unfit(16) is None


@pytest.mark.slow  # ~25 s on a loaded 2-core host: the interpreted kernel under shard_map
def test_pallas_gpu_flash_under_mesh_uses_shard_map():
  """Under a mesh the Triton call runs per shard (batch over data/fsdp, heads over tensor)."""
  from fipo_jax.models import pallas_gpu

  b, t = 4, 32
  q, k, v = _qkv(b, t, t, 4, 2, 16, seed=5)
  seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 14 + [0] * 6], b, axis=0), jnp.int32)
  ref = attention.plain_attention(q, k, v, q_slot=_causal_slots(b, t), kv_valid=seg > 0,
                                  segment_ids=seg)  # fmt: skip
  with jax.set_mesh(sharding.make_mesh(fsdp=4, tensor=2)):
    fn = jax.jit(lambda q, k, v, s: pallas_gpu.flash_attention(q, k, v, segment_ids=s,
                                                               block_size=16, interpret=True))
    lowered = fn.lower(q, k, v, seg).as_text()
    out = fn(q, k, v, seg)
  assert "shard_map" in lowered or "sdy.manual_computation" in lowered
  m = np.asarray(seg > 0)
  assert np.abs(np.asarray(out) - np.asarray(ref))[m].max() < 1e-5
