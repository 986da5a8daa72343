"""Shared helpers for the model tests: tiny random HF models and padded batches."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=256)


def hf_config(model_type: str, **overrides):
  kw = dict(TINY, **overrides)
  if model_type == "qwen2":
    return transformers.Qwen2Config(rope_theta=1_000_000.0, **kw)
  if model_type == "llama":
    return transformers.LlamaConfig(rope_theta=500_000.0, **kw)
  if model_type == "qwen3":
    kw.setdefault("head_dim", 24)  # != hidden / heads, as in real Qwen3
    return transformers.Qwen3Config(rope_theta=10_000.0, **kw)
  raise ValueError(model_type)


def random_hf_model(model_type: str, seed: int = 0, **overrides):
  """A float32 HF causal LM with every weight random (norms near 1, biases non-zero)."""
  torch.manual_seed(seed)
  cfg = hf_config(model_type, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model.eval()


def padded_batch(rng: np.random.Generator, vocab: int, lengths, left_pad, total: int):
  """ids, mask, positions int32[B, total]: rows with `left_pad[b]` pads then lengths[b] tokens.

  Positions follow the sampler convention cumsum(mask) - 1 (clamped at 0 on pads).
  """
  b = len(lengths)
  ids = np.zeros((b, total), np.int32)
  mask = np.zeros((b, total), np.int32)
  for i, (n, lp) in enumerate(zip(lengths, left_pad, strict=True)):
    ids[i, lp:lp + n] = rng.integers(1, vocab, n)
    mask[i, lp:lp + n] = 1
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return ids, mask, pos


def hf_logits(model, ids, mask, pos) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos).long())
  return out.logits.float().numpy()
