"""The engine's jitted pure steps (prefill, insert, one decode step, generate) and their types.

Shapes as in engine.py: Up distinct prompts of a prefill, P bucketed prompt length, Rb requests
of a prefill, I inserted requests, B = num_slots, S cache length, M pages per slot, k steps.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from fipo_jax import models
from fipo_jax.models import paged


@dataclasses.dataclass(frozen=True)
class PrefixHost:
  """What the host needs at insert: each prompt row's length, each request's row."""

  prompt_lens: tuple[int, ...]  # [U]
  rows: tuple[int, ...]  # [R]


@flax.struct.dataclass
class Prefix:
  """Up right-padded prompts of bucket length P, prefilled once, and R requests on them.

  Entries [:R] of the request fields (tokens, log_probs, key_data, rows) are requests[:R].
  """

  cache: models.KVCache  # k, v [L, Up, P, K, H]; mask bool[Up, P]
  lengths: jax.Array  # int32[Up] true prompt lengths
  rows: jax.Array  # int32[Rb] prompt row of each request
  tokens: jax.Array  # int32[Rb] first sampled token
  log_probs: jax.Array  # f32[Rb] its log-prob at the sampling temperature
  key_data: jax.Array  # uint32[Rb, 2] per-request PRNG key data
  host: PrefixHost | None = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class DecodeState:
  """The state of all B decode slots (a pytree; donated to every update)."""

  cache: models.KVCache | paged.PagedCache  # dense [L, B, S, K, H] or a page pool
  tokens: jax.Array  # int32[B] last sampled token, not yet fed to the model
  positions: jax.Array  # int32[B] position of `tokens`
  num_generated: jax.Array  # int32[B] tokens sampled so far (incl. the prefill's)
  max_new: jax.Array  # int32[B] per-slot budget of new tokens
  active: jax.Array  # bool[B] slot holds an unfinished request
  key_data: jax.Array  # uint32[B, 2] per-request PRNG key data


@flax.struct.dataclass
class ResultTokens:
  """What one `generate` call produced: k steps for B slots (rows past num_steps invalid)."""

  tokens: jax.Array  # int32[k, B]
  log_probs: jax.Array  # f32[k, B]
  valid: jax.Array  # bool[k, B] slot was active at that step
  active: jax.Array  # bool[B] after the call
  num_steps: jax.Array  # int32[] steps actually run


def request_key_data(seed: jax.Array, request_ids: jax.Array) -> jax.Array:
  """uint32[Bp, 2] key data for requests int32[Bp, 2] = (prompt_index, sample_index)."""
  root = jax.random.key(seed)

  def one(ids):
    return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(root, ids[0]), ids[1]))

  return jax.vmap(one)(request_ids)


def token_keys(key_data: jax.Array, step: jax.Array) -> jax.Array:
  """Typed keys [B] for token number `step` int32[B] of each request."""
  return jax.vmap(lambda kd, t: jax.random.fold_in(jax.random.wrap_key_data(kd), t))(key_data, step)


def prefill(
  graphdef, params, tokens, lengths, requests, seed, *, cfg, sampling, layout=None
) -> Prefix:
  """tokens int32[Up, P] right-padded, lengths int32[Up], requests int32[Rb, 3] = (row,
  prompt_index, sample_index) -> Prefix. Each prompt row is run once; request r's first token
  comes from row requests[r, 0]'s last logits with the key of (seed, prompt, sample).
  layout: the paged pool's PagedLayout; the prefix caches then leave in paged.prefix_spec."""
  batch, length = tokens.shape
  model = nnx.merge(graphdef, params)
  mask = jnp.arange(length)[None, :] < lengths[:, None]  # [Up, P]
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = models.init_cache(cfg, batch, length)
  hidden, cache = model.hidden_states(
    tokens, positions=positions, attention_mask=mask.astype(jnp.int32), cache=cache
  )
  # Only the last real token's logits are needed: skip the [Up, P, V] projection.
  last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [Up, 1, D]
  last = model.logits_from_hidden(last_hidden)[:, 0]  # f32[Up, V]
  rows = requests[:, 0]
  key_data = request_key_data(seed, requests[:, 1:])
  first, log_probs = sampling.select(last[rows], token_keys(key_data, jnp.zeros_like(rows)))
  if layout is not None:
    k, v = paged.shard_prefix(layout, cache.k, cache.v)
    cache = cache.replace(k=k, v=v)
  return Prefix(
    cache=cache, lengths=lengths, rows=rows, tokens=first, log_probs=log_probs, key_data=key_data
  )


def insert(
  prefix: Prefix, state: DecodeState, slots, reqs, pages, shards, max_new, stop_ids
) -> DecodeState:
  """Puts request reqs[i] (an index into the prefix's requests) into slot slots[i] int32[I].

  Out-of-range slots are padding (dropped). Paged: pages int32[I, M] are the slot's reserved
  page ids (local to its shard shards[i]; the requests come shard-major, see
  paged.insert_prompts); dense: both unused.
  """
  rows = prefix.rows[reqs]
  plens = prefix.lengths[rows]
  cache = state.cache
  if isinstance(cache, paged.PagedCache):  # each shard reads only its requests' prefix rows
    cache = paged.insert_prompts(cache, prefix.cache.k, prefix.cache.v, rows, pages, shards, plens)
    cache = cache.replace(page_table=cache.page_table.at[slots].set(pages, mode="drop"),
                          lengths=cache.lengths.at[slots].set(plens, mode="drop"))  # fmt: skip
  else:
    new_k, new_v = prefix.cache.k[:, rows], prefix.cache.v[:, rows]  # [L, I, P, K, H]
    plen = new_k.shape[2]
    k = cache.k.at[:, slots, :plen].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, :plen].set(new_v.astype(cache.v.dtype), mode="drop")
    row_mask = jnp.zeros((slots.shape[0], cache.mask.shape[1]), bool)
    row_mask = row_mask.at[:, :plen].set(prefix.cache.mask[rows])
    mask = cache.mask.at[slots].set(row_mask, mode="drop")
    index = cache.index.at[slots].set(plens, mode="drop")
    cache = cache.replace(k=k, v=v, mask=mask, index=index)
  tokens = prefix.tokens[reqs]
  done = jnp.isin(tokens, stop_ids) | (max_new <= 1)

  def put(x, y):
    return x.at[slots].set(y.astype(x.dtype), mode="drop")

  return DecodeState(
    cache=cache,
    tokens=put(state.tokens, tokens),
    positions=put(state.positions, plens),
    num_generated=put(state.num_generated, jnp.ones_like(plens)),
    max_new=put(state.max_new, max_new),
    active=put(state.active, ~done),
    key_data=put(state.key_data, prefix.key_data[reqs]),
  )


def decode_step(model, st: DecodeState):
  """One token for every slot: (logits f32[B, V], the cache with active slots' k/v added)."""
  active = st.active[:, None].astype(jnp.int32)
  logits, cache = model(st.tokens[:, None], positions=st.positions[:, None],
                        attention_mask=active, cache=st.cache)  # fmt: skip
  if not isinstance(cache, paged.PagedCache):
    # Idle slots must not creep towards the end of the cache (paged: only active ones grow).
    cache = cache.replace(index=jnp.where(st.active, cache.index, st.cache.index))
  return logits[:, 0], cache


def generate(graphdef, params, state: DecodeState, stop_ids, min_free, *, sampling, steps):
  """Up to `steps` decode steps; stops early once `min_free` slots finished or none is active.

  Returns (state, ResultTokens).
  """
  num_slots = state.tokens.shape[0]
  out = ResultTokens(
    tokens=jnp.zeros((steps, num_slots), jnp.int32),
    log_probs=jnp.zeros((steps, num_slots), jnp.float32),
    valid=jnp.zeros((steps, num_slots), bool),
    active=state.active,
    num_steps=jnp.zeros((), jnp.int32),
  )

  def cond(carry):
    st, res, freed = carry
    return (res.num_steps < steps) & jnp.any(st.active) & (freed < min_free)

  def body(carry):
    st, res, freed = carry
    logits, cache = decode_step(nnx.merge(graphdef, params), st)
    token, log_prob = sampling.select(logits, token_keys(st.key_data, st.num_generated))
    num_generated = st.num_generated + st.active.astype(jnp.int32)
    finished = st.active & (jnp.isin(token, stop_ids) | (num_generated >= st.max_new))
    i = res.num_steps
    res = res.replace(
      tokens=res.tokens.at[i].set(token),
      log_probs=res.log_probs.at[i].set(log_prob),
      valid=res.valid.at[i].set(st.active),
      num_steps=i + 1,
    )
    st = st.replace(
      cache=cache,
      tokens=jnp.where(st.active, token, st.tokens),
      positions=st.positions + st.active.astype(jnp.int32),
      num_generated=num_generated,
      active=st.active & ~finished,
    )
    return st, res, freed + jnp.sum(finished, dtype=jnp.int32)

  state, out, _ = jax.lax.while_loop(cond, body, (state, out, jnp.zeros((), jnp.int32)))
  return state, out.replace(active=state.active)
