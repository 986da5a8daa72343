"""The `mesh` and `sampler_mesh` config sections: device-mesh axes checked against the devices.

Part of the schema in `fipo_jax.config` (which re-exports both). An error names the axis that
does not fit, e.g.

  mesh.tensor: fixed mesh axes (mesh.data=1, mesh.fsdp=-1, mesh.tensor=3, product 3) do not
  divide the 8 devices
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import ClassVar

from fipo_jax.config_schema import Section


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
  SECTION: ClassVar[str] = "mesh"
  AXES: ClassVar[tuple[str, ...]] = ("data", "fsdp", "tensor")
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    for name in self.AXES:
      self._require(getattr(self, name) == -1 or getattr(self, name) >= 1, name,
                    "must be -1 (the rest) or >= 1")
    rest = [n for n in self.AXES if getattr(self, n) == -1]
    if len(rest) > 1:  # name an axis other than fsdp, whose -1 is the usual default
      self._fail(next(n for n in rest if n != "fsdp"),
                 f"at most one mesh axis may be -1, got {self._axes()}")

  def as_tuple(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def _axes(self) -> str:
    return ", ".join(f"{self.SECTION}.{n}={getattr(self, n)}" for n in self.AXES)

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in; raises ConfigError naming the axis that does
    not fit (the first fixed one that does not divide the device count, else the first > 1)."""
    sizes = self.as_tuple()
    fixed = math.prod(v for v in sizes if v != -1)
    if -1 in sizes:
      if num_devices % fixed:
        prods = itertools.accumulate((max(v, 1) for v in sizes), operator.mul)
        bad = next(n for n, p in zip(self.AXES, prods, strict=True) if num_devices % p)
        self._fail(bad, f"fixed mesh axes ({self._axes()}, product {fixed}) do not divide "
                   f"the {num_devices} devices")
      sizes = tuple(num_devices // fixed if v == -1 else v for v in sizes)
    elif fixed != num_devices:
      bad = next((n for n, v in zip(self.AXES, sizes, strict=True) if v > 1), "data")
      self._fail(bad, f"mesh {sizes} has {fixed} devices but {num_devices} are available")
    return sizes


@dataclasses.dataclass(frozen=True)
class SamplerMeshSection(MeshSection):
  """The sampler's own mesh layout over the same devices; all 0 (the default) = `mesh`'s."""

  SECTION: ClassVar[str] = "sampler_mesh"
  data: int = 0
  fsdp: int = 0
  tensor: int = 0

  def __post_init__(self):
    if not self.is_set:
      return
    for name in self.AXES:
      self._require(getattr(self, name) != 0, name,
                    "must be set with the other axes (-1 = the rest), or all 0 = the train mesh")
    super().__post_init__()

  @property
  def is_set(self) -> bool:
    return self.as_tuple() != (0, 0, 0)

  def resolve(self, num_devices: int) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) with -1 filled in, or None when the sampler uses the train mesh."""
    return super().resolve(num_devices) if self.is_set else None
