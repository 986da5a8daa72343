"""Packed rows (several sequences end to end, segment ids) equal each sequence run alone."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fipo_jax import models
from fipo_jax.models import attention, splash

# (prompt length, response length) of the three sequences packed into one row.
SEQS = ((4, 7), (3, 5), (6, 9))


def _qkv(b, t, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(b, t, n, h), f(b, t, k, h), f(b, t, k, h)


def _segments(lengths, total):
  """int32[1, total]: segment 1, 2, ... per length, then 0 (padding)."""
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
  return jnp.asarray(np.pad(seg, (0, total - len(seg)))[None].astype(np.int32))


def _alone(q, k, v, lengths):
  """Plain causal attention of each segment on its own, concatenated (pads left at 0)."""
  outs, start = [], 0
  for n in lengths:
    sl = slice(start, start + n)
    slots = jnp.arange(n, dtype=jnp.int32)[None]
    outs.append(
      attention.plain_attention(
        q[:, sl], k[:, sl], v[:, sl], q_slot=slots, kv_valid=jnp.ones((1, n), bool)
      )
    )
    start += n
  return jnp.concatenate(outs, axis=1), start


def _packed(fn, lengths, total, seed=0):
  q, k, v = _qkv(1, total, 4, 2, 8, seed)
  seg = _segments(lengths, total)
  slots = jnp.arange(total, dtype=jnp.int32)[None]
  out = fn(q, k, v, q_slot=slots, kv_valid=seg > 0, segment_ids=seg)
  ref, used = _alone(q, k, v, lengths)
  return np.asarray(out)[:, :used], np.asarray(ref)


@pytest.mark.parametrize("block", [4, 5, 64])
@pytest.mark.slow
def test_blockwise_segments_match_each_sequence_alone(block):
  lengths = (9, 3, 14, 1)
  fn = lambda *a, **kw: attention.blockwise_attention(*a, block_size=block, **kw)
  out, ref = _packed(fn, lengths, 32)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_plain_segments_match_each_sequence_alone():
  out, ref = _packed(attention.plain_attention, (9, 3, 14, 1), 30)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_blockwise_segment_gradients_match_plain():
  lengths, total = (7, 10, 5), 24
  q, k, v = _qkv(2, total, 4, 2, 8, seed=1)
  seg = jnp.concatenate([_segments(lengths, total), _segments((12, 12), total)])
  slots = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (2, total))
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  real = (seg > 0)[:, :, None, None].astype(jnp.float32)

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(
      fn(q, k, v, q_slot=slots, kv_valid=seg > 0, segment_ids=seg) * w * real
    )
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  blk = lambda *a, **kw: attention.blockwise_attention(*a, block_size=4, **kw)
  for a, b in zip(grads(blk), grads(attention.plain_attention), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_splash_interpreted_segments_match_each_sequence_alone():
  lengths = (100, 60, 90)
  q, k, v = _qkv(1, 256, 4, 2, 16, seed=3)
  seg = _segments(lengths, 256)
  out = splash.splash_attention(q, k, v, segment_ids=seg, block_size=128, interpret=True)
  ref, used = _alone(q, k, v, lengths)
  np.testing.assert_allclose(np.asarray(out)[:, :used], np.asarray(ref), atol=1e-5, rtol=0)


def test_cudnn_with_segments_falls_back_to_blockwise_and_says_so(caplog):
  """Packed rows under 'cudnn' run the Pallas flash kernel; at head_dim 8 (under its Triton
  tiles) that falls back to 'blockwise', logged once with the reason."""
  from fipo_jax.models import pallas_gpu

  pallas_gpu.log_fallback.cache_clear()
  lengths, total = (5, 8), 16
  q, k, v = _qkv(1, total, 4, 2, 8, seed=4)
  seg = _segments(lengths, total)
  slots = jnp.arange(total, dtype=jnp.int32)[None]
  with caplog.at_level(logging.INFO):
    for _ in range(2):
      out = attention.attention(
        q,
        k,
        v,
        q_slot=slots,
        kv_valid=seg > 0,
        impl="cudnn",
        block_size=4,
        self_attention=True,
        segment_ids=seg,
      )
  msgs = [r.message for r in caplog.records if "instead of 'pallas_flash'" in r.message]
  assert len(msgs) == 1 and "head_dim 8" in msgs[0], msgs  # logged once, with the reason
  ref, used = _alone(q, k, v, lengths)
  np.testing.assert_allclose(np.asarray(out)[:, :used], np.asarray(ref), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
  cfg = models.ModelConfig(
    model_type="qwen2",
    vocab_size=80,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    attention_impl="plain",
    attention_block_size=8,
  )
  _, params = nnx.split(models.init_model(cfg, seed=3))
  # The same params under each implementation's graph (the config is part of the graphdef).
  graph = lambda impl: nnx.split(
    models.abstract_model(dataclasses.replace(cfg, attention_impl=impl))
  )[0]
  return {impl: (graph(impl), params) for impl in ("plain", "blockwise")}


def _pack_row(seqs, total):
  """One packed row of (prompt, response) id arrays -> ids/seg/pos [1, 1, total], index."""
  ids, seg, pos, index, start = [], [], [], [], 0
  t_max = max(len(r) for _, r in seqs)
  for i, (p, r) in enumerate(seqs):
    n = len(p) + len(r)
    ids.append(np.concatenate([p, r]))
    seg.append(np.full(n, i + 1))
    pos.append(np.arange(n))
    # response token j sits at start + len(p) + j; its log-prob comes from the position before
    idx = start + len(p) - 1 + np.arange(t_max)
    index.append(np.where(np.arange(t_max) < len(r), idx, 0))
    start += n
  pad = lambda xs: np.pad(np.concatenate(xs), (0, total - start))[None, None].astype(np.int32)
  return pad(ids), pad(seg), pad(pos), np.stack(index)[None].astype(np.int32)


def _pad_rows(seqs):
  """The same sequences as padded rows: prompts left-padded, responses right-padded."""
  p_max, t_max = max(len(p) for p, _ in seqs), max(len(r) for _, r in seqs)
  ids = np.zeros((len(seqs), p_max + t_max), np.int32)
  mask = np.zeros_like(ids)
  for i, (p, r) in enumerate(seqs):
    ids[i, p_max - len(p) : p_max + len(r)] = np.concatenate([p, r])
    mask[i, p_max - len(p) : p_max + len(r)] = 1
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return ids, mask, pos, t_max


@pytest.mark.parametrize("impl", ["plain", "blockwise"])
@pytest.mark.slow
def test_packed_row_of_three_sequences_gives_each_sequences_log_probs(tiny, impl):
  graphdef, params = tiny[impl]
  rng = np.random.default_rng(0)
  seqs = [(rng.integers(0, 80, p), rng.integers(0, 80, t)) for p, t in SEQS]

  @jax.jit
  def packed(params, *arrays):
    return models.packed_response_log_probs(
      nnx.merge(graphdef, params), *arrays, temperature=0.7, chunk_size=16, return_entropy=True
    )

  @functools.partial(jax.jit, static_argnums=4)
  def padded(params, ids, mask, pos, t):
    return models.sequence_log_probs(
      nnx.merge(graphdef, params),
      ids,
      mask,
      pos,
      num_response_tokens=t,
      temperature=0.7,
      return_entropy=True,
    )

  lp, ent = packed(params, *_pack_row(seqs, 40))
  ref_lp, ref_ent = padded(params, *_pad_rows(seqs))
  for i, (_, r) in enumerate(seqs):
    np.testing.assert_allclose(np.asarray(lp)[0, i, : len(r)], ref_lp[i, : len(r)], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent)[0, i, : len(r)], ref_ent[i, : len(r)], atol=2e-5)


def test_segment_ids_refused_with_a_cache(tiny):
  model = nnx.merge(*tiny["blockwise"])
  cache = models.init_cache(model.cfg, 1, 8)
  with pytest.raises(ValueError, match="KV cache"):
    model(jnp.zeros((1, 2), jnp.int32), cache=cache, segment_ids=jnp.ones((1, 2), jnp.int32))
