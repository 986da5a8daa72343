"""The `mesh` and `sampler_mesh` config sections: device-mesh axes checked against the devices.

Part of the schema in `fipo_jax.config` (which re-exports both). `resolve_sizes` is the one
home of the mesh rules (each axis -1 = the rest or >= 1, at most one -1, the sizes fit the device
count); `fipo_jax.sharding.make_mesh` applies it too. An error names the axis that does not
fit, e.g.

  mesh.tensor: fixed mesh axes (mesh.data=1, mesh.fsdp=-1, mesh.tensor=3, product 3) do not
  divide the 8 devices
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import ClassVar

from fipo_jax.config_schema import ConfigError, Section

AXES = ("data", "fsdp", "tensor")


def check_sizes(sizes: tuple[int, int, int], section: str = "mesh") -> None:
  """Each axis -1 (the rest) or >= 1, at most one -1; ConfigError `section.axis: ...`."""
  named = dict(zip(AXES, sizes, strict=True))
  for name, v in named.items():
    if not (v == -1 or v >= 1):
      raise ConfigError(f"{section}.{name}", f"must be -1 (the rest) or >= 1, got {v!r}")
  rest = [n for n, v in named.items() if v == -1]
  if len(rest) > 1:  # name an axis other than fsdp, whose -1 is the usual default
    raise ConfigError(f"{section}.{next(n for n in rest if n != 'fsdp')}",
                      f"at most one mesh axis may be -1, got {_axes(sizes, section)}")


def resolve_sizes(sizes: tuple[int, int, int], num_devices: int, section: str = "mesh"
                  ) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 filled in; raises ConfigError naming the axis that does
  not fit (the first fixed one that does not divide the device count, else the first > 1)."""
  check_sizes(sizes, section)
  sizes = tuple(sizes)
  fixed = math.prod(v for v in sizes if v != -1)
  if -1 in sizes:
    if num_devices % fixed:
      prods = itertools.accumulate((max(v, 1) for v in sizes), operator.mul)
      bad = next(n for n, p in zip(AXES, prods, strict=True) if num_devices % p)
      raise ConfigError(f"{section}.{bad}", f"fixed mesh axes ({_axes(sizes, section)}, product "
                        f"{fixed}) do not divide the {num_devices} devices")
    sizes = tuple(num_devices // fixed if v == -1 else v for v in sizes)
  elif fixed != num_devices:
    bad = next((n for n, v in zip(AXES, sizes, strict=True) if v > 1), "data")
    raise ConfigError(f"{section}.{bad}",
                      f"mesh {sizes} has {fixed} devices but {num_devices} are available")
  return sizes


def _axes(sizes: tuple[int, int, int], section: str) -> str:
  return ", ".join(f"{section}.{n}={v}" for n, v in zip(AXES, sizes, strict=True))


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
  SECTION: ClassVar[str] = "mesh"
  AXES: ClassVar[tuple[str, ...]] = AXES
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    check_sizes(self.as_tuple(), self.SECTION)

  def as_tuple(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in (`resolve_sizes`)."""
    return resolve_sizes(self.as_tuple(), num_devices, self.SECTION)


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
