"""Host-side page reservations for the paged KV cache (models/paged.py): which pages of its
shard's pool each decode slot holds."""

from __future__ import annotations


class PageAllocator:
  """Host-side page reservations: a free list per shard; slot b belongs to shard b // (B / D).

  A slot reserves its worst case at insert (no preemption, so no deadlock); page ids are local
  to the shard.
  """

  def __init__(self, num_slots: int, num_pages: int, num_shards: int = 1):
    if num_slots % num_shards or num_pages % num_shards:
      raise ValueError(f"{num_slots} slots / {num_pages} pages do not split into {num_shards}")
    self.slots_per_shard = num_slots // num_shards
    self.pages_per_shard = num_pages // num_shards
    self.free = [list(range(self.pages_per_shard - 1, -1, -1)) for _ in range(num_shards)]
    self.held: dict[int, list[int]] = {}

  def shard(self, slot: int) -> int:
    return slot // self.slots_per_shard

  def available(self, slot: int) -> int:
    """Pages `slot` could hold now (its shard's free pages plus its own, freed on reuse)."""
    return len(self.free[self.shard(slot)]) + len(self.held.get(slot, ()))

  def reserve(self, slot: int, num: int) -> list[int]:
    self.release(slot)
    free = self.free[self.shard(slot)]
    if num > len(free):
      raise ValueError(
        f"slot {slot} needs {num} pages but its shard has {len(free)} free "
        f"({self.pages_per_shard} per shard); release finished slots first"
      )
    self.held[slot] = [free.pop() for _ in range(num)]
    return self.held[slot]

  def release(self, slot: int) -> None:
    self.free[self.shard(slot)].extend(reversed(self.held.pop(slot, [])))
