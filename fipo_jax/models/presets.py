"""Named model configs matching the official HF `config.json` files of the Qwen2.5 family.

Values are written from the published configs (Qwen/Qwen2.5-*-{0.5B,1.5B,7B,32B},
Qwen/Qwen2.5-Math-{1.5B,7B}); they could not be re-downloaded here (no network), so the
parameter-count tests pin the architecture-defining numbers against transformers.
"""

from __future__ import annotations

from fipo_jax.models import config as config_lib

_QWEN2 = dict(model_type="qwen2", qkv_bias=True, qk_norm=False)

PRESETS: dict[str, config_lib.ModelConfig] = {
  "qwen2.5-0.5b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
    num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=32768),
  "qwen2.5-1.5b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
    num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=131072),
  "qwen2.5-7b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, max_position_embeddings=131072),
  "qwen2.5-32b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
    num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, max_position_embeddings=131072),
  "qwen2.5-math-1.5b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
    num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=4096),
  "qwen2.5-math-7b": config_lib.ModelConfig(
    **_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, max_position_embeddings=4096),
}


def get_preset(name: str, **overrides) -> config_lib.ModelConfig:
  """Returns PRESETS[name] with dataclass field overrides (e.g. dtype='bfloat16')."""
  key = name.lower()
  if key not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
