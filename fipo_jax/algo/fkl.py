"""Discounted Future-KL: F[t] = sum_{k>=t} gamma^(k-t) * mask[k] * delta[k].

The official code (docs/fipo_spec.md §3) multiplies x by T x 128 decay blocks, O(B T^2). Here the
same sum is O(B T K) chunked matmuls with no sequential loop:

  1. inside each chunk of K tokens, a [K, K] upper-triangular decay matrix turns x into the
     chunk-local suffix sums (one batched matmul, MXU-friendly on TPU);
  2. F at each chunk's first token is the same discounted suffix sum over the sequence of
     chunk heads with decay gamma^K, so it is computed by recursion (T/K heads, then T/K^2, ...;
     two levels up to T = K^2, three up to K^3);
  3. each token then adds gamma^(K - i) times F entering from the next chunk.

An earlier version carried F across chunks with a reverse `lax.scan`; on CPU its T/K sequential
steps cost more than all the matmuls together. Every decay power used is gamma^j with j >= 0,
so nothing can overflow (a global gamma**-t rescaling would overflow float32 past ~4k tokens at
decay 32); powers below float32's smallest normal are flushed to 0 (they would only add
subnormals), and no T x T buffer is ever built. T need not be a multiple of K: the tail is
zero-padded, which adds nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def decay_gamma(decay_rate: float) -> float:
  """gamma = 2^(-1/decay_rate): decay_rate is a half-life in tokens."""
  return float(2.0 ** (-1.0 / float(decay_rate)))


_TINY = float(np.finfo(np.float32).tiny)
_CPU_MAX_CHUNK = 32  # chunk cap on CPU, where matmul FLOPs are not free (see future_kl)


def _decay_matrix(gamma: float, k: int) -> np.ndarray:
  """float32 [K, K] W[j, i] = gamma^(j - i) for j >= i, else 0, built in float64."""
  idx = np.arange(k)
  dist = idx[:, None] - idx[None, :]  # [j, i] = j - i
  w = np.where(dist >= 0, gamma ** np.maximum(dist, 0).astype(np.float64), 0.0)
  return np.where(w < _TINY, 0.0, w).astype(np.float32)


def _carry_factors(gamma: float, k: int) -> np.ndarray:
  """float32 [K]: gamma^(K - i), the weight of F entering a chunk at its position i."""
  tail = gamma ** (k - np.arange(k)).astype(np.float64)
  return np.where(tail < _TINY, 0.0, tail).astype(np.float32)


def _suffix_sum(x: jax.Array, gamma: float, k: int, *, top: bool = True) -> jax.Array:
  """F[b, t] = sum_{j >= t} gamma^(j - t) x[b, j] for float32 [B, T] x, K-token chunks."""
  b, t = x.shape
  # HIGHEST keeps TPU/GPU matmuls in full float32 (their default rounds x to bf16/tf32).
  matmul = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  if t <= k:
    return matmul("bj,ji->bi", x, _decay_matrix(gamma, t))
  n = -(-t // k)
  if n * k != t:
    x = jnp.pad(x, ((0, 0), (0, n * k - t)))
  x = x.reshape(b, n, k)
  w, tail = _decay_matrix(gamma, k), _carry_factors(gamma, k)
  local = matmul("bcj,ji->bci", x, w)  # [B, n, K]
  # F entering chunk c from the right is the suffix sum, at decay gamma^K, of the chunk heads
  # shifted by one chunk (shifting the small input keeps pad/slice out of the big combine).
  entering = _suffix_sum(jnp.pad(local[:, 1:, 0], ((0, 0), (0, 1))), gamma**k, k, top=False)
  if top:  # elementwise, so XLA fuses it into the consumer (exp and the loss)
    out = local + entering[:, :, None] * tail[None, None, :]
  else:
    # Inner levels end in a matmul ([x | entering] @ [W; tail]) so that their result is
    # materialised: fused into the top-level combine, XLA:CPU re-derived it per element in a
    # scalar loop (0.6 ms instead of 0.2 at B=8, T=20480).
    aug = jnp.concatenate([x, entering[:, :, None]], axis=-1)  # [B, n, K + 1]
    out = matmul("bcj,ji->bci", aug, np.concatenate([w, tail[None, :]], axis=0))
  return out.reshape(b, n * k)[:, :t]


@functools.partial(jax.jit, static_argnames=("decay_rate", "chunk_size"))
def future_kl(delta: jax.Array, mask: jax.Array, *, decay_rate: float, chunk_size: int = 128):
  """Discounted suffix sum of the masked log-ratio, including the current token.

  Args:
    delta: [B, T] per-token values (the clamped, filtered log-ratio). Any float dtype.
    mask: [B, T] bool or 0/1 float; positions with mask 0 contribute nothing (even inf/nan).
    decay_rate: half-life tau in tokens, gamma = 2^(-1/tau). Static python float.
    chunk_size: tokens per chunk K (static; 1 runs as 2, and CPU caps it at 32). The result
      does not depend on it beyond float32 rounding; it trades matmul work (T*K) against
      recursion depth (log_K T). 128 fills a TPU MXU tile.

  Returns:
    [B, T] float32 F. Padded positions get whatever the suffix sum gives (0 past the last
    valid token), as in the official code; callers mask them.
  """
  if delta.ndim != 2 or delta.shape != mask.shape:
    raise ValueError(f"delta {delta.shape} and mask {mask.shape} must both be [B, T]")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  x = jnp.where(mask.astype(bool), delta.astype(jnp.float32), 0.0)
  if delta.shape[1] == 0:
    return x
  gamma, k = decay_gamma(decay_rate), max(2, int(chunk_size))  # 1-token chunks never shorten
  # On CPU the K x K matmul is real work (B T K multiply-adds): 128-token chunks cost ~2x the
  # time of 32-token ones at T = 20480, and the sums agree to float32 rounding.
  return jax.lax.platform_dependent(
    x,
    cpu=lambda x: _suffix_sum(x, gamma, min(k, _CPU_MAX_CHUNK)),
    default=lambda x: _suffix_sum(x, gamma, k),
  )


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
