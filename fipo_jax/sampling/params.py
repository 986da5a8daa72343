"""Sampling methods: small frozen dataclasses that pick the next token.

Each method maps float32 logits `[B, V]` and one key per row to `(token int32[B],
log_prob f32[B])`. The log-prob is always `log_softmax(logits / temperature)` of the
chosen token over the FULL vocabulary, i.e. before top-p / top-k truncation, because
that is what the trainer's actor recomputes (verl) and FIPO's importance ratios compare
against it. Methods are hashable, so jitted functions take them as static arguments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TOP_K_OFF = -1  # top-k disabled: the one "off" value of configs, CLIs and the sampler (vLLM's)


def _log_probs_of(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
  """f32[B] log-prob of `tokens` int32[B] under softmax(logits[B, V] / temperature)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax decoding; log-probs are reported at `temperature` (1.0 = the raw model)."""

  temperature: float = 1.0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 for log-probs, got {self.temperature}")

  def select(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits f32[B, V], keys [B] (unused) -> (tokens int32[B], log_probs f32[B])."""
    del keys
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, _log_probs_of(logits, tokens, self.temperature)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Ancestral sampling from softmax(logits / temperature), optionally truncated.

  Attributes:
    temperature: > 0; divides the logits before softmax.
    top_p: nucleus mass in (0, 1]; 1.0 disables it. The smallest set of most likely
      tokens whose mass reaches `top_p` is kept (the most likely token always is).
    top_k: keep the k > 0 most likely tokens (k >= V keeps all); TOP_K_OFF (-1) disables
      it. Applied before top-p, as in HF / vLLM.
  """

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = TOP_K_OFF

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 (use Greedy for argmax), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not (self.top_k == TOP_K_OFF or self.top_k > 0):
      raise ValueError(f"top_k must be {TOP_K_OFF} (off) or > 0, got {self.top_k}")

  def truncated_logits(self, logits: jax.Array) -> jax.Array:
    """f32[B, V] tempered logits with truncated tokens set to -inf."""
    scaled = logits.astype(jnp.float32) / self.temperature
    vocab = scaled.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if self.top_k != TOP_K_OFF and self.top_k < vocab:
      kth = jax.lax.top_k(scaled, self.top_k)[0][:, -1:]  # [B, 1]
      scaled = jnp.where(scaled < kth, neg_inf, scaled)
    if self.top_p < 1.0:
      order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
      sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum
      keep_sorted = mass_before < self.top_p  # the first token always has mass_before 0
      keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
      )
      scaled = jnp.where(keep, scaled, neg_inf)
    return scaled

  def select(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits f32[B, V], keys [B] -> (tokens int32[B], log_probs f32[B] before truncation)."""
    truncated = self.truncated_logits(logits)
    tokens = jax.vmap(jax.random.categorical)(keys, truncated).astype(jnp.int32)
    return tokens, _log_probs_of(logits, tokens, self.temperature)


SamplingMethod = Greedy | Sampling


def from_flags(temperature: float, top_p: float = 1.0, top_k: int = TOP_K_OFF) -> SamplingMethod:
  """Greedy when temperature == 0, else Sampling (the CLI / config convention)."""
  if temperature == 0:
    return Greedy()
  return Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
