"""Flax NNX decoder models (Qwen2/Qwen2.5, Llama, Qwen3), KV cache, HF safetensors I/O.

Public API:
  ModelConfig, PRESETS, get_preset        config.py, presets.py
  Transformer                             transformer.py
  KVCache, init_cache                     kv_cache.py
  sequence_log_probs                      logprob.py (padded rows)
  packed_response_log_probs               logprob.py (packed rows, back to the response layout)
  init_model, abstract_model              build.py
  from_pretrained, save_pretrained        hf_io.py
"""

from fipo_jax.models.build import abstract_model, count_params, init_model
from fipo_jax.models.config import ModelConfig
from fipo_jax.models.hf_io import from_pretrained, save_pretrained
from fipo_jax.models.kv_cache import KVCache, init_cache
from fipo_jax.models.logprob import (
  packed_response_log_probs,
  sequence_log_probs,
  token_log_probs_from_hidden,
)
from fipo_jax.models.presets import PRESETS, get_preset
from fipo_jax.models.transformer import Transformer

__all__ = [
  "KVCache",
  "ModelConfig",
  "PRESETS",
  "Transformer",
  "abstract_model",
  "count_params",
  "from_pretrained",
  "get_preset",
  "init_cache",
  "init_model",
  "packed_response_log_probs",
  "save_pretrained",
  "sequence_log_probs",
  "token_log_probs_from_hidden",
]
