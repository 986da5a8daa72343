"""fipo_jax: FIPO (Future-KL Influenced Policy Optimization) in JAX.

Subpackages (one concern each, see DESIGN.md):
  models/    Flax NNX decoders (Qwen2/Qwen2.5, Llama, Qwen3), KV cache, HF safetensors I/O.
  sampling/  JetStream-style engine and the continuous-batching rollout driver.
  algo/      the algorithm, pure jax/numpy: future_kl, policy losses, aggregation, advantages,
             rollout-correction weights, verifier scores.
  rl/        the training system: rollouts, rewards, packing, train steps, trainer loop.
  data/      grain pipelines over verl-schema parquet/jsonl and the synthetic tasks.
  eval/      the eval CLI and its result table; the estimators (avg@k / pass@k / cons@k,
             response lengths) are `fipo_jax.estimators`.

Shapes. Docstrings and comments state shapes (`[B, T]`, `f32[B, T]`) in one vocabulary, each
letter with one meaning everywhere:
  B  batch rows (in rl/: responses)     G  group size: responses per prompt (rl.n)
  P  prompt length (left-padded)        T  response length (padded to max_response_length)
  S  sequence length, the tokens a row attends over: P + T in training, a packed row's
     length, the KV cache length when decoding
  Q  query length, the tokens one model call takes in (S without a cache, P at prefill,
     1 per decode step)
  L  layers      D  model width     F  MLP width     V  vocab
  N  query heads      K  kv heads   H  head dim
  M  responses in one optimizer update (rl.ppo_mini_batch_size x G)
  Packed batches (rl/packing.py): NM micro-batches, W data shards, R packed rows per shard,
  E sequence slots per shard: tokens [NM, W, R, S], responses [NM, W, E, T].
Other sizes are written as lowercase names (`[num_slots]`, `[k, B]`).
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
