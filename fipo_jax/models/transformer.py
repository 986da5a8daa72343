"""The decoder: embedding, L scanned pre-norm blocks (GQA attention + SwiGLU), final norm.

Layer params are stacked with a leading 'layers' axis and the forward runs `lax.scan` over
them (or a Python loop when scan_layers=False), so compile time does not grow with depth.
One forward serves training/log-probs (no cache), prefill/decode (a dense KV cache) and decode
against a paged cache (models/paged.py: one token per slot, the pool read, not carried).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fipo_jax import sharding
from fipo_jax.models import attention as attention_lib
from fipo_jax.models import config as config_lib
from fipo_jax.models import kv_cache as kv_cache_lib
from fipo_jax.models import layers
from fipo_jax.models import paged as paged_lib

_REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


# Logical axes of the residual stream x [B, Q, D] (sharding.RULES).
_RESIDUAL = ("activation_batch", "activation_length", "activation_embed")


def layer_param_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[tuple, tuple]]:
  """name -> (per-layer shape, logical axes) of every stacked layer parameter."""
  d, f, n, k, h = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
  )
  out = {
    "input_norm": ((d,), ("norm",)),
    "q_proj": ((d, n, h), ("embed", "heads", "head_dim")),
    "k_proj": ((d, k, h), ("embed", "kv_heads", "head_dim")),
    "v_proj": ((d, k, h), ("embed", "kv_heads", "head_dim")),
    "o_proj": ((n, h, d), ("heads", "head_dim", "embed")),
    "post_norm": ((d,), ("norm",)),
    "gate_proj": ((d, f), ("embed", "mlp")),
    "up_proj": ((d, f), ("embed", "mlp")),
    "down_proj": ((f, d), ("mlp", "embed")),
  }
  if cfg.qkv_bias:
    out["q_bias"] = ((n, h), ("heads", "head_dim"))
    out["k_bias"] = ((k, h), ("kv_heads", "head_dim"))
    out["v_bias"] = ((k, h), ("kv_heads", "head_dim"))
  if cfg.qk_norm:
    out["q_norm"] = ((h,), ("head_dim",))
    out["k_norm"] = ((h,), ("head_dim",))
  return out


def _init_value(name: str, shape: tuple, key: jax.Array, dtype) -> jax.Array:
  if name.endswith("norm"):
    return jnp.ones(shape, dtype)
  if name.endswith("bias"):
    return jnp.zeros(shape, dtype)
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
  """All L blocks' parameters, stacked on a leading 'layers' axis."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.names = tuple(layer_param_shapes(cfg))
    for name, (shape, axes) in layer_param_shapes(cfg).items():
      value = _init_value(name, (cfg.num_layers,) + shape, rngs.params(), dtype)
      setattr(self, name, nnx.Param(value, axes=("layers",) + axes))

  def values(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in self.names}


def _block(
  cfg, p, x, cos, sin, q_slot, kv_valid, kv=None, layer=None, cache_index=None, segment_ids=None
):
  """One pre-norm block on x [B, Q, D] (segment_ids [B, Q]: packed rows, no cache).

  With kv = (k_all, v_all) [L, B, S, K, H], writes this layer's new k/v into the full cache in
  place (a per-row scatter, no copy of the cache) and returns (x, (k_all, v_all)).
  """
  dtype = x.dtype

  def attend(q, k, v):
    kv_out = kv
    if kv is not None:
      kv_out = tuple(
        kv_cache_lib.write_layer_rows(buf, new, layer, cache_index)
        for buf, new in zip(kv, (k, v), strict=True)
      )
      k, v = (jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False) for buf in kv_out)
    attn = attention_lib.attention(
      q,
      k.astype(dtype),
      v.astype(dtype),
      q_slot=q_slot,
      kv_valid=kv_valid,
      impl=cfg.attention_impl,
      block_size=cfg.attention_block_size,
      self_attention=kv is None,
      segment_ids=segment_ids,
    )
    return attn, kv_out

  return _block_with(cfg, p, x, cos, sin, attend)


def _block_with(cfg, p, x, cos, sin, attend):
  """The block around `attend(q [B, Q, N, H], k, v [B, Q, K, H]) -> (attn [B, Q, N, H], aux)`.

  Returns (x [B, Q, D], aux).
  """
  dtype = x.dtype
  x = sharding.constrain(x, _RESIDUAL)
  hn = layers.rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
  q, k, v = layers.qkv_proj(hn, p, cfg, cos, sin)
  attn, aux = attend(q, k, v)
  attn = checkpoint_name(attn, "attn_out")
  x = x + layers.dense(attn, p["o_proj"], "btnh,nhd->btd", dtype)
  hn = layers.rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
  x = x + layers.swiglu_mlp(hn, p, dtype)
  return sharding.constrain(x, _RESIDUAL), aux


class Transformer(nnx.Module):
  """Qwen2 / Llama / Qwen3 causal decoder (flags in ModelConfig)."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.param_dtype)
    v, d = cfg.vocab_size, cfg.hidden_size
    self.embed = nnx.Param(
      _init_value("embed", (v, d), rngs.params(), dtype), axes=("vocab", "embed")
    )
    self.layers = DecoderLayers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((d,), dtype), axes=("norm",))
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(
        _init_value("lm_head", (d, v), rngs.params(), dtype), axes=("embed", "vocab")
      )

  def unembedding(self) -> jax.Array:
    """The output projection W [D, V] (the transposed embedding when tied)."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V]."""
    w = self.unembedding().astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)

  def __call__(
    self, input_ids, *, positions=None, attention_mask=None, cache=None, segment_ids=None
  ):
    """input_ids int32[B, Q] -> logits f32[B, Q, V] (and the new cache when one is given)."""
    out = self.hidden_states(
      input_ids,
      positions=positions,
      attention_mask=attention_mask,
      cache=cache,
      segment_ids=segment_ids,
    )
    if cache is None:
      return self.logits_from_hidden(out)
    hidden, new_cache = out
    return self.logits_from_hidden(hidden), new_cache

  def hidden_states(
    self, input_ids, *, positions=None, attention_mask=None, cache=None, segment_ids=None
  ):
    """Final-normed hidden states [B, Q, D] in the compute dtype (and the new cache).

    Packed rows (several sequences end to end) pass segment_ids int32[B, Q] (1, 2, ... per
    sequence, 0 for padding) and each token's position within its own sequence; attention
    never crosses a segment. No cache then.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    b, t = input_ids.shape
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
    if isinstance(cache, paged_lib.PagedCache):
      return self._paged_decode(input_ids, positions, attention_mask, cache)
    if attention_mask is None:
      attention_mask = (segment_ids > 0) if segment_ids is not None else jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    steps = jnp.arange(t, dtype=jnp.int32)[None, :]
    if cache is None:
      q_slot = jnp.broadcast_to(steps, (b, t))
      kv_valid = attention_mask
      if positions is None:
        positions = q_slot
    else:
      q_slot = cache.index[:, None] + steps
      kv_valid, new_index = kv_cache_lib.update_mask(cache, attention_mask)
      if positions is None:
        positions = q_slot
    cos, sin = layers.rope_cos_sin(positions.astype(jnp.int32), cfg.head_dim, cfg.rope_theta)
    x = sharding.constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(dtype), _RESIDUAL)
    params = self.layers.values()

    def body(carry, inputs):
      x, kv = carry
      p, layer = inputs
      idx = None if cache is None else cache.index
      return _block(cfg, p, x, cos, sin, q_slot, kv_valid, kv, layer, idx, segment_ids), None

    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=_REMAT[cfg.remat_policy], prevent_cse=False)

    kv = None if cache is None else (cache.k, cache.v)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    x, kv = self._run_layers(body, (x, kv), (params, layer_ids))
    if cache is not None:
      cache = kv_cache_lib.KVCache(k=kv[0], v=kv[1], mask=kv_valid, index=new_index)
    hidden = sharding.constrain(
      layers.rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), _RESIDUAL
    )
    return hidden if cache is None else (hidden, cache)

  def _paged_decode(self, input_ids, positions, attention_mask, cache):
    """One decode token per slot against a paged cache: input_ids int32[B, 1], positions
    int32[B, 1], attention_mask [B, 1] (1 = the slot is active: its token is written).

    Gather kernels: the pool is read, not carried, by the layer scan; each layer's new k/v
    [B, K, H] come back as scan outputs and are written into the pool once after the scan.
    The ragged paged attention and GPU paged attention kernels (layout.carried) read their
    token from the pool, so the scan carries the pool and each layer writes its token before
    attending.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if input_ids.shape[1] != 1:
      raise ValueError(f"a paged cache decodes one token per slot, got {input_ids.shape[1]}")
    active = attention_mask[:, 0].astype(bool)
    live = jnp.where(active, cache.lengths, 0)  # idle slots gather no pages
    if positions is None:
      positions = cache.lengths[:, None]
    cos, sin = layers.rope_cos_sin(positions.astype(jnp.int32), cfg.head_dim, cfg.rope_theta)
    x = sharding.constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(dtype), _RESIDUAL)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (self.layers.values(), layer_ids)

    if cache.layout.carried:

      def carried(carry, inputs):
        (x, pools), (p, layer) = carry, inputs

        def attend(q, k, v):
          pools_, out = paged_lib.write_and_attend(q[:, 0], k[:, 0], v[:, 0], pools, cache,
                                                   layer, active)  # fmt: skip
          return out[:, None], pools_

        return _block_with(cfg, p, x, cos, sin, attend), None

      x, (pool_k, pool_v) = self._run_layers(carried, (x, (cache.k, cache.v)), xs)
      cache = cache.replace(k=pool_k, v=pool_v, lengths=cache.lengths + active.astype(jnp.int32))
    else:

      def body(x, inputs):
        p, layer = inputs

        def attend(q, k, v):
          out = paged_lib.decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, layer, live)
          return out[:, None], (k[:, 0], v[:, 0])

        return _block_with(cfg, p, x, cos, sin, attend)

      x, (k_new, v_new) = self._run_layers(body, x, xs, stack=True)
      cache = paged_lib.write_tokens(cache, k_new, v_new, active)
    hidden = sharding.constrain(
      layers.rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), _RESIDUAL
    )
    return hidden, cache

  def _run_layers(self, fn, carry, xs, stack: bool = False):
    """Runs fn over the layers; with `stack`, returns (carry, stacked per-layer outputs)."""
    if self.cfg.scan_layers:
      carry, ys = jax.lax.scan(fn, carry, xs)
      return (carry, ys) if stack else carry
    outs = []
    for i in range(self.cfg.num_layers):
      carry, y = fn(carry, jax.tree.map(lambda a, i=i: a[i], xs))
      outs.append(y)
    if not stack:
      return carry
    return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
