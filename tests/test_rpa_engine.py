"""The engine's TPU decode wiring (kernels 'ragged_paged_attention'): the combined pool
[L, Pg, page, 2K, H], prompts inserted into it, the decode layer scan carrying it (token written
first). On CPU the kernel is replaced by `tpu_paged.reference_attention` (the kernel choice is
forced), which is pinned here to JAX's own eager reference of the kernel; the engine's tokens
and log-probs then equal the gather path's, on one device and under a sampler mesh."""


import numpy as np
import pytest
from conftest import hlo_op_sizes
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

from fipo_jax.models import kernels, tpu_paged
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib
from tests.test_paged_engine import _CFG, _MESH, _PAGED, _assert_same, _engine, _prompts, _rollout


def test_reference_attention_matches_jax_reference():
  rng = np.random.default_rng(0)
  b, kh, g, h, page, m = 3, 2, 5, 8, 4, 3
  pages = rng.normal(size=(b * m + 2, page, 2 * kh, h)).astype(np.float32)
  table = rng.permutation(b * m + 2)[: b * m].reshape(b, m).astype(np.int32)
  q = rng.normal(size=(b, kh * g, h)).astype(np.float32)
  lens = np.asarray([1, 7, 12], np.int32)  # 12: every page full
  args = (q, pages, lens, table, np.arange(b + 1, dtype=np.int32), np.asarray([b], np.int32))
  want = rpa.ref_ragged_paged_attention(*args, sm_scale=h**-0.5)
  got = tpu_paged.reference_attention(*args, sm_scale=h**-0.5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def model():
  from fipo_jax import models

  return models.init_model(_CFG, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [None, _MESH], ids=["one_device", "mesh"])
def test_rpa_engine_equals_gather_engine(model, mesh, monkeypatch):
  prompts, budgets = _prompts([3, 13, 6, 16]), [9, 16, 5, 12]
  kw = dict(n=2, budgets=budgets, sampling=params_lib.Greedy(), seed=4, shared=True)
  want = _rollout(*_engine(model, _PAGED, mesh), prompts, **kw)
  monkeypatch.setattr(kernels, "decode_kernel",
                      lambda *a, **k: "ragged_paged_attention_reference")  # fmt: skip
  eng, params = _engine(model, _PAGED, mesh)
  assert eng.layout.combined
  state = eng.init_decode_state()
  assert state.cache.v is None
  assert state.cache.k.shape == (_CFG.num_layers, eng.num_pages, 4, 2 * _CFG.num_kv_heads,
                                 _CFG.head_dim)  # fmt: skip
  got = _rollout(eng, params, prompts, **kw)
  _assert_same(got, want)
  assert [len(want[(p, 0)][0]) for p in range(4)] == budgets


def test_rpa_generate_never_gathers_the_pool(model, monkeypatch):
  """The combined pool on a data x fsdp x tensor mesh: pages over the slots' axes, kv heads
  (k and v together) over `tensor`; the compiled decode step moves no array as large as one
  shard's pool between devices. (Copies are not checked here: XLA:CPU copies the carried pool
  around the reference's gather fused with the write; the kernel's in-place compile for TPU is
  tests/test_rpa_engine_aot.py's.)"""
  monkeypatch.setattr(kernels, "decode_kernel",
                      lambda *a, **k: "ragged_paged_attention_reference")  # fmt: skip
  cfg = engine_lib.EngineConfig(num_slots=4, max_prompt_len=16, max_new_tokens=240,
                                steps_per_call=2, page_size=4)  # fmt: skip
  eng, params = _engine(model, cfg, _MESH)
  hlo = eng.trace_generate(params, sampling=params_lib.Greedy()).lower().compile().as_text()
  pool = eng.abstract_decode_state().cache.k
  local = pool.sharding.shard_shape(pool.shape)
  assert local == (2, 64, 4, 2, 8)  # 256 pages split 4 ways, 2 kv heads (4 k/v rows) 2 ways
  sizes = hlo_op_sizes(hlo, ("all-gather", "all-to-all", "all-reduce"))
  assert any(op == "all-gather" for op, _ in sizes)  # the pattern sees the weights' gathers
  big = [(op, n) for op, n in sizes if n >= np.prod(local)]
  assert not big, big
