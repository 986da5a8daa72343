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
