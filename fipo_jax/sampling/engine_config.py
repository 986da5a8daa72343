"""The sampling engine's static sizes (`EngineConfig`): slots, prompt and response budgets,
prefill buckets, the KV layout and its pages. Validated on construction; the engine sizes its
KV cache from them once (sampling/engine.py).

Shapes: B = num_slots, S cache length, M pages per slot, P prefill bucket length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

_MIN_PREFILL_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static engine sizes; the KV cache is sized from them once."""

  num_slots: int = 8  # B: concurrent decodes
  max_prompt_len: int = 512  # longest prompt accepted
  max_new_tokens: int = 512  # longest response
  steps_per_call: int = 16  # k: decode steps per jitted generate call
  min_prefill_bucket: int = _MIN_PREFILL_BUCKET
  kv_layout: str = "paged"  # 'paged' | 'dense' (the reference)
  page_size: int = 128  # tokens per page (capped at the cache length's power of two)
  num_pages: int | None = None  # pool size; None: num_slots * pages_per_slot (dense's memory)
  decode_block: int = 128  # tokens per paged attention loop step (CPU: one page is fastest)
  # insert's request axis I: 'count' (the requests inserted, bucketed) or 'prefix' (their
  # prefix's request bucket Rb, so one insert shape per prefill shape; partial rollouts).
  insert_bucket: str = "count"

  def __post_init__(self):
    for name in (
      "num_slots",
      "max_prompt_len",
      "max_new_tokens",
      "steps_per_call",
      "min_prefill_bucket",
      "page_size",
      "decode_block",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
    if self.kv_layout not in ("paged", "dense"):
      raise ValueError(f"EngineConfig.kv_layout must be 'paged' or 'dense', got {self.kv_layout!r}")
    if self.insert_bucket not in ("count", "prefix"):
      raise ValueError(f"EngineConfig.insert_bucket must be 'count' or 'prefix', got "
                       f"{self.insert_bucket!r}")  # fmt: skip
    if self.num_pages is not None and self.num_pages <= 0:
      raise ValueError(f"EngineConfig.num_pages must be positive, got {self.num_pages}")

  @property
  def page(self) -> int:
    """The page size in use: page_size, at most the cache length's power of two."""
    return min(self.page_size, next_pow2(self.cache_len))

  @property
  def pages_per_slot(self) -> int:
    """M: pages one slot can hold (ceil(S / page))."""
    return -(-self.cache_len // self.page)

  def pages_needed(self, prompt_len: int, max_new: int) -> int:
    """A slot's reservation: its worst case, ceil((prompt_len + max_new) / page)."""
    return -(-(prompt_len + max_new) // self.page)

  @property
  def max_prefill_len(self) -> int:
    """Largest prefill bucket (a power of two >= max_prompt_len)."""
    return next_pow2(max(self.max_prompt_len, self.min_prefill_bucket))

  @property
  def cache_len(self) -> int:
    """S: a slot must hold its prefill bucket and then prompt + response."""
    return max(self.max_prefill_len, self.max_prompt_len + self.max_new_tokens)

  def prefill_bucket(self, length: int) -> int:
    if length > self.max_prompt_len:
      raise ValueError(f"prompt of {length} tokens exceeds max_prompt_len={self.max_prompt_len}")
    return min(next_pow2(max(length, self.min_prefill_bucket)), self.max_prefill_len)

  def batch_bucket(self, n: int) -> int:
    return min(next_pow2(n), next_pow2(self.num_slots))


def next_pow2(n: int) -> int:
  """The least power of two >= n (1 for n <= 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
  """int32[n] stop ids padded with -1 to n, a power of two (no recompiles for small changes)."""
  ids = sorted(set(int(i) for i in stop_ids))
  out = np.full((next_pow2(max(len(ids), 1)),), -1, np.int32)
  out[: len(ids)] = ids
  return out
