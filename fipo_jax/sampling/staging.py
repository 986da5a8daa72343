"""Weights from the trainer's devices to a disjoint set of sampler devices, device to device.

Stage B of the async rollouts (docs/async_rollouts_stage_b.md) splits each process's devices
into a trainer mesh and a sampler mesh. Once per RL step the trainer's params (float32 masters
in its FSDP layout) move into a staging buffer in the sampler's layout and dtype. Neither of
JAX's one-call ways does that on jax 0.10 CPU without the host:

  jit(cast, out_shardings=<sampler>)   refused: a jitted computation's inputs and outputs must
                                       lie on one device set;
  jax.device_put(x, <sampler>)         one process: a layout change copies the whole array to
                                       host memory and back (only the guard level
                                       'disallow_explicit' sees it, not 'disallow');
                                       several processes: refused (a cross-host reshard must
                                       keep its device set).

So the move takes two hops, each on devices that already work together:
  1. reshard + cast, jitted on the trainer's devices, into a *mirror* of the sampler layout:
     the sampler's spec over a mesh of trainer devices in which the device at each position
     lives on the same process as the sampler device at that position;
  2. one plain device-to-device copy per local shard (`jax.device_put(shard, device)`), each to
     the sampler device paired with the shard's device, assembled with
     `jax.make_array_from_single_device_arrays`: no collective and nothing across processes.
Both hops are dispatched asynchronously: `WeightStager.start` returns before any byte moves.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

# The mirror mesh's extra axis when the trainer has r times the sampler's devices: the mirror
# holds r copies of each sampler shard (replicated over this axis); hop 2 copies the first.
COPY_AXIS = "stage_copy"


def _process(device) -> int:
  return getattr(device, "process_index", 0)


def split_devices(devices_per_process: Mapping[int, Sequence[Any]] | Sequence[Any],
                  sampler_per_process: int) -> tuple[list[Any], list[Any]]:
  """(trainer_devices, sampler_devices): each process gives its last k local devices to the
  sampler and keeps the others for the trainer.

  devices_per_process: {process_index: its local devices in order}, or a flat device list
    (grouped by each device's `process_index`; 0 where it has none, e.g. plain test objects).
  sampler_per_process: k, with 0 < k < the local device count (the same on every process).
  Returns two lists, each ordered by process, then by local order: a mesh made by reshaping
  either (the leading 'data' axis first) holds each process's devices contiguously, so no
  process's rows straddle another's and the pairs of `WeightStager` stay within a process.
  """
  if isinstance(devices_per_process, Mapping):
    groups = {int(p): list(ds) for p, ds in devices_per_process.items()}
  else:
    groups = collections.defaultdict(list)
    for d in devices_per_process:
      groups[_process(d)].append(d)
  if not groups or not all(groups.values()):
    raise ValueError("split_devices: every process needs at least one device")
  counts = {len(ds) for ds in groups.values()}
  if len(counts) != 1:
    raise ValueError(f"split_devices: processes have different local device counts "
                     f"{sorted(counts)}; the sampler/trainer split must be the same on each")
  local = counts.pop()
  k = sampler_per_process
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 < k < local:
    raise ValueError(f"sampler devices per process must be between 1 and {local - 1} "
                     f"(each process has {local} local devices), got {k!r}")
  trainer, sampler = [], []
  for p in sorted(groups):
    trainer += groups[p][:local - k]
    sampler += groups[p][local - k:]
  return trainer, sampler


def mirror_mesh(sampler_mesh: Mesh, source_devices) -> Mesh:
  """The trainer devices as a mesh of the sampler's shape (plus COPY_AXIS of size r).

  sampler_mesh: axes A, devices [*A]; source_devices: the trainer's devices, r per sampler
  device on each process (r >= 1). Position (*a, j) of the result holds a trainer device on the
  process of sampler_mesh.devices[*a]. Devices are taken in id order, so every process builds
  the same mesh (a multi-process program must).
  """
  if COPY_AXIS in sampler_mesh.axis_names:
    raise ValueError(f"the sampler mesh must not have an axis named {COPY_AXIS!r}")
  by_process = collections.defaultdict(list)
  for d in sorted(source_devices, key=lambda d: d.id):
    by_process[_process(d)].append(d)
  targets = collections.Counter(_process(d) for d in sampler_mesh.devices.flat)
  have = {p: len(ds) for p, ds in by_process.items()}
  r = min(have.get(p, 0) // n for p, n in targets.items())
  if r < 1 or have != {p: r * n for p, n in targets.items()}:
    raise ValueError("staging needs the same whole multiple of trainer devices per sampler "
                     f"device on every process: trainer devices per process {have}, sampler "
                     f"devices per process {dict(targets)}")
  queues = {p: iter(ds) for p, ds in by_process.items()}
  devices = np.empty((sampler_mesh.devices.size, r), dtype=object)
  for i, t in enumerate(sampler_mesh.devices.flat):
    for j in range(r):
      devices[i, j] = next(queues[_process(t)])
  devices = devices.reshape(sampler_mesh.devices.shape + (r,))
  return Mesh(devices, (*sampler_mesh.axis_names, COPY_AXIS))


def leaf_dtype(x, dtype) -> jnp.dtype:
  """The dtype the sampler holds a param leaf in: `dtype` for floating leaves (None:
  unchanged); integer leaves keep theirs."""
  if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
    return x.dtype
  return jnp.dtype(dtype)


def cast(params, dtype):
  """`params` (a tree of arrays) with floating leaves cast to `dtype` (`leaf_dtype`)."""
  return jax.tree.map(lambda x: x.astype(leaf_dtype(x, dtype)), params)


class WeightStager:
  """Moves params from the trainer's devices into the sampler's shardings and dtype.

  `start(params)` dispatches the move and returns at once; `ready()` says, without blocking,
  whether the staged copy is complete; `take()` hands it over (the sampler swaps it in at a
  decode-call boundary). Built once per run: the first `start` compiles hop 1, later ones
  reuse it (the params' structure, shapes and layout never change).

  targets: a NamedSharding per param leaf (the params' tree, e.g.
    `sharding.state_shardings(params, sampler_mesh)`), all on one sampler mesh whose devices
    are disjoint from the params'.
  dtype: what floating leaves are staged in (e.g. jnp.bfloat16); None keeps each leaf's.
  In a multi-process run every process calls `start` at the same point of the program (hop 1
  is an SPMD program over the trainer's devices of all processes).
  """

  def __init__(self, targets, dtype=None):
    leaves = jax.tree.leaves(targets)
    meshes = {s.mesh for s in leaves}
    if not leaves or not all(isinstance(s, NamedSharding) for s in leaves) or len(meshes) != 1:
      raise ValueError("staging targets must be NamedShardings on one sampler mesh")
    self.targets = targets
    self.dtype = dtype
    self.sampler_mesh: Mesh = meshes.pop()
    self._hop1 = None  # the jitted reshard + cast into the mirror layout, built on first use
    self._pairs: dict[Any, Any] = {}  # local mirror device -> its sampler device
    self._staged = None

  def _build(self, params) -> None:
    """Hop 1's program and hop 2's device pairs, from where the first params lie."""
    source = {d for x in jax.tree.leaves(params) for d in x.sharding.device_set}
    if source & set(self.sampler_mesh.devices.flat):
      raise ValueError("staging: the params' devices and the sampler mesh's overlap "
                       "(colocated sampling uses Engine.load_params)")
    mirror = mirror_mesh(self.sampler_mesh, source)
    first = mirror.devices[..., 0]  # the copy of each shard that hop 2 moves
    me = jax.process_index()
    self._pairs = {m: s for m, s in zip(first.flat, self.sampler_mesh.devices.flat, strict=True)
                   if _process(s) == me}
    out = jax.tree.map(lambda s: NamedSharding(mirror, s.spec), self.targets)
    self._hop1 = jax.jit(functools.partial(cast, dtype=self.dtype), out_shardings=out)

  def program(self, params) -> jax.stages.Wrapped:
    """Hop 1's jitted program for `params` (arrays or ShapeDtypeStructs with shardings), built
    on first use: what fipo_jax.aot compiles (hop 2 compiles nothing)."""
    if self._hop1 is None:
      self._build(params)
    return self._hop1

  def start(self, params) -> None:
    """Dispatches the move of `params` (the targets' tree, on the trainer's devices); returns
    before it completes. A copy staged earlier and not taken is dropped."""
    mirrored = self.program(params)(params)
    leaves, treedef = jax.tree.flatten(mirrored)
    # Hop 2: every local shard held by a first-copy mirror device, to its paired sampler
    # device, in one batched device_put (a device-to-device copy each, dispatched async).
    shards = [[s.data for s in x.addressable_shards if s.device in self._pairs] for x in leaves]
    moved = jax.device_put([d for leaf in shards for d in leaf],
                           [self._pairs[d.device] for leaf in shards for d in leaf])
    moved = iter(moved)
    staged = [jax.make_array_from_single_device_arrays(x.shape, t, [next(moved) for _ in s])
              for x, t, s in zip(leaves, treedef.flatten_up_to(self.targets), shards,
                                 strict=True)]
    self._staged = treedef.unflatten(staged)

  def ready(self) -> bool:
    """Whether a staged copy exists and this process's shards of it are all on its sampler
    devices (no blocking). Other processes may answer differently at the same point: agree
    before acting on it in a multi-process run (docs/async_rollouts_stage_b.md)."""
    return self._staged is not None and all(x.is_ready() for x in jax.tree.leaves(self._staged))

  def take(self):
    """The staged params (targets' tree, shardings and dtype), handed over once; None when
    nothing was started since the last take. Taking before `ready()` is correct but whatever
    consumes the arrays then waits for the move."""
    staged, self._staged = self._staged, None
    return staged


def stage(params, targets, dtype=None):
  """`params` moved into `targets` (shardings on a disjoint sampler mesh) cast to `dtype`: one
  WeightStager's start and take (arrays still in flight; see WeightStager)."""
  stager = WeightStager(targets, dtype)
  stager.start(params)
  return stager.take()
