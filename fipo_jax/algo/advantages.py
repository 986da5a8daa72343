"""GRPO outcome advantages and the DAPO dynamic-sampling group filter (host side, numpy).

Both run once per rollout batch on [B] host arrays, outside jit; group ids only need equality
(verl uses uid strings), so any hashable ids work.
"""

import numpy as np


def _groups(group_ids) -> tuple[np.ndarray, np.ndarray]:
  """Dense group index [B] and group sizes [num_groups] for arbitrary (possibly unsorted) ids."""
  ids = np.asarray(group_ids)
  if ids.ndim != 1:
    raise ValueError(f"group_ids must be [B], got shape {ids.shape}")
  _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  return inverse.reshape(-1), counts


def grpo_outcome_advantages(
  scores, group_ids, *, epsilon: float = 1e-6, norm_by_std: bool = True
) -> np.ndarray:
  """verl `compute_grpo_outcome_advantage` on per-sequence scores.

  Per group: mean and unbiased std (n - 1, as torch.std), then `(s - mean) / (std + epsilon)`,
  or `s - mean` without std normalisation. A group of size 1 uses mean 0 and std 1, so its
  advantage is `s / (1 + epsilon)`, not 0 (official behaviour). Statistics are rounded to
  float32 like torch's float32 tensors; a group of equal scores gets exactly 0.

  Args:
    scores: [B] sequence scores (row sums of the token-level rewards).
    group_ids: [B] group id per sequence (one id per prompt).
    epsilon: added to the std.
    norm_by_std: `norm_adv_by_std_in_grpo`.

  Returns:
    [B] float32 advantages; broadcast with `adv[:, None] * response_mask` for the loss.
  """
  s = np.asarray(scores, np.float32)
  if s.ndim != 1:
    raise ValueError(f"scores must be [B], got shape {s.shape}")
  inverse, counts = _groups(group_ids)
  if inverse.shape != s.shape:
    raise ValueError(f"scores {s.shape} and group_ids {inverse.shape} differ")
  s64 = s.astype(np.float64)
  sums = np.bincount(inverse, weights=s64, minlength=counts.size)
  mean = (sums / counts).astype(np.float32)
  dev = s64 - mean[inverse].astype(np.float64)
  sq = np.bincount(inverse, weights=dev * dev, minlength=counts.size)
  std = np.sqrt(sq / np.maximum(counts - 1, 1)).astype(np.float32)
  single = counts == 1
  mean = np.where(single, np.float32(0.0), mean)
  std = np.where(single, np.float32(1.0), std)
  centred = s - mean[inverse]
  if not norm_by_std:
    return centred.astype(np.float32)
  return (centred / (std[inverse] + np.float32(epsilon))).astype(np.float32)


def filter_groups(values, group_ids) -> np.ndarray:
  """DAPO dynamic sampling keep-mask (verl `filter_groups`, metric usually `acc`).

  A group is kept when its values are not all equal (`np.std(values) > 0`, population std in
  float64, exactly as verl computes it) or when it has a single member (verl keeps those).

  Args:
    values: [B] per-sequence metric (bool acc, or a float score).
    group_ids: [B] group id per sequence.

  Returns:
    [B] bool: True for every sequence of a kept group.
  """
  v = np.asarray(values).astype(np.float64)
  inverse, counts = _groups(group_ids)
  if inverse.shape != v.shape:
    raise ValueError(f"values {v.shape} and group_ids {inverse.shape} differ")
  if v.size == 0:
    return np.zeros(0, bool)
  order = np.argsort(inverse, kind="stable")  # keeps batch order inside each group, as verl
  members = np.split(v[order], np.cumsum(counts)[:-1])
  keep = np.array([len(m) == 1 or np.std(m) > 0 for m in members], bool)
  return keep[inverse]
