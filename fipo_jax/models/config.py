"""Decoder model configuration: one frozen dataclass for Qwen2/Qwen2.5, Llama and Qwen3.

The architecture differences are flags (`qkv_bias`, `qk_norm`, `tie_word_embeddings`), so one
forward covers all three. `from_hf_config` / `to_hf_config` convert to and from HF `config.json`
dicts (both the transformers<5 top-level `rope_theta` and the v5 `rope_parameters` layouts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = ("qwen2", "llama", "qwen3")
ATTENTION_IMPLS = ("auto", "plain", "blockwise", "splash", "cudnn")
REMAT_POLICIES = (
  "none",
  "full",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "save_attn_out",
)
DTYPES = ("float32", "bfloat16", "float16")
# A dtype argument: a name ('bfloat16') or anything jnp.dtype takes (jnp.bfloat16, np.float32).
DTypeLike = Any

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters (HF names in comments) plus JAX execution choices."""

  model_type: str = "qwen2"  # 'qwen2' | 'llama' | 'qwen3'
  vocab_size: int = 151936  # V
  hidden_size: int = 896  # D
  intermediate_size: int = 4864  # F
  num_layers: int = 24  # L (num_hidden_layers)
  num_heads: int = 14  # N (num_attention_heads)
  num_kv_heads: int = 2  # K (num_key_value_heads)
  head_dim: int = 64  # H
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # qwen2: True; llama/qwen3: False (attention_bias)
  qk_norm: bool = False  # qwen3: RMSNorm over H on q and k before RoPE
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"  # storage dtype of parameters (a DTypeLike, kept as its name)
  dtype: str = "float32"  # compute dtype of activations and matmuls (likewise)
  attention_impl: str = "auto"  # 'auto' | 'plain' | 'blockwise' | 'splash' | 'cudnn'
  attention_block_size: int = 512  # q/kv block for 'blockwise' and 'splash'
  remat_policy: str = "none"  # see REMAT_POLICIES
  scan_layers: bool = True  # lax.scan over stacked layer params (compile time flat in L)

  def __post_init__(self):
    for name in ("param_dtype", "dtype"):  # frozen: set the normalised name in place
      object.__setattr__(self, name, dtype_name(getattr(self, name), f"ModelConfig.{name}"))
    _check(self.model_type in MODEL_TYPES, "model_type", self.model_type, MODEL_TYPES)
    _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl", self.attention_impl,
           ATTENTION_IMPLS)
    _check(self.remat_policy in REMAT_POLICIES, "remat_policy", self.remat_policy,
           REMAT_POLICIES)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "attention_block_size", "max_position_embeddings"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")

  def replace(self, **overrides) -> ModelConfig:
    return dataclasses.replace(self, **overrides)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """Builds a config from an HF `config.json` dict; raises on features we do not implement."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"unsupported HF model_type {model_type!r}; supported: {MODEL_TYPES}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
      raise ValueError(f"unsupported rope type {rope_type!r} in HF config (only 'default')")
    if hf.get("use_sliding_window"):
      raise ValueError("HF config has use_sliding_window=true; sliding windows are not supported")
    if hf.get("mlp_bias"):
      raise ValueError("HF config has mlp_bias=true; MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported hidden_act {hf.get('hidden_act')!r} (only 'silu')")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if model_type == "qwen2":
      qkv_bias = True
    else:
      qkv_bias = bool(hf.get("attention_bias", False))
    kwargs = dict(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rope_theta=float(theta),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=qkv_bias,
      qk_norm=model_type == "qwen3",
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_config(self, torch_dtype: str | None = None) -> dict[str, Any]:
    """The HF `config.json` dict for this architecture (loadable by transformers)."""
    if self.model_type == "qwen2" and not self.qkv_bias:
      raise ValueError("qwen2 in transformers always has qkv biases; use model_type='llama'")
    if self.model_type == "qwen3" and not self.qk_norm:
      raise ValueError("qwen3 in transformers always has q/k norms")
    if self.model_type != "qwen3" and self.qk_norm:
      raise ValueError(f"{self.model_type} in transformers has no q/k norms; use qwen3")
    hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[self.model_type]],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": self.max_position_embeddings,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": torch_dtype or self.param_dtype,
    }
    if self.model_type == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None)
    else:
      hf.update(attention_bias=self.qkv_bias)
    if self.model_type == "llama":
      hf.update(mlp_bias=False, pretraining_tp=1)
    return hf


def dtype_name(dtype: DTypeLike, what: str = "dtype") -> str:
  """'bfloat16' for 'bfloat16', jnp.bfloat16 or jnp.dtype('bfloat16'); ValueError otherwise."""
  if isinstance(dtype, str) and dtype in DTYPES:
    return dtype
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"{what}={dtype!r} is not one of {DTYPES} (a name or a jnp/numpy dtype)")
  return name


def _check(ok: bool, name: str, value, allowed) -> None:
  if not ok:
    raise ValueError(f"ModelConfig.{name}={value!r} is not one of {allowed}")
