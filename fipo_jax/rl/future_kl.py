"""Discounted Future-KL: F[t] = sum_{k>=t} gamma^(k-t) * mask[k] * delta[k].

The official code (FIPO_SPEC §3) multiplies x by T x 128 decay blocks, O(B T^2) time. Here the
same sum is an O(B T K) chunked reverse scan:

  1. inside each chunk of K tokens, a [K, K] upper-triangular decay matrix turns x into the
     chunk-local suffix sums (one batched matmul, MXU-friendly on TPU);
  2. a reverse `lax.scan` over the chunk heads carries F across chunk boundaries;
  3. each token then adds gamma^(K - i) times the carry entering its chunk.

Every decay power used is gamma^j with 0 <= j <= K, so nothing can overflow (a global
gamma**-t rescaling would overflow float32 past ~4k tokens at decay 32), and no T x T buffer
is ever built. T need not be a multiple of K: the tail is zero-padded, which adds nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def decay_gamma(decay_rate: float) -> float:
  """gamma = 2^(-1/decay_rate): decay_rate is a half-life in tokens."""
  return float(2.0 ** (-1.0 / float(decay_rate)))


def _decay_constants(gamma: float, k: int) -> tuple[np.ndarray, np.ndarray, float]:
  """float32 constants built in float64: W[j, i] = gamma^(j - i) for j >= i, tail powers."""
  idx = np.arange(k)
  dist = idx[:, None] - idx[None, :]  # [j, i] = j - i
  w = np.where(dist >= 0, gamma ** np.maximum(dist, 0).astype(np.float64), 0.0)
  tail = gamma ** (k - idx).astype(np.float64)  # carry factor into position i of a chunk
  return w.astype(np.float32), tail.astype(np.float32), float(np.float32(gamma**k))


@functools.partial(jax.jit, static_argnames=("decay_rate", "chunk_size"))
def future_kl(delta: jax.Array, mask: jax.Array, *, decay_rate: float, chunk_size: int = 128):
  """Discounted suffix sum of the masked log-ratio, including the current token.

  Args:
    delta: [B, T] per-token values (the clamped, filtered log-ratio). Any float dtype.
    mask: [B, T] bool or 0/1 float; positions with mask 0 contribute nothing (even inf/nan).
    decay_rate: half-life tau in tokens, gamma = 2^(-1/tau). Static python float.
    chunk_size: tokens per chunk K (static). The result does not depend on it beyond float32
      rounding; it only trades matmul work (T*K) against scan length (T/K).

  Returns:
    [B, T] float32 F. Padded positions get whatever the suffix sum gives (0 past the last
    valid token), as in the official code; callers mask them.
  """
  if delta.ndim != 2 or delta.shape != mask.shape:
    raise ValueError(f"delta {delta.shape} and mask {mask.shape} must both be [B, T]")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  b, t = delta.shape
  x = jnp.where(mask.astype(bool), delta.astype(jnp.float32), 0.0)
  if t == 0:
    return x
  k = min(int(chunk_size), t)
  n = -(-t // k)
  x = jnp.pad(x, ((0, 0), (0, n * k - t))).reshape(b, n, k)
  w, tail, gamma_k = _decay_constants(decay_gamma(decay_rate), k)
  # local[b, c, i] = sum_{j >= i} gamma^(j - i) x[b, c, j]. HIGHEST keeps TPU/GPU matmuls in
  # full float32 (their default would round x to bf16/tf32).
  local = jnp.einsum("bcj,ji->bci", x, w, precision=jax.lax.Precision.HIGHEST)

  def step(carry, head):  # carry: F at the first token of the next chunk, [B]
    new = head + gamma_k * carry
    return new, carry

  # Reverse scan over the chunk heads; `entering[c]` is F at the start of chunk c + 1.
  _, entering = jax.lax.scan(step, jnp.zeros((b,), jnp.float32), local[:, :, 0].T, reverse=True)
  out = local + entering.T[:, :, None] * tail[None, None, :]
  return out.reshape(b, n * k)[:, :t]


def future_kl_reference(delta: np.ndarray, mask: np.ndarray, decay_rate: float) -> np.ndarray:
  """Plain reverse recursion F[t] = x[t] + gamma F[t+1] in float64 numpy (tests, benchmarks)."""
  x = np.where(np.asarray(mask).astype(bool), np.asarray(delta, np.float64), 0.0)
  gamma = decay_gamma(decay_rate)
  out = np.zeros_like(x)
  acc = np.zeros(x.shape[0])
  for i in range(x.shape[1] - 1, -1, -1):
    acc = x[:, i] + gamma * acc
    out[:, i] = acc
  return out
