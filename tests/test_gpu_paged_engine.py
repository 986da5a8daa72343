"""The engine's GPU decode wiring (kernel 'pallas_paged_attention'): the folded pools k, v
[K, L, Pg, page, H], prompts inserted into them, the decode layer scan carrying them (token
written first). On CPU the kernel choice is forced to 'pallas_paged_attention_interpret': JAX's
Pallas GPU paged attention itself, run by the Pallas interpreter. The engine's greedy tokens and
log-probs then equal the gather path's, on one device and under a sampler mesh, with GQA groups
of 5 and 7, ragged prompt and response lengths, slots left empty, pages handed out of order and
partial last pages."""


import numpy as np
import pytest
from conftest import hlo_op_sizes

from fipo_jax import models
from fipo_jax.models import gpu_paged, kernels
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib
from tests.test_paged_engine import _MESH, _assert_same, _engine, _prompts, _rollout

# 4 slots, 3 prompts: one slot stays empty; pages of 4 tokens, 8 per slot (S = 32).
_ENGINE = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=16,
                                  steps_per_call=4, page_size=4, decode_block=8)  # fmt: skip


def _model(group: int):
  cfg = models.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2 * group, num_kv_heads=2, head_dim=8)  # fmt: skip
  return models.init_model(cfg, seed=group)


def _shuffled(eng, seed: int):
  """A fresh decode state whose free pages come out in a random order."""
  state = eng.init_decode_state()
  rng = np.random.default_rng(seed)
  eng.allocator.free = [rng.permutation(f).tolist() for f in eng.allocator.free]
  return state


def _gpu_rollout(model, mesh, monkeypatch, prompts, **kw):
  with monkeypatch.context() as m:
    m.setattr(kernels, "decode_kernel", lambda *a, **k: "pallas_paged_attention_interpret")
    eng, params = _engine(model, _ENGINE, mesh)
  assert eng.layout.folded and eng.layout.carried and not eng.layout.combined
  cfg = model.cfg
  state = _shuffled(eng, seed=3)
  assert (
    state.cache.k.shape
    == state.cache.v.shape
    == (cfg.num_kv_heads, cfg.num_layers, eng.num_pages, 4, cfg.head_dim)
  )
  eng.init_decode_state = lambda: state  # the rollout starts from the shuffled pages
  return _rollout(eng, params, prompts, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(("group", "mesh"), [(5, None), (7, _MESH)], ids=["g5_one", "g7_mesh"])
def test_gpu_paged_engine_equals_gather_engine(group, mesh, monkeypatch):
  model = _model(group)
  prompts, budgets = _prompts([3, 13, 6]), [9, 16, 5]
  kw = dict(n=1, budgets=budgets, sampling=params_lib.Greedy(), seed=4, shared=True)
  eng, params = _engine(model, _ENGINE, mesh)
  assert eng.layout.decode_kernel == "gather_per_head"
  want = _rollout(eng, params, prompts, **kw)
  got = _gpu_rollout(model, mesh, monkeypatch, prompts, **kw)
  _assert_same(got, want)
  assert [len(want[(p, 0)][0]) for p in range(3)] == budgets


def test_blocking_pads_the_table_to_power_of_two_blocks():
  for m, page, ppb in [(8, 4, 2), (7, 4, 8), (5, 16, 8), (3, 2, 1), (1000, 16, 8)]:
    splits, block, padded = gpu_paged.blocking(m, page, ppb)
    assert block & (block - 1) == 0 and block * page >= 16, (m, page, ppb)
    assert padded >= m and padded % (splits * block) == 0 and splits <= 16
    assert padded - m < splits * block  # no split holds only padding
  assert gpu_paged.blocking(1000, 16, 8) == (16, 8, 1024)


@pytest.mark.slow
def test_gpu_paged_generate_never_gathers_the_pool(monkeypatch):
  """The folded pools on a data x fsdp x tensor mesh: kv heads over `tensor`, pages over the
  slots' axes; the compiled decode step moves no array as large as one shard's pool between
  devices (the kernel reads its shard's pools in place of a gathered copy)."""
  monkeypatch.setattr(kernels, "decode_kernel", lambda *a, **k: "pallas_paged_attention_interpret")
  cfg = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=240,
                                steps_per_call=2, page_size=4)  # fmt: skip
  eng, params = _engine(_model(5), cfg, _MESH)
  hlo = eng.trace_generate(params, sampling=params_lib.Greedy()).lower().compile().as_text()
  pool = eng.abstract_decode_state().cache.k
  local = pool.sharding.shard_shape(pool.shape)
  assert local == (1, 2, 64, 4, 8)  # 2 kv heads 2 ways, 256 pages 4 ways
  sizes = hlo_op_sizes(hlo, ("all-gather", "all-to-all", "all-reduce"))
  assert any(op == "all-gather" for op, _ in sizes)  # the pattern sees the weights' gathers
  big = [(op, n) for op, n in sizes if n >= np.prod(local)]
  assert not big, big
