"""A JetStream-style decode engine in pure JAX: prefill, insert, generate on fixed slots.

The engine owns no weights: `nnx.split` happens once (the graphdef is a static argument),
and every jitted entry point takes the params state, so new weights after an optimizer
step are used without recompiling. A `DecodeState` holds `num_slots` decode slots; each
slot has a row of the KV cache, its last sampled token, its position and its own PRNG key
(derived from (seed, prompt_index, sample_index), so a sample does not depend on which
slot or batch it ran in).

Two KV layouts (`EngineConfig.kv_layout`): 'paged' (default; models/paged.py: a page pool,
a page table per slot, decode attention whose work follows the live lengths) and 'dense'
(a [L, B, S, K, H] cache; the reference mode and the test oracle: both give the same
tokens and log-probs). The sizes are `EngineConfig` (sampling/engine_config.py); each
layout's wiring (the pool and decode kernel a model gets on a mesh, the fresh cache, the decode
state's shardings) is sampling/layouts.py.

Shapes: Up prefill batch of distinct prompts (bucketed to a power of two <= num_slots), P
bucketed prompt length, Rb requests of a prefill (a power of two), I inserted requests
(bucketed), B = num_slots, S cache length, M pages per slot, k steps per `generate` call.

Flow: `prefill` (each distinct prompt once -> a prefix KV cache, and every request's first
token sampled from its prompt row's last logits with its own key) -> `insert` (a request's
prompt tokens into a free slot; the paged layout reserves the slot's worst case of pages on
the host) -> `generate` (up to k decode steps for all slots in one jitted `while_loop`; it
may return early so the host can refill freed slots) -> `release` (a finished slot's pages).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.models import page_allocator
from fipo_jax.sampling import layouts, staging, steps
from fipo_jax.sampling import params as params_lib
from fipo_jax.sampling.engine_config import EngineConfig
from fipo_jax.sampling.engine_config import next_pow2 as _next_pow2
from fipo_jax.sampling.engine_config import stop_array as _stop_array
from fipo_jax.sampling.layouts import decode_state_shardings
from fipo_jax.sampling.steps import DecodeState, Prefix, ResultTokens
from fipo_jax.sampling.traces import Traces

__all__ = ["DecodeState", "Engine", "EngineConfig", "Prefix", "ResultTokens",
           "decode_state_shardings"]  # fmt: skip

_DEFAULT_CONFIG = EngineConfig()  # a frozen dataclass: one shared default

# ---------------------------------------------------------------- the engine


class Engine(Traces):
  """JetStream-shaped engine over a fipo_jax Transformer (graphdef fixed, params passed in).

  Methods mirror `jetstream.engine.engine_api.Engine`: `load_params`, `init_decode_state`,
  `prefill`, `insert`, `generate`, `max_concurrent_decodes`, `max_prefill_length`; prefill
  and insert take a batch of requests (JetStream's take one). Host-only page bookkeeping of the
  paged layout: `can_insert` (enough free pages in a slot's shard) and `release` (a finished
  slot's pages; `init_decode_state` frees them all). `abstract_decode_state`,
  `trace_prefill` and `trace_generate` give fipo_jax.aot the same jitted steps on abstract
  inputs, to compile for a TPU topology without running.
  """

  def __init__(
    self,
    model_cfg: models.ModelConfig,
    graphdef: nnx.GraphDef,
    cfg: EngineConfig = _DEFAULT_CONFIG,
    *,
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.model_cfg = model_cfg
    self.graphdef = graphdef
    self.cfg = cfg
    # Without a mesh: the one-device mesh that models.init_model / from_pretrained use.
    self.mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.layout = layouts.paged_layout(model_cfg, cfg, self.mesh)
    shards = self.layout.num_shards
    # The pool splits over the slots' shards: round it up to a multiple of their count.
    pool = cfg.num_pages or cfg.num_slots * cfg.pages_per_slot
    self.num_pages = -(-pool // shards) * shards
    self.allocator = page_allocator.PageAllocator(cfg.num_slots, self.num_pages, shards)
    abstract = jax.eval_shape(self._zero_state)
    # Fixed output shardings: the state fed back into the next call never changes type (a
    # state whose sharding drifted between calls would recompile), and donation applies.
    self.state_shardings = layouts.decode_state_shardings(abstract, self.mesh)
    replicated = sharding.replicated(self.mesh)
    self._reshard = None  # the handover, built by the first load_params
    self._stager = None  # the same onto disjoint devices (rollout.mode='disaggregated')
    self._init = jax.jit(self._zero_state, out_shardings=self.state_shardings)
    # Paged: the prefix leaves with its rows split over the slots' shards (insert_prompts).
    prefill = functools.partial(steps.prefill, layout=self.layout if self.paged else None)
    self._prefill = jax.jit(prefill, static_argnames=("graphdef", "cfg", "sampling"))
    self._insert = jax.jit(steps.insert, donate_argnames=("state",),
                           out_shardings=self.state_shardings)  # fmt: skip
    self._generate = jax.jit(
      steps.generate, static_argnames=("graphdef", "sampling", "steps"), donate_argnames=("state",),
      out_shardings=(self.state_shardings, replicated),
    )  # fmt: skip

  @classmethod
  def from_model(cls, model: nnx.Module, cfg: EngineConfig = _DEFAULT_CONFIG, **kwargs):
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

  @property
  def param_dtype(self) -> jnp.dtype:
    """The dtype the sampler holds its weights in (its model config's param_dtype)."""
    return jnp.dtype(self.model_cfg.param_dtype)

  def load_params(self, params: nnx.State) -> nnx.State:
    """Params on the engine's mesh, in the training rules table's shardings and `param_dtype`.

    Params already spread over the mesh's devices (the trainer's float32 masters, in its
    layout) go through `handover`: one jitted reshard plus cast, device to device
    (`jax.device_put` between two meshes of the same devices trips the host-to-device transfer
    guard on jax 0.10 CPU: it stages through the host). Params on devices disjoint from the
    mesh's (a trainer mesh of their own) are staged device to device (`staging.WeightStager`).
    Params already in the layout and dtype are returned as they are. Anything else (one-device
    or host params) is placed with `device_put`, then cast.
    """
    if self._on_other_devices(params):
      stager = self._stager_for(params)
      stager.start(params)
      return stager.take()
    targets = sharding.state_shardings(params, self.mesh)
    devices = set(self.mesh.devices.flat)
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(targets), strict=True))
    if not all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x, _ in pairs):
      params = sharding.shard_params(params, self.mesh)
    elif all(x.sharding.is_equivalent_to(s, x.ndim)
             and x.dtype == staging.leaf_dtype(x, self.param_dtype) for x, s in pairs):
      return params  # already in the engine's layout and dtype: no copy
    return self.handover(params)(params)

  def handover(self, params) -> jax.stages.Wrapped:
    """The jitted handover (params in any layout -> the engine's shardings, cast to
    `param_dtype`), built once: the params' structure never changes. `params`: arrays or
    ShapeDtypeStructs of that structure. fipo_jax.aot compiles it from the train layout. For
    params on other devices: the staging's first hop (a reshard into a mirror of the engine's
    layout on the params' devices; the second hop copies device to device, nothing to
    compile)."""
    if self._on_other_devices(params):
      return self._stager_for(params).program(params)
    if self._reshard is None:
      targets = sharding.state_shardings(params, self.mesh)
      self._reshard = jax.jit(functools.partial(staging.cast, dtype=self.param_dtype),
                              out_shardings=targets)
    return self._reshard

  def abstract_params(self, params):
    """The ShapeDtypeStructs `load_params` returns for `params` (arrays or ShapeDtypeStructs):
    the engine's shardings, `param_dtype` for floating leaves."""
    targets = sharding.state_shardings(params, self.mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
      x.shape, staging.leaf_dtype(x, self.param_dtype), sharding=s), params, targets)

  def _on_other_devices(self, params) -> bool:
    """Whether every leaf of `params` has a sharding and none shares a device with the mesh."""
    leaves, mine = jax.tree.leaves(params), set(self.mesh.devices.flat)
    return bool(leaves) and all(getattr(x, "sharding", None) is not None for x in leaves) \
      and not any(x.sharding.device_set & mine for x in leaves)

  def _stager_for(self, params) -> staging.WeightStager:
    if self._stager is None:
      self._stager = staging.WeightStager(sharding.state_shardings(params, self.mesh),
                                          self.param_dtype)
    return self._stager

  def init_decode_state(self) -> DecodeState:
    """All slots empty (every page free); placed with `state_shardings`."""
    self.allocator = page_allocator.PageAllocator(self.cfg.num_slots, self.num_pages,
                                         self.layout.num_shards)  # fmt: skip
    return self._init()

  @property
  def paged(self) -> bool:
    return self.cfg.kv_layout == "paged"

  def can_insert(self, slot: int, prompt_len: int, max_new: int) -> bool:
    """Host only: whether `slot`'s shard has the pages for this request now."""
    if not self.paged:
      return 0 <= slot < self.cfg.num_slots
    return self.allocator.available(slot) >= self.cfg.pages_needed(prompt_len, max_new)

  def release(self, slots: Sequence[int]) -> None:
    """Host only: frees the pages of finished `slots` (inserting into a slot frees its old ones
    too)."""
    for slot in slots:
      self.allocator.release(int(slot))

  def _zero_state(self) -> DecodeState:
    b, cfg = self.cfg.num_slots, self.cfg
    return DecodeState(
      cache=layouts.init_cache(self.model_cfg, cfg, self.layout, self.num_pages),
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
    requests: Sequence[tuple[int, int, int]],
    *,
    seed: int,
    sampling: params_lib.SamplingMethod,
  ) -> Prefix:
    """Prefills U <= num_slots prompts (token lists) once, padded to (batch, length) buckets.

    requests: R >= 1 tuples (row, prompt_index, sample_index), `row` indexing `prompts`; each
    request's first token is sampled from its row's last logits with the key of (seed,
    prompt_index, sample_index). (prompt_index, sample_index) pairs mean one request per row.
    """
    n = len(prompts)
    if not 0 < n <= self.cfg.num_slots:
      raise ValueError(f"prefill takes 1..{self.cfg.num_slots} prompts, got {n}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise ValueError("empty prompt")
    reqs = _request_array(requests, n)
    plen = self.cfg.prefill_bucket(max(lengths))
    bsz = self.cfg.batch_bucket(n)
    tokens = np.zeros((bsz, plen), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    lens = np.ones((bsz,), np.int32)
    lens[:n] = lengths
    ids = np.zeros((_next_pow2(len(reqs)), 3), np.int32)
    ids[: len(reqs)] = reqs
    prefix = self._prefill(
      self.graphdef,
      params,
      tokens,
      lens,
      ids,
      np.uint32(seed),
      cfg=self.model_cfg,
      sampling=sampling,
    )
    return prefix.replace(host=steps.PrefixHost(tuple(lengths), tuple(int(r) for r in reqs[:, 0])))

  def insert(
    self,
    prefix: Prefix,
    state: DecodeState,
    slots: Sequence[int],
    request_rows: Sequence[int],
    max_new_tokens: Sequence[int],
    stop_ids: Sequence[int],
  ) -> DecodeState:
    """Puts request request_rows[i] (an index into the prefix's requests) into slot slots[i].

    The paged layout reserves each slot's worst case of pages (its old ones are freed first);
    ValueError if a slot's shard has too few free pages (nothing is reserved then).
    """
    num = len(slots)
    if not 0 < num == len(request_rows) == len(max_new_tokens):
      raise ValueError(f"insert: {num} slots, {len(request_rows)} requests, "
                       f"{len(max_new_tokens)} budgets")  # fmt: skip
    if max(max_new_tokens) > self.cfg.max_new_tokens:
      raise ValueError(
        f"max_new_tokens {max(max_new_tokens)} > engine max {self.cfg.max_new_tokens}"
      )
    if prefix.host is None or max(request_rows) >= len(prefix.host.rows) or min(request_rows) < 0:
      raise ValueError("insert: request_rows must index the requests of an Engine.prefill")
    if self.paged:
      lens = [prefix.host.prompt_lens[prefix.host.rows[r]] for r in request_rows]
      budgets = zip(lens, max_new_tokens, strict=True)
      self._reserve(slots, [self.cfg.pages_needed(n, m) for n, m in budgets])
    bsz, at = self._request_order(slots, least=prefix.tokens.shape[0]
                                  if self.cfg.insert_bucket == "prefix" else 1)  # fmt: skip
    slot_arr = np.full((bsz,), self.cfg.num_slots, np.int32)  # out of range: dropped
    slot_arr[at] = slots
    req = np.zeros((bsz,), np.int32)
    req[at] = request_rows
    budget = np.ones((bsz,), np.int32)
    budget[at] = max_new_tokens
    pages = np.zeros((bsz, self.cfg.pages_per_slot), np.int32)
    shards = np.full((bsz,), -1, np.int32)
    if self.paged:
      for i, slot in zip(at, slots, strict=True):
        held = self.allocator.held[int(slot)]
        pages[i, : len(held)] = held
        shards[i] = self.allocator.shard(int(slot))
    return self._insert(prefix.replace(host=None), state, slot_arr, req, pages, shards, budget,
                        _stop_array(stop_ids))  # fmt: skip

  def _request_order(self, slots: Sequence[int], least: int = 1) -> tuple[int, list[int]]:
    """(I, the index of each slot's request in insert's arrays), with room for at least `least`
    requests (a shard's). Paged: shard-major, C = a power of two entries per shard
    (paged.insert_prompts gives each shard its own C); dense: in order, I = batch_bucket."""
    if not self.paged:
      return self.cfg.batch_bucket(max(len(slots), least)), list(range(len(slots)))
    shard_of = [self.allocator.shard(int(s)) for s in slots]
    counts = [shard_of.count(d) for d in range(self.layout.num_shards)]
    per_shard = min(_next_pow2(max(*counts, least)), _next_pow2(self.allocator.slots_per_shard))
    at = [d * per_shard + shard_of[:i].count(d) for i, d in enumerate(shard_of)]
    return self.layout.num_shards * per_shard, at

  def _reserve(self, slots: Sequence[int], needs: Sequence[int]) -> None:
    """Reserves needs[i] pages for slots[i], all or none."""
    if len(set(slots)) != len(slots):
      raise ValueError(f"insert: duplicate slots {list(slots)}")
    want: dict[int, int] = {}
    for slot, need in zip(slots, needs, strict=True):
      if not 0 <= slot < self.cfg.num_slots:
        raise ValueError(f"slot {slot} out of range [0, {self.cfg.num_slots})")
      shard = self.allocator.shard(slot)
      want[shard] = want.get(shard, 0) + need - len(self.allocator.held.get(slot, ()))
    for shard, need in want.items():
      free = len(self.allocator.free[shard])
      if need > free:
        raise ValueError(f"insert: shard {shard} needs {need} more pages, has {free} free; "
                         "release finished slots")  # fmt: skip
    for slot, need in zip(slots, needs, strict=True):
      self.allocator.reserve(int(slot), need)

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


def _request_array(requests, num_prompts: int) -> np.ndarray:
  """int32[R, 3] (row, prompt_index, sample_index); (prompt, sample) pairs mean row = index."""
  reqs = [tuple(int(x) for x in r) for r in requests]
  if not reqs:
    raise ValueError("prefill needs at least one request")
  if all(len(r) == 2 for r in reqs):
    if len(reqs) != num_prompts:
      raise ValueError(f"{len(reqs)} (prompt, sample) requests for {num_prompts} prompts")
    reqs = [(i, *r) for i, r in enumerate(reqs)]
  out = np.asarray(reqs, np.int32)
  if out.shape[1:] != (3,) or out[:, 0].min() < 0 or out[:, 0].max() >= num_prompts:
    raise ValueError(f"requests must be (row, prompt_index, sample_index), row < {num_prompts}")
  return out
