"""A JetStream-style decode engine in pure JAX: prefill, insert, generate on fixed slots.

The engine owns no weights: `nnx.split` happens once (the graphdef is a static argument),
and every jitted entry point takes the params state, so new weights after an optimizer
step are used without recompiling. A `DecodeState` holds `num_slots` decode slots; each
slot has a row of the KV cache, its last sampled token, its position and its own PRNG key
(derived from (seed, prompt_index, sample_index), so a sample does not depend on which
slot or batch it ran in).

Shapes: Bp prefill batch (bucketed to a power of two <= num_slots), P bucketed prompt
length, B = num_slots, S cache length, k steps per `generate` call.

Flow per request: `prefill` (right-padded prompts -> a prefix KV cache and the first
sampled token) -> `insert` (copy the prefix into free slots) -> `generate` (up to k
decode steps for all slots in one jitted `while_loop`; it may return early so the host
can refill a freed slot).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.sampling import params as params_lib

_MIN_PREFILL_BUCKET = 16


@flax.struct.dataclass
class Prefix:
  """The result of prefilling Bp right-padded prompts of bucket length P."""

  cache: models.KVCache  # k, v [L, Bp, P, K, H]; mask bool[Bp, P]
  lengths: jax.Array  # int32[Bp] true prompt lengths
  tokens: jax.Array  # int32[Bp] first sampled token
  log_probs: jax.Array  # f32[Bp] its log-prob at the sampling temperature
  key_data: jax.Array  # uint32[Bp, 2] per-request PRNG key data


@flax.struct.dataclass
class DecodeState:
  """The state of all B decode slots (a pytree; donated to every update)."""

  cache: models.KVCache  # k, v [L, B, S, K, H]; mask bool[B, S]; index int32[B]
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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static engine sizes; the KV cache is sized from them once."""

  num_slots: int = 8  # B: concurrent decodes
  max_prompt_len: int = 512  # longest prompt accepted
  max_new_tokens: int = 512  # longest response
  steps_per_call: int = 16  # k: decode steps per jitted generate call
  min_prefill_bucket: int = _MIN_PREFILL_BUCKET

  def __post_init__(self):
    for name in (
      "num_slots",
      "max_prompt_len",
      "max_new_tokens",
      "steps_per_call",
      "min_prefill_bucket",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")

  @property
  def max_prefill_len(self) -> int:
    """Largest prefill bucket (a power of two >= max_prompt_len)."""
    return _next_pow2(max(self.max_prompt_len, self.min_prefill_bucket))

  @property
  def cache_len(self) -> int:
    """S: a slot must hold its prefill bucket and then prompt + response."""
    return max(self.max_prefill_len, self.max_prompt_len + self.max_new_tokens)

  def prefill_bucket(self, length: int) -> int:
    if length > self.max_prompt_len:
      raise ValueError(f"prompt of {length} tokens exceeds max_prompt_len={self.max_prompt_len}")
    return min(_next_pow2(max(length, self.min_prefill_bucket)), self.max_prefill_len)

  def batch_bucket(self, n: int) -> int:
    return min(_next_pow2(n), _next_pow2(self.num_slots))


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------- jitted pure steps


def _request_key_data(seed: jax.Array, request_ids: jax.Array) -> jax.Array:
  """uint32[Bp, 2] key data for requests int32[Bp, 2] = (prompt_index, sample_index)."""
  root = jax.random.key(seed)

  def one(ids):
    return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(root, ids[0]), ids[1]))

  return jax.vmap(one)(request_ids)


def _token_keys(key_data: jax.Array, step: jax.Array) -> jax.Array:
  """Typed keys [B] for token number `step` int32[B] of each request."""
  return jax.vmap(lambda kd, t: jax.random.fold_in(jax.random.wrap_key_data(kd), t))(key_data, step)


def _prefill(graphdef, params, tokens, lengths, request_ids, seed, *, cfg, sampling) -> Prefix:
  """tokens int32[Bp, P] right-padded, lengths int32[Bp] -> Prefix."""
  batch, length = tokens.shape
  model = nnx.merge(graphdef, params)
  mask = jnp.arange(length)[None, :] < lengths[:, None]  # [Bp, P]
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = models.init_cache(cfg, batch, length)
  hidden, cache = model.hidden_states(
    tokens, positions=positions, attention_mask=mask.astype(jnp.int32), cache=cache
  )
  # Only the last real token's logits are needed: skip the [Bp, P, V] projection.
  last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [Bp, 1, D]
  last = model.logits_from_hidden(last_hidden)[:, 0]  # f32[Bp, V]
  key_data = _request_key_data(seed, request_ids)
  first, log_probs = sampling.select(last, _token_keys(key_data, jnp.zeros_like(lengths)))
  return Prefix(cache=cache, lengths=lengths, tokens=first, log_probs=log_probs, key_data=key_data)


def _insert(prefix: Prefix, state: DecodeState, slots, max_new, stop_ids) -> DecodeState:
  """Copies prefix rows into `slots` int32[Bp] (out-of-range slots are padding, dropped)."""
  cache = state.cache
  plen = prefix.cache.k.shape[2]
  k = cache.k.at[:, slots, :plen].set(prefix.cache.k.astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, slots, :plen].set(prefix.cache.v.astype(cache.v.dtype), mode="drop")
  row_mask = (
    jnp.zeros((slots.shape[0], cache.mask.shape[1]), bool).at[:, :plen].set(prefix.cache.mask)
  )
  mask = cache.mask.at[slots].set(row_mask, mode="drop")
  index = cache.index.at[slots].set(prefix.lengths, mode="drop")
  done = jnp.isin(prefix.tokens, stop_ids) | (max_new <= 1)

  def put(x, y):
    return x.at[slots].set(y.astype(x.dtype), mode="drop")

  return DecodeState(
    cache=cache.replace(k=k, v=v, mask=mask, index=index),
    tokens=put(state.tokens, prefix.tokens),
    positions=put(state.positions, prefix.lengths),
    num_generated=put(state.num_generated, jnp.ones_like(prefix.lengths)),
    max_new=put(state.max_new, max_new),
    active=put(state.active, ~done),
    key_data=put(state.key_data, prefix.key_data),
  )


def _generate(graphdef, params, state: DecodeState, stop_ids, min_free, *, sampling, steps):
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
    model = nnx.merge(graphdef, params)
    logits, cache = model(
      st.tokens[:, None],
      positions=st.positions[:, None],
      attention_mask=st.active[:, None].astype(jnp.int32),
      cache=st.cache,
    )
    # Idle slots must not creep towards the end of the cache.
    cache = cache.replace(index=jnp.where(st.active, cache.index, st.cache.index))
    token, log_prob = sampling.select(logits[:, 0], _token_keys(st.key_data, st.num_generated))
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


# ---------------------------------------------------------------- the engine


class Engine:
  """JetStream-shaped engine over a fipo_jax Transformer (graphdef fixed, params passed in).

  Methods mirror `jetstream.engine.engine_api.Engine`: `load_params`, `init_decode_state`,
  `prefill`, `insert`, `generate`, `max_concurrent_decodes`, `max_prefill_length`; prefill
  and insert take a batch of requests (JetStream's take one). `abstract_decode_state`,
  `trace_prefill` and `trace_generate` give fipo_jax.aot the same jitted steps on abstract
  inputs, to compile for a TPU topology without running.
  """

  def __init__(
    self,
    model_cfg: models.ModelConfig,
    graphdef: nnx.GraphDef,
    cfg: EngineConfig = EngineConfig(),
    *,
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.model_cfg = model_cfg
    self.graphdef = graphdef
    self.cfg = cfg
    # Without a mesh: the one-device mesh that models.init_model / from_pretrained use.
    self.mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract = jax.eval_shape(self._zero_state)
    # Fixed output shardings: the state fed back into the next call never changes type (a
    # state whose sharding drifted between calls would recompile), and donation applies.
    self.state_shardings = decode_state_shardings(abstract, self.mesh)
    replicated = sharding.replicated(self.mesh)
    self._reshard = None  # built by the first load_params of on-device params
    self._init = jax.jit(self._zero_state, out_shardings=self.state_shardings)
    self._prefill = jax.jit(_prefill, static_argnames=("graphdef", "cfg", "sampling"))
    self._insert = jax.jit(_insert, donate_argnames=("state",),
                           out_shardings=self.state_shardings)  # fmt: skip
    self._generate = jax.jit(
      _generate, static_argnames=("graphdef", "sampling", "steps"), donate_argnames=("state",),
      out_shardings=(self.state_shardings, replicated),
    )  # fmt: skip

  @classmethod
  def from_model(cls, model: nnx.Module, cfg: EngineConfig = EngineConfig(), **kwargs):
    """Splits `model` once; returns (engine, params state placed on the engine's mesh)."""
    graphdef, state = nnx.split(model)
    engine = cls(model.cfg, graphdef, cfg, **kwargs)
    return engine, engine.load_params(state)

  # JetStream API --------------------------------------------------------------

  @property
  def max_concurrent_decodes(self) -> int:
    return self.cfg.num_slots

  @property
  def max_prefill_length(self) -> int:
    return self.cfg.max_prompt_len

  @property
  def samples_per_slot(self) -> int:
    return 1

  def load_params(self, params: nnx.State) -> nnx.State:
    """Places params on the engine's mesh with the training rules table's shardings.

    Params already spread over the mesh's devices (the trainer's, in another layout) are
    resharded by one jitted identity, device to device (`jax.device_put` between two meshes of
    the same devices trips the host-to-device transfer guard on jax 0.10 CPU: it stages through
    the host). Anything else (one-device or host params) is placed with `device_put`.
    """
    targets = sharding.state_shardings(params, self.mesh)
    devices = set(self.mesh.devices.flat)
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(targets), strict=True))
    if not all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x, _ in pairs):
      return sharding.shard_params(params, self.mesh)
    if all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in pairs):
      return params  # already in the engine's layout: no copy
    if self._reshard is None:  # jitted once: the params' structure never changes
      self._reshard = jax.jit(lambda p: p, out_shardings=targets)
    return self._reshard(params)

  def init_decode_state(self) -> DecodeState:
    """All slots empty; placed with `state_shardings`."""
    return self._init()

  def _zero_state(self) -> DecodeState:
    b = self.cfg.num_slots
    return DecodeState(
      cache=models.init_cache(self.model_cfg, b, self.cfg.cache_len),
      tokens=jnp.zeros((b,), jnp.int32),
      positions=jnp.zeros((b,), jnp.int32),
      num_generated=jnp.zeros((b,), jnp.int32),
      max_new=jnp.zeros((b,), jnp.int32),
      active=jnp.zeros((b,), bool),
      key_data=jnp.zeros((b, 2), jnp.uint32),
    )

  def prefill(
    self,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    request_ids: Sequence[tuple[int, int]],
    *,
    seed: int,
    sampling: params_lib.SamplingMethod,
  ) -> Prefix:
    """Prefills up to num_slots prompts (token lists) padded to (batch, length) buckets."""
    n = len(prompts)
    if not 0 < n <= self.cfg.num_slots:
      raise ValueError(f"prefill takes 1..{self.cfg.num_slots} prompts, got {n}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise ValueError("empty prompt")
    plen = self.cfg.prefill_bucket(max(lengths))
    bsz = self.cfg.batch_bucket(n)
    tokens = np.zeros((bsz, plen), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    lens = np.ones((bsz,), np.int32)
    lens[:n] = lengths
    ids = np.zeros((bsz, 2), np.int32)
    ids[:n] = np.asarray(request_ids, np.int32).reshape(n, 2)
    return self._prefill(
      self.graphdef,
      params,
      tokens,
      lens,
      ids,
      np.uint32(seed),
      cfg=self.model_cfg,
      sampling=sampling,
    )

  def insert(
    self,
    prefix: Prefix,
    state: DecodeState,
    slots: Sequence[int],
    max_new_tokens: Sequence[int],
    stop_ids: Sequence[int],
  ) -> DecodeState:
    """Puts prefix row i into slot slots[i]; rows past len(slots) are padding."""
    bsz = prefix.lengths.shape[0]
    slot_arr = np.full((bsz,), self.cfg.num_slots, np.int32)  # out of range: dropped
    slot_arr[: len(slots)] = slots
    budget = np.ones((bsz,), np.int32)
    budget[: len(slots)] = max_new_tokens
    if budget.max() > self.cfg.max_new_tokens:
      raise ValueError(f"max_new_tokens {budget.max()} > engine max {self.cfg.max_new_tokens}")
    return self._insert(prefix, state, slot_arr, budget, _stop_array(stop_ids))

  def generate(
    self,
    params: nnx.State,
    state: DecodeState,
    *,
    sampling: params_lib.SamplingMethod,
    stop_ids: Sequence[int],
    min_free: int | None = None,
  ) -> tuple[DecodeState, ResultTokens]:
    """Runs up to steps_per_call decode steps; returns early once `min_free` slots finish."""
    if min_free is None:
      min_free = self.cfg.num_slots + 1
    return self._generate(
      self.graphdef,
      params,
      state,
      _stop_array(stop_ids),
      np.int32(min_free),
      sampling=sampling,
      steps=self.cfg.steps_per_call,
    )

  # Ahead-of-time compilation (fipo_jax.aot): the jitted steps on abstract inputs -----------

  def abstract_decode_state(self) -> DecodeState:
    """`init_decode_state()` as sharded ShapeDtypeStructs (nothing allocated)."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(self._zero_state), self.state_shardings,
    )  # fmt: skip

  def trace_prefill(self, params, *, sampling: params_lib.SamplingMethod) -> jax.stages.Traced:
    """The largest prefill (Bp = batch_bucket(num_slots), P = max_prefill_len), traced.

    params: arrays or sharded ShapeDtypeStructs; token inputs are sharded over the batch axes.
    """
    bsz, plen = self.cfg.batch_bucket(self.cfg.num_slots), self.cfg.max_prefill_len

    def arg(shape, dtype):
      return jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape))
      )

    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding.replicated(self.mesh))
    return self._prefill.trace(
      self.graphdef, params, arg((bsz, plen), jnp.int32), arg((bsz,), jnp.int32),
      arg((bsz, 2), jnp.int32), seed, cfg=self.model_cfg, sampling=sampling,
    )  # fmt: skip

  def trace_generate(self, params, *, sampling: params_lib.SamplingMethod) -> jax.stages.Traced:
    """One `generate` call (steps_per_call decode steps of all B slots, S cache), traced."""
    rep = sharding.replicated(self.mesh)
    stop = jax.ShapeDtypeStruct(_stop_array([0]).shape, jnp.int32, sharding=rep)
    min_free = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return self._generate.trace(
      self.graphdef, params, self.abstract_decode_state(), stop, min_free,
      sampling=sampling, steps=self.cfg.steps_per_call,
    )  # fmt: skip


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
  """int32[n] stop ids padded with -1 to n, a power of two (no recompiles for small changes)."""
  ids = sorted(set(int(i) for i in stop_ids))
  out = np.full((_next_pow2(max(len(ids), 1)),), -1, np.int32)
  out[: len(ids)] = ids
  return out


def decode_state_shardings(state: DecodeState, mesh: jax.sharding.Mesh):
  """Slots over the batch mesh axes, kv heads over `tensor` (the training rules table)."""
  cache_axes = ("layers", "cache_batch", "seq", "kv_heads", "head_dim")

  def one(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith(".k") or name.endswith(".v"):
      return sharding.named_sharding(mesh, cache_axes, x.shape)
    return sharding.named_sharding(mesh, ("cache_batch",) + (None,) * (x.ndim - 1), x.shape)

  return jax.tree_util.tree_map_with_path(one, state)
