"""Full-size presets: exact parameter counts against transformers (meta device) and dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

from fipo_jax import models

# Counted from the architecture (and equal to transformers' count checked below).
KNOWN = {"qwen2.5-7b": 7_615_616_512, "qwen2.5-32b": 32_763_876_352}


def _hf_count(cfg: models.ModelConfig) -> int:
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_preset_param_counts_match_transformers(name):
  cfg = models.get_preset(name)
  ours = models.count_params(models.abstract_model(cfg))
  assert ours == _hf_count(cfg)
  if name in KNOWN:
    assert ours == KNOWN[name]


def test_eval_shape_allocates_nothing():
  abstract = models.abstract_model(models.get_preset("qwen2.5-32b"))
  leaves = jax.tree.leaves(nnx.state(abstract))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_presets_round_trip_hf_config():
  for name, cfg in models.PRESETS.items():
    assert models.ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg, name
  assert models.get_preset("Qwen2.5-7B", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(KeyError, match="unknown model preset"):
    models.get_preset("qwen2.5-3000b")


@pytest.mark.parametrize("param_dtype,dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("float32", "bfloat16")])
@pytest.mark.slow
def test_every_param_leaf_dtype(param_dtype, dtype):
  cfg = models.ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32,
                           intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=8, qkv_bias=False, qk_norm=True,
                           param_dtype=param_dtype, dtype=dtype)
  model = models.init_model(cfg, seed=0)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) == 14  # embed, lm_head, final_norm + 11 stacked layer params
  for path, var in flat:
    assert var.get_value().dtype == jnp.dtype(param_dtype), path
  hidden = model.hidden_states(jnp.ones((1, 3), jnp.int32))
  assert hidden.dtype == jnp.dtype(dtype)
  assert model(jnp.ones((1, 3), jnp.int32)).dtype == jnp.float32


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="attention_impl"):
    models.ModelConfig(attention_impl="flash")
  with pytest.raises(ValueError, match="remat_policy"):
    models.ModelConfig(remat_policy="some")
