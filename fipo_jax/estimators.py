"""Estimators of sampled-eval quality: avg@k, pass@k (unbiased), cons@k, response lengths.

Inputs are per prompt: `correct[p][j]` (bool) and `preds[p][j]` (the extracted, normalised answer
of sample j, e.g. `math_dapo_score(...)["pred"]`), with n samples per prompt ([num_prompts, n]).

- avg@k: mean accuracy over all samples (with n = k samples per prompt; the paper's Avg@32).
- pass@k: probability that at least one of k samples drawn without replacement from the n is
  correct, `1 - C(n-c, k) / C(n, k)` (Chen et al. 2021), averaged over prompts.
- cons@k: accuracy of the majority-vote answer over the first k samples (the paper's Cons@32).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

INVALID_PRED = "[INVALID]"  # what math_dapo_score returns when no answer was extracted


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one prompt with c correct among n samples.

  1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i): a product of factors in [0, 1],
  so no huge binomials and no cancellation (stable for n in the thousands).
  """
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:  # every k-subset contains a correct sample
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _as_matrix(correct: Any) -> np.ndarray:
  arr = np.asarray(correct, dtype=bool)
  if arr.ndim != 2 or arr.shape[1] == 0:
    raise ValueError(f"correct must be [num_prompts, n] with n >= 1, got shape {arr.shape}")
  return arr


def avg_at_k(correct: Any) -> float:
  """Mean accuracy over correct[num_prompts, n] (avg@n)."""
  return float(_as_matrix(correct).mean())


def mean_pass_at_k(correct: Any, k: int) -> float:
  """pass@k averaged over prompts; correct is [num_prompts, n] with k <= n."""
  arr = _as_matrix(correct)
  n = arr.shape[1]
  return float(np.mean([pass_at_k(n, int(c), k) for c in arr.sum(axis=1)]))


def majority_vote(preds: Sequence[str]) -> str | None:
  """The most frequent valid answer; ties go to the answer seen first. None if none is valid."""
  votes = collections.Counter(p for p in preds if p is not None and p != INVALID_PRED)
  if not votes:
    return None
  top = max(votes.values())
  return next(p for p in preds if votes.get(p) == top)


def cons_at_k(preds: Sequence[Sequence[str]], correct: Any, k: int | None = None) -> float:
  """Majority-vote accuracy: per prompt, the most frequent extracted answer among the first k
  samples is right iff a sample giving that answer is correct. Samples with no extracted answer
  do not vote; a prompt with no valid answer counts as wrong.
  """
  arr = _as_matrix(correct)
  if len(preds) != arr.shape[0] or any(len(p) != arr.shape[1] for p in preds):
    raise ValueError(f"preds must have the shape of correct {arr.shape}")
  k = arr.shape[1] if k is None else k
  if not 1 <= k <= arr.shape[1]:
    raise ValueError(f"cons@k needs 1 <= k <= n={arr.shape[1]}, got {k}")
  hits = []
  for p_row, c_row in zip(preds, arr, strict=True):
    winner = majority_vote(list(p_row[:k]))
    hits.append(winner is not None and bool(c_row[list(p_row[:k]).index(winner)]))
  return float(np.mean(hits))


def length_stats(lengths: Any, max_length: int) -> dict[str, float]:
  """Response-length statistics, verl names (docs/fipo_spec.md §6 `response_length/*`, no prefix).

  clip_ratio is the fraction of responses that reached `max_length` tokens (truncated).
  """
  x = np.asarray(lengths, dtype=np.float64).reshape(-1)
  if x.size == 0:
    nan = float("nan")
    return dict(mean=nan, min=nan, max=nan, median=nan, q25=nan, q75=nan, clip_ratio=nan)
  return {
    "mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
    "median": float(np.median(x)), "q25": float(np.quantile(x, 0.25)),
    "q75": float(np.quantile(x, 0.75)), "clip_ratio": float(np.mean(x >= max_length)),
  }


def default_ks(n: int) -> list[int]:
  """1, 2, 4, ... up to n, and n itself (the k values reported for pass@k)."""
  ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
  return ks if ks[-1] == n else [*ks, n]


def summarize(correct: Any, preds: Sequence[Sequence[str]], lengths: Any, max_length: int,
              ks: Sequence[int] | None = None) -> dict[str, float]:
  """All estimators for one eval set: avg@n, pass@k (k in ks), cons@n, length stats."""
  arr = _as_matrix(correct)
  n = arr.shape[1]
  out = {f"avg@{n}": avg_at_k(arr)}
  for k in ks or default_ks(n):
    out[f"pass@{k}"] = mean_pass_at_k(arr, k)
  out[f"cons@{n}"] = cons_at_k(preds, arr)
  out.update({f"response_length/{k}": v for k, v in length_stats(lengths, max_length).items()})
  out["num_prompts"] = float(arr.shape[0])
  out["num_samples"] = float(arr.size)
  return out


def pass_at_k_closed_form(n: int, c: int, k: int) -> float:
  """1 - C(n-c, k)/C(n, k) with exact integers (reference for tests and small n)."""
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)
