"""The paged KV cache: decode attention vs a dense reference, paged == dense engine, the page
allocator, one prefill per prompt, and no pool all-gather or copy under a sampler mesh."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hlo_op_sizes
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.models import attention, paged
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib

_VOCAB = 96
_CFG = models.ModelConfig(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
# Pages of 4 tokens, 2 pages per attention loop step: prompts and responses span many pages.
_PAGED = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=16,
                                 steps_per_call=4, page_size=4, decode_block=8)  # fmt: skip
_DENSE = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=16,
                                 steps_per_call=4, kv_layout="dense")  # fmt: skip
_SAMPLING = params_lib.Sampling(temperature=0.7, top_p=0.9, top_k=20)
_MESH = dict(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def model():
  return models.init_model(_CFG, seed=1)


def _engine(model, cfg, mesh=None):
  graphdef, state = nnx.split(model)
  eng = engine_lib.Engine(model.cfg, graphdef, cfg, mesh=mesh and sharding.make_mesh(**mesh))
  return eng, eng.load_params(state)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, _VOCAB, size=n).tolist() for n in lengths]


def _rollout(engine, params, prompts, *, n, budgets, sampling, seed, shared):
  """A minimal host loop -> {(prompt, sample): (tokens, log_probs)}.

  shared: the prompts are prefilled once, all n * U requests on that one Prefix, inserted over
  several fills; else each fill prefills one row per request (the prompt repeated).
  """
  queue = [(p, s) for p in range(len(prompts)) for s in range(n)]
  if shared:
    prefix = engine.prefill(params, prompts, [(p, p, s) for p, s in queue], seed=seed,
                            sampling=sampling)  # fmt: skip
    first = jax.device_get((prefix.tokens, prefix.log_probs))
  state, slot_req, out, at = engine.init_decode_state(), [None] * engine.cfg.num_slots, {}, 0
  while at < len(queue) or any(r is not None for r in slot_req):
    free = [i for i, r in enumerate(slot_req) if r is None]
    if at < len(queue) and free:
      take = list(range(at, min(at + len(free), len(queue))))
      reqs = [queue[i] for i in take]
      if not shared:
        prefix = engine.prefill(params, [prompts[p] for p, _ in reqs],
                                [(i, p, s) for i, (p, s) in enumerate(reqs)], seed=seed,
                                sampling=sampling)  # fmt: skip
        first = jax.device_get((prefix.tokens, prefix.log_probs))
      rows = take if shared else list(range(len(take)))
      use = free[: len(take)]
      engine.release(use)
      state = engine.insert(prefix, state, use, rows, [budgets[p] for p, _ in reqs], [])
      for slot, req, row in zip(use, reqs, rows, strict=True):
        slot_req[slot] = req
        out[req] = ([first[0][row]], [first[1][row]])
      at += len(take)
      continue
    state, res = engine.generate(params, state, sampling=sampling, stop_ids=[], min_free=1)
    res = jax.device_get(res)
    for slot, req in enumerate(slot_req):
      if req is None:
        continue
      keep = res.valid[: res.num_steps, slot]
      out[req][0].extend(res.tokens[: res.num_steps, slot][keep])
      out[req][1].extend(res.log_probs[: res.num_steps, slot][keep])
      if not res.active[slot]:
        slot_req[slot] = None
  return {k: (np.asarray(t), np.asarray(lp, np.float32)) for k, (t, lp) in out.items()}


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k][0], want[k][0], err_msg=str(k))
    np.testing.assert_allclose(got[k][1], want[k][1], rtol=0, atol=1e-5, err_msg=str(k))


@pytest.mark.parametrize("method", [_SAMPLING, params_lib.Greedy()], ids=str)
@pytest.mark.slow
def test_paged_shared_prefill_equals_dense_per_sample_prefill(model, method):
  """n = 3 samples of 4 prompts (12 requests on 4 slots, several fills, budgets varied): one
  prefill per prompt on pages == one prefill per request on the dense cache."""
  prompts, budgets = _prompts([3, 13, 6, 16]), [9, 16, 5, 12]
  kw = dict(n=3, budgets=budgets, sampling=method, seed=4)
  want = _rollout(*_engine(model, _DENSE), prompts, shared=False, **kw)
  got = _rollout(*_engine(model, _PAGED), prompts, shared=True, **kw)
  _assert_same(got, want)
  assert [len(want[(p, 0)][0]) for p in range(4)] == budgets
  if method is _SAMPLING:  # each sample draws its own first token and continuation
    assert len({tuple(want[(1, s)][0]) for s in range(3)}) > 1


@pytest.mark.slow
def test_paged_samples_independent_of_slot_count_and_mesh(model):
  prompts, budgets = _prompts([5, 11, 2, 8]), [7, 10, 12, 4]
  kw = dict(n=2, budgets=budgets, sampling=_SAMPLING, seed=7)
  want = _rollout(*_engine(model, _PAGED), prompts, shared=True, **kw)
  two = _rollout(*_engine(model, engine_lib.EngineConfig(
    num_slots=2, max_prompt_len=16, max_new_tokens=16, steps_per_call=3, page_size=8)),
    prompts, shared=False, **kw)  # fmt: skip
  _assert_same(two, want)
  _assert_same(_rollout(*_engine(model, _PAGED, _MESH), prompts, shared=True, **kw), want)


def test_page_allocation_reserves_the_worst_case_per_shard(model):
  # 8 slots over data x fsdp = 4 shards (2 slots each), 8 pages of 4 tokens = 2 pages a shard.
  cfg = engine_lib.EngineConfig(num_slots=8, max_prompt_len=16, max_new_tokens=16,
                                page_size=4, num_pages=8)  # fmt: skip
  eng, params = _engine(model, cfg, _MESH)
  assert eng.layout.num_shards == 4 and eng.num_pages == 8
  state = eng.init_decode_state()
  assert state.cache.k.sharding.shard_shape(state.cache.k.shape)[2] == 2  # pages per shard
  prefix = eng.prefill(params, _prompts([3, 6]), [(0, 0, 0), (1, 1, 0), (1, 1, 1)], seed=0,
                       sampling=params_lib.Greedy())  # fmt: skip
  assert eng.can_insert(0, 3, 5) and not eng.can_insert(0, 3, 6)  # ceil(9 / 4) = 3 > 2
  state = eng.insert(prefix, state, [0, 2], [0, 1], [2, 2], [])  # shards 0 and 1: 2 + 2 pages
  assert eng.allocator.held == {0: [0, 1], 2: [0, 1]}  # page ids local to each shard
  assert not eng.can_insert(1, 1, 1)  # slot 1 shares shard 0, whose pages slot 0 holds
  with pytest.raises(ValueError, match="shard 0 needs 2 more pages, has 0 free"):
    eng.insert(prefix, state, [1], [2], [2], [])
  assert eng.allocator.held == {0: [0, 1], 2: [0, 1]}  # a failed insert reserves nothing
  np.testing.assert_array_equal(np.asarray(state.cache.page_table)[[0, 2], :2], [[0, 1]] * 2)
  np.testing.assert_array_equal(np.asarray(state.cache.lengths)[[0, 2]], [3, 6])
  greedy = dict(sampling=params_lib.Greedy(), stop_ids=[])
  state, res = eng.generate(params, state, **greedy)  # a budget of 2: one decode step each
  assert np.asarray(res.valid).sum(axis=0).tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
  eng.release([0])  # finished: its pages go back to shard 0
  assert eng.can_insert(1, 6, 2)
  state = eng.insert(prefix, state, [1], [2], [2], [])
  assert eng.allocator.held == {1: [0, 1], 2: [0, 1]}
  state, res = eng.generate(params, state, **greedy)
  assert np.asarray(res.valid).sum(axis=0).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
  eng.init_decode_state()
  assert eng.allocator.held == {} and eng.can_insert(0, 3, 5)


@pytest.mark.parametrize("kernel", [None, "gather_grouped"])
@pytest.mark.slow
def test_decode_attention_matches_dense_reference(kernel):
  """Random pool, shuffled page tables, lengths 0..S: == plain attention over the slot's tokens
  followed by the new one; one device and shard_map over a data x fsdp x tensor mesh; the CPU
  formulation (None here) and the accelerators' grouped one forced on CPU."""
  rng = np.random.default_rng(0)
  b, n, kh, h, page, m, num_layers = 4, 4, 2, 8, 4, 6, 2
  lengths = np.asarray([0, 5, 24, 13], np.int32)
  pool_shape = (num_layers, kh, b * m, page, h)
  pool_k, pool_v = (rng.normal(size=pool_shape).astype(np.float32) for _ in range(2))
  # Shard-local page ids: slot b's pages come from its shard's half of the pool (2 shards here).
  table = np.stack([rng.permutation(2 * m)[:m] for _ in range(b)]).astype(np.int32)
  q = rng.normal(size=(b, n, h)).astype(np.float32)
  k_new, v_new = (rng.normal(size=(b, kh, h)).astype(np.float32) for _ in range(2))
  layer = 1
  ks, vs = (np.zeros((b, m * page + 1, kh, h), np.float32) for _ in range(2))
  valid = np.zeros((b, m * page + 1), bool)
  for i in range(b):
    shard = i // 2
    for j in range(lengths[i]):
      pid = shard * 2 * m + table[i, j // page]
      ks[i, j], vs[i, j] = pool_k[layer, :, pid, j % page], pool_v[layer, :, pid, j % page]
    ks[i, lengths[i]], vs[i, lengths[i]] = k_new[i], v_new[i]
    valid[i, : lengths[i] + 1] = True
  want = attention.plain_attention(q[:, None], ks, vs, q_slot=jnp.full((b, 1), m * page),
                                   kv_valid=valid)[:, 0]  # fmt: skip
  meshes = [None, sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])]
  for mesh, ppb in ((meshes[0], 1), (meshes[0], 4), (meshes[1], 2), (meshes[1], 16)):
    axes = ("data",) if mesh is not None else ()
    layout = paged.PagedLayout(page_size=page, pages_per_block=ppb, mesh=mesh, batch_axes=axes,
                               kv_axes=("tensor",) if mesh is not None else (),
                               kernel=kernel)  # fmt: skip
    assert layout.decode_kernel == (kernel or "gather_per_head")
    tbl = table if mesh is not None else table + (np.arange(b)[:, None] // 2) * 2 * m
    cache = paged.PagedCache(k=pool_k, v=pool_v, page_table=tbl, lengths=lengths, layout=layout)
    got = jax.jit(paged.decode_attention)(q, k_new, v_new, cache, layer, lengths)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{mesh} {ppb}")


def test_paged_writes_append_at_each_active_slots_length():
  layout = paged.PagedLayout(page_size=2, pages_per_block=1)
  cache = paged.init_paged_cache(_CFG, layout, num_slots=3, num_pages=6, max_pages=2)
  cache = cache.replace(page_table=jnp.asarray([[4, 1], [0, 2], [3, 5]], jnp.int32),
                        lengths=jnp.asarray([1, 2, 0], jnp.int32))  # fmt: skip
  new = jnp.arange(2 * 3 * 2 * 8, dtype=jnp.float32).reshape(2, 3, 2, 8) + 1
  out = paged.write_tokens(cache, new, -new, jnp.asarray([True, True, False]))
  np.testing.assert_array_equal(out.lengths, [2, 3, 0])
  k = np.asarray(out.k)
  np.testing.assert_array_equal(k[:, :, 4, 1], np.asarray(new[:, 0]))  # slot 0: page 4, off 1
  np.testing.assert_array_equal(k[:, :, 2, 0], np.asarray(new[:, 1]))  # slot 1: page 2, off 0
  np.testing.assert_array_equal(np.asarray(out.v)[:, :, 2, 0], -np.asarray(new[:, 1]))
  assert np.count_nonzero(k) == new[:, :2].size  # the idle slot wrote nothing


@pytest.mark.slow
def test_generate_never_gathers_or_copies_the_pool(model):
  """The compiled decode step on a data x fsdp x tensor mesh moves (all-gathers, copies) no
  array as large as one shard's pool: attention and writes read only local pages."""
  cfg = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=240,
                                steps_per_call=2, page_size=4)  # fmt: skip
  eng, params = _engine(model, cfg, _MESH)
  hlo = eng.trace_generate(params, sampling=_SAMPLING).lower().compile().as_text()
  pool = eng.abstract_decode_state().cache.k
  local = pool.sharding.shard_shape(pool.shape)
  assert local == (2, 1, 64, 4, 8)  # 256 pages split 4 ways, kv heads 2 ways
  sizes = hlo_op_sizes(hlo, ("all-gather", "all-to-all", "all-reduce", "copy"))
  assert any(op == "all-gather" for op, _ in sizes)  # the pattern sees the weights' gathers
  big = [(op, n) for op, n in sizes if n >= np.prod(local)]
  assert not big, big
