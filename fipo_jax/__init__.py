"""fipo_jax: FIPO (Future-KL Influenced Policy Optimization) in JAX.

Subpackages (one concern each, see DESIGN.md):
  models/    Flax NNX decoders (Qwen2/Qwen2.5, Llama, Qwen3), KV cache, HF safetensors I/O.
  sampling/  JetStream-style engine and the continuous-batching rollout driver.
  rl/        future_kl, policy losses, advantages, rewards, train steps, trainer loop.
  data/      grain pipelines over verl-schema parquet/jsonl and the synthetic tasks.
  eval/      avg@k / pass@k / cons@k and response-length statistics.
"""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchNotice(_logging.Filter):
  """transformers warns at import that PyTorch is missing; fipo_jax only uses its tokenizers and
  config classes, so every CLI would print it for nothing. Installed before any entry point
  imports transformers (they all import this package first)."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_NoTorchNotice())
