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

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),  # B: data parallel over both data and fsdp
  "seq": None,  # T / S
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
  # and replicate the [B, T, F] MLP temporaries instead.
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
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (= the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one of data/fsdp/tensor may be -1, got {sizes}")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ValueError(f"mesh.{k} must be positive or -1, got {v}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"mesh.{free[0]}=-1: {len(devices)} devices are not divisible by the "
                       f"product of the other axes ({known}) in {sizes}")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f"mesh sizes {sizes} multiply to {total} but there are {len(devices)} "
                     f"devices; fix mesh.data / mesh.fsdp / mesh.tensor")
  arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in AXES])
  return Mesh(arr, AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec through RULES.

  With `shape` and `mesh`, mesh axes that do not divide the dimension (or are already used by
  an earlier dimension) are dropped.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} is not in sharding.RULES")
    target = RULES.get(name) if name is not None else None
    targets = () if target is None else ((target,) if isinstance(target, str) else target)
    kept = []
    for t in targets:
      if t in used:
        continue
      if shape is not None and mesh is not None:
        size = mesh.shape[t] * math.prod(mesh.shape[k] for k in kept)
        if shape[i] % size:
          continue
      kept.append(t)
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
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
