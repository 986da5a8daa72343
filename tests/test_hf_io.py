"""HF safetensors I/O: sharded files, bf16, tokenizer copy and clear errors on bad checkpoints."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from flax import nnx

from fipo_jax import models
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.models import hf_io, safetensors_io
from tests import test_model_helpers as mh


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = mh.random_hf_model("llama", seed=21, vocab_size=128)  # >= the char tokenizer's 101
  path = tmp_path_factory.mktemp("hf_io")
  hf.save_pretrained(path)
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _single_file(path):
  files = sorted(path.glob("*.safetensors"))
  assert len(files) == 1
  return files[0]


def test_sharded_save_multiple_files_and_tokenizer(hf_dir, tmp_path):
  model = models.from_pretrained(hf_dir)
  tok = tmp_path / "tok"
  tokenizer_lib.build_tokenizer(str(tok))
  (tok / "config.json").write_text("{\"not\": \"copied\"}")
  out = tmp_path / "out"
  models.save_pretrained(model, out, tokenizer_dir=tok, max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and all((out / s).exists() for s in shards)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert (out / name).read_bytes() == (tok / name).read_bytes()
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model_type"] == "llama"
  # <|endoftext|> = 0 is pad (and bos, as in Qwen2.5), <|im_end|> = 2 the EOS; both stop.
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 0)
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen == {"bos_token_id": 0, "eos_token_id": [0, 2], "pad_token_id": 0}
  hf_gen = transformers.GenerationConfig.from_pretrained(out)
  assert hf_gen.eos_token_id == [0, 2] and hf_gen.pad_token_id == 0
  reloaded = models.from_pretrained(out)
  a = nnx.state(model, nnx.Param)
  b = nnx.state(reloaded, nnx.Param)
  for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.slow
def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  cfg = models.ModelConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8)
  tok = tokenizer_lib.build_tokenizer(str(tmp_path / "tok"))  # 101 tokens
  with pytest.raises(ValueError, match="101 tokens but the model's vocab_size is 96"):
    models.save_pretrained(models.init_model(cfg), tmp_path / "out", tokenizer_dir=tok)


def test_missing_directory_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^HF model directory \S+/nope: not found$"):
    models.from_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    models.from_pretrained(tmp_path)


def jax_leaves(state):
  return [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(state)]


def test_bfloat16_checkpoint_and_param_dtype(hf_dir, tmp_path):
  model = models.from_pretrained(hf_dir)
  models.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
  f = safetensors_io.open_dir(tmp_path / "bf16")
  key = "model.layers.0.mlp.up_proj.weight"
  assert f[key].get(key).dtype == ml_dtypes.bfloat16
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  m16 = models.from_pretrained(tmp_path / "bf16", param_dtype="bfloat16", dtype="bfloat16")
  for _, var in nnx.to_flat_state(nnx.state(m16, nnx.Param)):
    assert var.get_value().dtype == jnp.bfloat16
  logits = m16(jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32
  # The JAX habit: dtypes as jnp / numpy objects, kept as their names in the config.
  m16j = models.from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16,
                                dtype=jnp.dtype("bfloat16"))
  assert (m16j.cfg.param_dtype, m16j.cfg.dtype) == ("bfloat16", "bfloat16")
  assert m16j.cfg == m16.cfg and hash(m16j.cfg) == hash(m16.cfg)
  np.testing.assert_array_equal(np.asarray(m16j(jnp.ones((1, 4), jnp.int32))),
                                np.asarray(logits))
  # bf16 weights widened to f32 equal the rounded originals exactly.
  m32 = models.from_pretrained(tmp_path / "bf16")
  want = np.asarray(model.layers.up_proj.get_value()).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(m32.layers.up_proj.get_value()),
                                want.astype(np.float32))


def _rewrite(path, edit):
  f = _single_file(path)
  st = safetensors_io.SafetensorsFile(f)
  tensors = {k: np.array(st.get(k)) for k in st.keys()}
  del st
  edit(tensors)
  safetensors_io.write_file(f, tensors)


def test_missing_key_is_reported(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path / "missing")
  _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(ValueError, match=r"missing params \(1\).*layers/k_proj\[1\]"):
    models.from_pretrained(path)


def test_unmapped_key_is_reported(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path / "unmapped")
  _rewrite(path, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unmapped keys \(1\).*model.extra.weight"):
    models.from_pretrained(path)


def test_wrong_shape_is_reported(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path / "shape")
  key = "model.layers.0.mlp.down_proj.weight"
  _rewrite(path, lambda t: t.update({key: t[key][:, :-1].copy()}))
  with pytest.raises(ValueError, match=r"wrong shapes \(1\).*down_proj"):
    models.from_pretrained(path)


def test_key_map_round_trips_every_transform():
  rng = np.random.default_rng(0)
  for kind, ours in [("identity", (5,)), ("transpose", (4, 6)), ("in_heads", (4, 3, 2)),
                     ("out_heads", (3, 2, 4)), ("heads", (3, 2))]:
    x = rng.normal(size=hf_io.hf_shape(kind, ours))
    y = hf_io.to_ours(kind, x, ours)
    assert y.shape == ours
    np.testing.assert_array_equal(hf_io.to_hf(kind, y), x)
  assert hf_io.match_key("model.layers.12.self_attn.o_proj.weight") == (
    ("layers", "o_proj"), 12, "out_heads")
  assert hf_io.match_key("model.layers.1.self_attn.o_proj.weightx") is None


def test_dtypes_are_names_or_jnp_numpy_dtypes():
  for given, name in [(jnp.float32, "float32"), (np.float16, "float16"),
                      (np.dtype("float32"), "float32"), (ml_dtypes.bfloat16, "bfloat16"),
                      ("bfloat16", "bfloat16")]:
    cfg = models.ModelConfig(param_dtype=given, dtype=given)
    assert (cfg.param_dtype, cfg.dtype) == (name, name)
  assert models.ModelConfig().replace(dtype=jnp.bfloat16).dtype == "bfloat16"
  for bad in ("bf16", jnp.int32, None):
    with pytest.raises(ValueError, match=r"ModelConfig.dtype=.* is not one of"):
      models.ModelConfig(dtype=bad)


def test_unsupported_hf_config_is_rejected():
  base = mh.hf_config("llama").to_dict()
  with pytest.raises(ValueError, match="rope type"):
    models.ModelConfig.from_hf_config(dict(base, rope_parameters={"rope_type": "llama3",
                                                                  "rope_theta": 1.0}))
  with pytest.raises(ValueError, match="model_type"):
    models.ModelConfig.from_hf_config(dict(base, model_type="gpt2"))
