"""Insert compiles for v5p with the TPU pool in place and the prefix split: on 4 chips, the
largest insert's temp memory is flat in the pool size (no re-layout copy of the pool) and no
all-gather moves a prefix block. Compiled in a subprocess, as tests/test_aot.py does."""

import importlib.util
import json
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu not installed (pip install -e '.[tpu]')",
)



_PAGE, _K, _H, _P, _L = 16, 2, 128, 128, 16


def _one_scatter(pools, k, v, ids, off, combined, folded=False):
  """Counter-example: all layers in one scatter (the layer inside the update window)."""
  from fipo_jax.models import tpu_paged

  (pool,) = pools
  return (pool.at[:, ids, off].set(tpu_paged.combine(k, v).astype(pool.dtype), mode="drop"),)


def probe(one_scatter: bool = False) -> dict:
  """{pages: (temp bytes, pool-sized copies, block-sized all-gathers)} for the largest insert
  (16 requests of 128 tokens, 16 layers) on 4 v5p chips; one_scatter: `_one_scatter`."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  import jax.numpy as jnp

  from fipo_jax import aot, models, sharding
  from fipo_jax.models import build, paged

  if one_scatter:
    paged._write_prompts = _one_scatter
  from fipo_jax.sampling import engine as engine_lib
  from fipo_jax.sampling import params as params_lib

  mcfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                            num_layers=_L, num_heads=8, num_kv_heads=_K, head_dim=_H,
                            dtype="bfloat16")  # fmt: skip
  mesh = sharding.make_mesh(4, 1, 1, devices=aot.topology_devices("v5p-8")[:4])
  graphdef, abs_params, param_sh = build.param_shardings(mcfg, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
                        abs_params, param_sh)  # fmt: skip
  out = {}
  for pages in (512, 2048):
    ecfg = engine_lib.EngineConfig(num_slots=16, max_prompt_len=_P, max_new_tokens=384,
                                   page_size=_PAGE, num_pages=pages)  # fmt: skip
    eng = engine_lib.Engine(mcfg, graphdef, ecfg, mesh=mesh)
    with jax.set_mesh(mesh):
      prefix = eng.trace_prefill(params, sampling=params_lib.Greedy()).out_info
      sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), prefix)
      hlo = eng.trace_insert(sds).lower().compile()
    text = hlo.as_text()
    pool = rf"bf16\[{_L},{pages // 4},{_PAGE},{2 * _K},{_H}\]"
    copies = re.findall(rf"= {pool}\S* (copy|transpose)\(", text)
    block = rf"bf16\[{_L},\d+,{_P},{_K},{_H}\]"  # a prefix of >= 1 row per chip, gathered
    gathers = re.findall(rf"= {block}\S* all-gather\(", text)
    out[pages] = (hlo.memory_analysis().temp_size_in_bytes, copies, gathers)
  return out


def _pool_bytes(pages: int) -> int:
  return _L * pages * _PAGE * 2 * _K * _H * 2  # all layers, bf16


@pytest.mark.slow
def test_insert_on_tpu_keeps_the_pool_in_place_and_the_prefix_split(aot_warm):
  code = ("import json, tests.test_paged_insert_aot as t; "
          "print(json.dumps([t.probe(), t.probe(one_scatter=True)]))")  # fmt: skip
  proc = aot_warm.run("-c", code, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res, counter = json.loads(proc.stdout.strip().splitlines()[-1])
  (t_small, copies_small, g_small), (t_large, copies_large, g_large) = res["512"], res["2048"]
  assert not copies_small and not copies_large and not g_small and not g_large, res
  assert t_large - t_small < 0.05 * _pool_bytes(1536 // 4), res  # flat in the pool size
  # The counter-example re-lays the pool out: temp grows with it.
  (n_small, _, _), (n_large, _, _) = counter["512"], counter["2048"]
  assert n_large - n_small >= 0.7 * _pool_bytes(1536 // 4), counter
