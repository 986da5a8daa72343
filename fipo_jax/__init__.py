"""fipo_jax: FIPO (Future-KL Influenced Policy Optimization) in JAX.

Subpackages (one concern each, see DESIGN.md):
  models/    Flax NNX decoders (Qwen2/Qwen2.5, Llama, Qwen3), KV cache, HF safetensors I/O.
  sampling/  JetStream-style engine and the continuous-batching rollout driver.
  rl/        future_kl, policy losses, advantages, rewards, train steps, trainer loop.
  data/      grain pipelines over verl-schema parquet/jsonl and the synthetic tasks.
  eval/      avg@k / pass@k / cons@k and response-length statistics.
"""

__version__ = "0.1.0"
