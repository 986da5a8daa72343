"""Mesh construction and the one logical-axis rules table.

Modules name logical axes only (the `axes` metadata on each `nnx.Param`); this table maps them
to the mesh axes `data`, `fsdp` and `tensor`. A mesh axis that does not divide a dimension is
dropped for that dimension (e.g. 4 kv heads on tensor=8), so every preset shards on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fipo_jax import config_mesh

AXES = config_mesh.AXES

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),  # B: data parallel over both data and fsdp
  "seq": None,  # Q / S / T (package legend): sequence axes are not sharded
  "layers": None,  # L: the scanned axis is never sharded
  "embed": "fsdp",  # D: weights sharded (ZeRO-3 style) over fsdp
  "mlp": "tensor",  # F
  "heads": "tensor",  # N
  "kv_heads": "tensor",  # K
  "head_dim": None,  # H
  "vocab": "tensor",  # V
  "norm": None,  # D of norm scales: small, replicated
  "cache_batch": ("data", "fsdp"),  # B of the KV cache
  # Activations (constrained in the model under an ambient mesh, see `constrain`): the batch
  # is split over every data-parallel axis, so with FSDP weights each chip gathers one layer's
  # weights and keeps its own rows whole; without these XLA may shard the residual stream on D
  # and replicate the [B, Q, F] MLP temporaries instead.
  "activation_batch": ("data", "fsdp"),
  "activation_length": None,
  "activation_embed": None,
  "activation_heads": "tensor",
  "activation_kv_heads": "tensor",
  "activation_mlp": "tensor",
  "activation_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (= the remaining devices).

  The sizes follow the config's mesh rules (`config_mesh.resolve_sizes`); a bad one raises its
  ConfigError (a ValueError) naming the axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config_mesh.resolve_sizes((data, fsdp, tensor), len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), AXES)


def sampler_mesh_sizes(num_heads: int, num_kv_heads: int, devices: Sequence[jax.Device]
                       ) -> tuple[int, int, int]:
  """The sampler's (data, fsdp, tensor) when a recipe leaves `sampler_mesh` unset.

  Decode is memory-bound: each step must read every weight byte once from local HBM and never
  gather weights over the interconnect, so no FSDP. Tensor-parallel over the KV heads within a
  host (the largest size dividing the KV heads, the query heads and the host's devices: the
  paged cache splits its KV heads over `tensor` only when both divide), slots data-parallel
  over the rest: (devices / tensor, 1, tensor).
  """
  devices = list(devices)
  host = sum(1 for d in devices if getattr(d, "process_index", 0)
             == getattr(devices[0], "process_index", 0))
  tensor = math.gcd(num_heads, num_kv_heads, host, len(devices))
  return (len(devices) // tensor, 1, tensor)


def mesh_axes(logical: str | None, size: int | None = None, mesh=None,
              used: Sequence[str] = ()) -> tuple[str, ...]:
  """The mesh axes RULES maps `logical` to, less those in `used` (an earlier dimension's).

  The divisibility rule: with `size` and `mesh` (concrete or abstract), an axis is kept only if
  the mesh has it and it divides `size` together with the axes kept before it.
  """
  if logical is not None and logical not in RULES:
    raise KeyError(f"logical axis {logical!r} is not in sharding.RULES")
  target = RULES.get(logical) if logical is not None else None
  kept: list[str] = []
  for t in () if target is None else ((target,) if isinstance(target, str) else target):
    if t in used:
      continue
    if size is not None and mesh is not None and (
        t not in mesh.axis_names or size % math.prod(mesh.shape[a] for a in (*kept, t))):
      continue
    kept.append(t)
  return tuple(kept)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through RULES.

  With `shape` and `mesh`, mesh axes that do not divide the dimension (or are already used by
  an earlier dimension) are dropped (`mesh_axes`).
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    kept = mesh_axes(name, None if shape is None else shape[i], mesh, tuple(used))
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None
                   ) -> NamedSharding:
  """Sharding for [B, ...] data: batch over ('data', 'fsdp'), the rest replicated."""
  return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), shape)


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> slice | None:
  """The rows [lo, hi) of a [num_rows, ...] array that this process's devices hold.

  None if they are not one contiguous block (a mesh whose devices are not grouped by process).
  """
  held: set[int] = set()
  for index in sharding.addressable_devices_indices_map((num_rows,)).values():
    held.update(range(*index[0].indices(num_rows)))
  lo, hi = min(held), max(held) + 1
  return slice(lo, hi) if len(held) == hi - lo else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` of x through RULES under the ambient mesh.

  The mesh is the one set with `jax.set_mesh` / `jax.sharding.use_abstract_mesh` (the jitted
  steps set it from their params' shardings); without one, x is returned unchanged, so the
  model runs as before on one device and in the tests.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh):
  """NamedShardings for an nnx State (abstract or concrete) from each Variable's `axes`."""

  def one(var):
    if not _is_var(var):
      return replicated(mesh)
    axes = var.get_metadata().get("axes")
    if axes is None:
      return var.replace(replicated(mesh))
    shape = var.get_value().shape
    if len(axes) != len(shape):
      raise ValueError(f"axes {axes} do not match the shape {shape} of a parameter")
    return var.replace(named_sharding(mesh, axes, shape))

  return jax.tree.map(one, state, is_leaf=_is_var)


def shard_params(state, mesh: Mesh):
  """Places every leaf of an nnx State onto `mesh` with the sharding the rules table gives."""
  shardings = state_shardings(state, mesh)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)


def optimizer_shardings(tx, params, mesh: Mesh):
  """Shardings for `tx.init(params)`: each moment as its param, counters replicated.

  `jax.jit(tx.init)` alone would leave the state on one device (its outputs do not depend on
  the params' values), which no multi-host program can read; pass these as its out_shardings.
  """
  import optax  # noqa: PLC0415 -- the rules table itself does not need optax

  abstract = jax.eval_shape(tx.init, params)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))
