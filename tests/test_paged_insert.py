"""Insert on a sampler mesh: each shard holds only its block of the prefix, and a request whose
prompt row sits on another shard still lands in its slot's pages (the ring in
paged.insert_prompts)."""


import jax
import numpy as np
import pytest
from conftest import hlo_op_sizes
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib

_CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
# 8 slots over data x fsdp = 4 shards (2 slots each), kv heads over tensor = 2.
_ECFG = engine_lib.EngineConfig(num_slots=8, max_prompt_len=16, max_new_tokens=8, page_size=4)
_MESH = dict(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def engine():
  model = models.init_model(_CFG, seed=3)
  graphdef, state = nnx.split(model)
  eng = engine_lib.Engine(model.cfg, graphdef, _ECFG, mesh=sharding.make_mesh(**_MESH))
  return eng, eng.load_params(state)


@pytest.mark.slow
def test_insert_reads_only_its_shards_block_of_the_prefix(engine):
  """The compiled largest insert takes the prefix with its rows split over the 4 shards and
  moves no array as large as one shard's block by all-gather, all-to-all or all-reduce (a
  replicated prefix is all-gathered: 4x the block)."""
  eng, params = engine
  prefix = eng.trace_prefill(params, sampling=params_lib.Greedy()).out_info
  k = prefix.cache.k  # [L, Up, P, K, H]
  assert k.shape == (2, 8, 16, 2, 8)
  block = (2, 2, 16, 1, 8)  # Up over the 4 shards, kv heads over tensor
  sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), prefix)
  compiled = eng.trace_insert(sds).lower().compile()
  assert compiled.input_shardings[0][0].cache.k.shard_shape(k.shape) == block
  hlo = compiled.as_text()
  sizes = hlo_op_sizes(hlo, ("all-gather", "all-to-all", "all-reduce", "collective-permute"))
  assert ("collective-permute", np.prod(block)) in sizes  # the blocks pass round the ring
  big = [(op, n) for op, n in sizes if n >= np.prod(block) and op != "collective-permute"]
  assert not big, big


def test_insert_across_shards_copies_each_prompt_into_its_slots_pages(engine):
  """8 prompts (2 rows per shard) into slots of other shards, in scrambled order: every
  slot's pages hold its prompt's prefix k/v, token for token."""
  eng, params = engine
  rng = np.random.default_rng(0)
  lengths = [3, 16, 7, 1, 12, 5, 9, 4]
  prompts = [rng.integers(1, 64, size=n).tolist() for n in lengths]
  prefix = eng.prefill(params, prompts, [(i, i, 0) for i in range(8)], seed=0,
                       sampling=params_lib.Greedy())  # fmt: skip
  k = prefix.cache.k
  assert k.sharding.shard_shape(k.shape) == (2, 2, 16, 1, 8)  # each shard: 2 of the 8 rows
  slots = [7, 0, 5, 2, 3, 6, 1, 4]  # row u on shard u // 2 goes to shard slots[u] // 2
  state = eng.insert(prefix, eng.init_decode_state(), slots, list(range(8)), [8] * 8, [])
  pool_k, pool_v = np.asarray(state.cache.k), np.asarray(state.cache.v)  # [L, K, Pg, page, H]
  pre_k, pre_v = np.asarray(prefix.cache.k), np.asarray(prefix.cache.v)  # [L, Up, P, K, H]
  table = np.asarray(state.cache.page_table)
  per_shard = eng.num_pages // eng.layout.num_shards
  for row, slot in enumerate(slots):
    j = np.arange(lengths[row])
    pages = eng.allocator.shard(slot) * per_shard + table[slot, j // 4]  # global page ids
    for pool, pre in ((pool_k, pre_k), (pool_v, pre_v)):
      np.testing.assert_array_equal(pool[:, :, pages, j % 4], pre[:, row, j].transpose(0, 2, 1, 3))
  np.testing.assert_array_equal(np.asarray(state.cache.lengths)[slots], lengths)


def test_insert_bucket_prefix_sizes_insert_by_the_prefix_requests(engine):
  """Insert's request axis: by default a power of two of the requests per shard; with at least
  `least` (insert_bucket='prefix': the prefix's request bucket) capped at a shard's slots."""
  eng, _ = engine
  assert eng._request_order([7, 0]) == (4, [3, 0])  # slots on shards 3 and 0: one entry each
  assert eng._request_order([7, 0], least=2) == (8, [6, 0])
  assert eng._request_order([7, 0], least=8) == (8, [6, 0])  # a shard holds 2 slots
