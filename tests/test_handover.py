"""The handover: the sampler holds bf16 weights, and they compute exactly as the trainer's
float32 masters do at a bf16 compute dtype (every weight is cast to the compute dtype at use),
so validation may call the two alike (models.attention.sampler_mismatch)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from fipo_jax import models
from fipo_jax.models import attention
from fipo_jax.sampling import engine as engine_lib


def _cfg(**kw):
  return models.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32,
                            intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, dtype="bfloat16", attention_impl="blockwise", **kw)


@pytest.mark.slow
def test_bf16_sampler_weights_compute_as_the_float32_masters():
  cfg = _cfg()
  graphdef, masters = nnx.split(models.init_model(cfg, seed=0))
  scfg = _cfg(param_dtype="bfloat16")
  engine = engine_lib.Engine(scfg, nnx.split(models.abstract_model(scfg))[0],
                             engine_lib.EngineConfig(num_slots=2, max_prompt_len=8,
                                                     max_new_tokens=8))
  weights = engine.load_params(masters)
  assert {x.dtype for x in jax.tree.leaves(weights)} == {jnp.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(masters)} == {jnp.dtype("float32")}
  assert engine.load_params(weights) is weights  # already the sampler's: no copy
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  want = nnx.merge(graphdef, masters)(ids)
  got = nnx.merge(graphdef, weights)(ids)
  assert jnp.array_equal(want, got)
  assert attention.sampler_mismatch("bfloat16", None, "blockwise") is None
  assert attention.sampler_mismatch("float32", "bfloat16", "blockwise") is not None
