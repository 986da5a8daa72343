"""The engine's decode step with the TPU ragged paged attention kernel compiles for v5p with the
pool in place: kernels.decode_kernel picks the kernel for the topology's devices, and one
`generate` step's temp memory is flat in the pool size, with no pool- or layer-sized copy,
slice or transpose in the HLO (the layer scan carries the donated pool; each layer writes its
token, then the kernel reads the pool with the layer folded into the page ids). Compiled in a
subprocess (libtpu stays out of this process's CPU backend), as tests/test_aot.py does."""

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



_PAGE, _K, _H = 16, 2, 128


def _naive_layer_operand(write_and_attend):
  """Counter-example: the kernel gets `pool[layer]` (one layer's pool) instead of the whole
  pool with the layer folded into the page ids."""
  import jax

  def step(pool, layer, *args, **kw):
    one, out = write_and_attend(pool[layer][None], 0, *args, **kw)
    return jax.lax.dynamic_update_index_in_dim(pool, one[0], layer, 0), out

  return step


def probe(chips: int = 1, naive: bool = False) -> dict:
  """{pages: (kernel, temp bytes, pool-sized copies in the HLO)} for one decode step on
  `chips` v5p chips (slots and pages split over them); naive: `_naive_layer_operand`."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  import jax.numpy as jnp

  from fipo_jax import aot, models, sharding
  from fipo_jax.models import build, tpu_paged

  if naive:
    tpu_paged.write_and_attend = _naive_layer_operand(tpu_paged.write_and_attend)
  from fipo_jax.sampling import engine as engine_lib
  from fipo_jax.sampling import params as params_lib

  mcfg = models.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                            num_layers=2, num_heads=8, num_kv_heads=_K, head_dim=_H,
                            dtype="bfloat16")  # fmt: skip
  mesh = sharding.make_mesh(chips, 1, 1, devices=aot.topology_devices("v5p-8")[:chips])
  graphdef, abs_params, param_sh = build.param_shardings(mcfg, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
                        abs_params, param_sh)  # fmt: skip
  out = {}
  for pages in (512, 2048):
    ecfg = engine_lib.EngineConfig(num_slots=16, max_prompt_len=128, max_new_tokens=384,
                                   steps_per_call=1, page_size=_PAGE, num_pages=pages)  # fmt: skip
    eng = engine_lib.Engine(mcfg, graphdef, ecfg, mesh=mesh)
    with jax.set_mesh(mesh):  # Mosaic lowers for the mesh's TPU, not this host
      compiled = eng.trace_generate(params, sampling=params_lib.Greedy()).lower().compile()
    local = pages // chips
    pool = rf"bf16\[(?:\d+,)?{local},{_PAGE},{2 * _K},{_H}\]"
    big = re.findall(rf"= {pool}\S* (copy|dynamic-slice|slice|transpose)\(", compiled.as_text())
    out[pages] = (eng.layout.decode_kernel, compiled.memory_analysis().temp_size_in_bytes, big)
  return out


def _layer_bytes(pages: int) -> int:
  return pages * _PAGE * 2 * _K * _H * 2  # one layer's pool, bf16


@pytest.mark.slow
def test_engine_decode_with_rpa_keeps_the_pool_in_place(aot_warm):
  # The counter-example last: it replaces the module's write_and_attend for the process.
  code = ("import json, tests.test_rpa_engine_aot as t; "
          "print(json.dumps([t.probe(1), t.probe(4), t.probe(1, naive=True)]))")  # fmt: skip
  proc = aot_warm.run("-c", code, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  *folded, naive = json.loads(proc.stdout.strip().splitlines()[-1])
  for chips, res in zip((1, 4), folded, strict=True):
    (k_small, t_small, big_small), (k_large, t_large, big_large) = res["512"], res["2048"]
    assert k_small == k_large == "ragged_paged_attention", res
    assert not big_small and not big_large, (chips, res)
    # Flat in the pool size: a layer's copy would add its (2048 - 512) / chips extra pages.
    assert t_large - t_small < 0.05 * _layer_bytes(1536 // chips), (chips, res)
  # The counter-example copies one layer's pool per layer: temp grows with it, the HLO slices.
  (_, n_small, _), (_, n_large, slices) = naive["512"], naive["2048"]
  assert n_large - n_small >= 0.7 * _layer_bytes(1536) and slices, naive


@pytest.mark.slow
def test_aot_compiles_the_32b_decode_with_the_kernel(aot_warm):
  """`python -m fipo_jax.aot` on the 32B recipe (head_dim 128: the kernel is chosen), cut to 2
  layers and 16 slots on v5p-8: decode lowers the Pallas kernel for the topology and fits."""
  proc = aot_warm.run("-m", "fipo_jax.aot", "--config", "configs/fipo_qwen2_5_32b.py", "--topology",
                      "v5p-8", "--steps", "decode", "--num_layers", "2", "--decode_slots", "16",
                      cwd=ROOT)  # fmt: skip
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["decode"]["error"] is None and out["fits"] is True, out
  assert out["decode"]["kernel"] == "ragged_paged_attention", out["decode"]  # named by aot
