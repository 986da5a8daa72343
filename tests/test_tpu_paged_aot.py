"""The TPU ragged paged attention decode (models/tpu_paged.py) compiles for v5p with the
layer-scan-carried pool kept in place: temp memory flat in the pool size and no layer-sized
slice or copy in the HLO. The same check flags the naive `pool[layer]` operand (a counter-example
compiled beside it), so it can fail. Compiled in a subprocess (libtpu stays out of this
process's CPU backend), as tests/test_aot.py does."""

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



_L, _B, _N, _K, _H, _PAGE, _M = 2, 16, 40, 8, 128, 16, 32


def _step(pool, q, k_new, v_new, table, lengths, *, fold: bool):
  """One decode step's attention over the layers: the pool [L, Pg, page, 2K, H] carried."""
  import jax
  import jax.numpy as jnp

  from fipo_jax.models import tpu_paged

  active = jnp.ones((_B,), bool)

  def body(pool, inp):
    layer, ql = inp
    if fold:
      return tpu_paged.write_and_attend(pool, layer, ql, k_new, v_new, table, lengths, active)
    # Counter-example: the layer's pool as the operand (the kernel reads pool[layer]).
    one, out = tpu_paged.write_and_attend(pool[layer][None], 0, ql, k_new, v_new, table,
                                          lengths, active)  # fmt: skip
    return jax.lax.dynamic_update_index_in_dim(pool, one[0], layer, 0), out

  return jax.lax.scan(body, pool, (jnp.arange(_L, dtype=jnp.int32), q))


def probe() -> dict:
  """{fold: {pages: (temp bytes, layer-sized slices/copies in the HLO)}} on one v5p chip."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fipo_jax import aot

  mesh = jax.sharding.Mesh(np.array(aot.topology_devices("v5p-8")[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sds = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  out = {}
  for fold in (True, False):
    for pages in (256, 1024):
      args = (sds((_L, pages, _PAGE, 2 * _K, _H)), sds((_L, _B, _N, _H)), sds((_B, _K, _H)),
              sds((_B, _K, _H)), sds((_B, _M), jnp.int32), sds((_B,), jnp.int32))  # fmt: skip
      with jax.set_mesh(mesh):  # Mosaic lowers for the mesh's TPU, not this host
        fn = jax.jit(functools.partial(_step, fold=fold), donate_argnums=0)
        compiled = fn.lower(*args).compile()
      layer = f"{pages},{_PAGE},{2 * _K},{_H}]"
      big = re.findall(rf"= bf16\[(?:1,)?{layer}\S* (dynamic-slice|copy|slice)\(",
                       compiled.as_text())  # fmt: skip
      out.setdefault(str(fold), {})[pages] = (compiled.memory_analysis().temp_size_in_bytes, big)
  return out


@pytest.mark.slow
def test_rpa_decode_keeps_the_scan_carried_pool_in_place(aot_warm):
  code = "import json, tests.test_tpu_paged_aot as t; print(json.dumps(t.probe()))"
  proc = aot_warm.run("-c", code, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  (t_small, big_small), (t_large, big_large) = res["True"]["256"], res["True"]["1024"]
  assert t_small == t_large and not big_small and not big_large, res["True"]
  # The counter-example copies a layer's pool: temp grows with it, the HLO slices it.
  (n_small, _), (n_large, slice_large) = res["False"]["256"], res["False"]["1024"]
  layer_bytes = 1024 * _PAGE * 2 * _K * _H * 2
  assert n_large - n_small >= 0.7 * layer_bytes and slice_large, res["False"]
