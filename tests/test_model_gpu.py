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
