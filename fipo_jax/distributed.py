"""Multi-host start-up: one process per host on JAX's multi-controller runtime.

`initialize()` runs before anything touches a device (first thing in `fipo_jax.main`). It calls
`jax.distributed.initialize` when the run spans several processes and is a no-op otherwise:

  explicit    the arguments (fipo_jax.main passes its --coordinator_address / --num_processes /
              --process_id flags), or the environment variables FIPO_COORDINATOR,
              FIPO_NUM_PROCESSES, FIPO_PROCESS_ID (localhost tests, hand-rolled clusters);
  detected    a SLURM job step with several tasks, an Open MPI launch with several ranks, or a
              multi-host Cloud TPU slice: JAX reads the coordinator from that environment;
  forced      FIPO_DISTRIBUTED=1 calls `jax.distributed.initialize()` with no arguments (any
              cluster JAX itself can detect); FIPO_DISTRIBUTED=0 never initializes.

On CPU the cross-process collectives go through gloo. After initialization every process sees
all devices in `jax.devices()` (its own in `jax.local_devices()`), and the trainer runs one SPMD
program over the global mesh. This module defines no flags (the entry points do), so importing
it, or anything that uses it, registers nothing.
"""

from __future__ import annotations

import logging
import os

import numpy as np

COORDINATOR_ENV = "FIPO_COORDINATOR"
NUM_PROCESSES_ENV = "FIPO_NUM_PROCESSES"
PROCESS_ID_ENV = "FIPO_PROCESS_ID"
FORCE_ENV = "FIPO_DISTRIBUTED"


def _env(value, env: str, cast):
  """`value`, or the environment variable `env` (cast) when value is None and it is set."""
  if value is None and os.environ.get(env, "") != "":
    value = cast(os.environ[env])
  return value


def _cluster_detected(environ) -> bool:
  """True inside a launcher that started several processes JAX can find by itself."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-controller runtime when the run has several processes.

  Arguments (None: not given) override the environment. Returns True if
  `jax.distributed.initialize` was called (now or earlier), False for a single-process run.
  """
  import jax  # noqa: PLC0415 -- keep `--help` and flag parsing free of the jax import

  if jax.distributed.is_initialized():
    return True
  force = os.environ.get(FORCE_ENV, "").strip().lower()
  if force in ("0", "false", "off"):
    return False
  coordinator_address = _env(coordinator_address or None, COORDINATOR_ENV, str)
  num_processes = _env(num_processes, NUM_PROCESSES_ENV, int)
  process_id = _env(process_id, PROCESS_ID_ENV, int)
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("multi-host: a coordinator address needs num_processes and process_id too "
                     f"(arguments/flags or {NUM_PROCESSES_ENV} / {PROCESS_ID_ENV})")
  if explicit and num_processes == 1:
    return False
  if not (explicit or force in ("1", "true", "on") or _cluster_detected(os.environ)):
    return False
  # CPU devices talk to other processes through gloo (TPU/GPU clients ignore this option).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_primary() -> bool:
  """Process 0: the one that writes logs, plots and config.json."""
  import jax  # noqa: PLC0415

  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across all processes (a no-op in a single-process run)."""
  import jax  # noqa: PLC0415

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def fetch(tree):
  """jax.device_get that also works on arrays spanning other hosts' devices.

  A fully addressable (e.g. replicated) array is read locally; a sharded global array is
  all-gathered first, so every process must call this at the same point of the program.
  """
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)

  return jax.tree.map(one, tree)


class primary_first:  # noqa: N801 -- used as a context manager
  """`with primary_first('name'):` process 0 runs the block, then the others, one barrier apart.

  For work on a shared filesystem that every process repeats (e.g. writing the synthetic data
  or tokenizer into the workdir): nobody reads a file while another process rewrites it.
  """

  def __init__(self, name: str):
    self.name = name

  def __enter__(self):
    if not is_primary():
      sync(self.name + ":primary")
    return self

  def __exit__(self, *exc):
    if exc[0] is not None:
      return False  # an error on one host: do not wait at barriers the others never reach
    if is_primary():
      sync(self.name + ":primary")
    sync(self.name + ":all")
    return False


def allgather_strided(local, total: int):
  """Every process gets all `total` items when process p holds items p, p + c, p + 2c, ...

  local: a pytree of numpy arrays [ceil((total - p) / c), ...], process p's items in order
  (c = process_count). Returns the same pytree with arrays [total, ...] in item order. A
  collective: every process calls it at the same point. One process: `local` unchanged.
  """
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  count = jax.process_count()
  if count == 1:
    return local
  per = -(-total // count)  # items per process, the last ones padded

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((per - len(x),) + x.shape[1:], x.dtype)])

  def unstride(x):  # [c, per, ...] -> item i = p + c * j at [j, p]
    x = np.asarray(x)
    return np.swapaxes(x, 0, 1).reshape((per * count,) + x.shape[2:])[:total]

  return jax.tree.map(unstride, multihost_utils.process_allgather(jax.tree.map(pad, local)))


def allgather_strings_strided(local: list[str], total: int) -> list[str]:
  """`allgather_strided` for strings (utf-8 bytes padded to the longest on any process)."""
  import jax  # noqa: PLC0415

  if jax.process_count() == 1:
    return list(local)
  encoded = [s.encode() for s in local]
  lengths = np.asarray([len(b) for b in encoded], np.int32)
  width = max(1, int(allgather_strided(lengths, total).max(initial=0)))
  buf = np.zeros((len(encoded), width), np.uint8)
  for i, b in enumerate(encoded):
    buf[i, :len(b)] = np.frombuffer(b, np.uint8)
  out = allgather_strided({"bytes": buf, "lengths": lengths}, total)
  return [out["bytes"][i, :n].tobytes().decode() for i, n in enumerate(out["lengths"])]
