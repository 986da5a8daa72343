"""Every random stream of a run, from one root key `jax.random.key(rc.seed)` split by name.

  rng_for(seed, "eval", step)    a key: the root, then the stream's id, then each index folded in
  seed_for(seed, "eval", step)   an int in [0, 2**31) drawn from that key, for the sampler
                                 (`driver.run(seed=...)`), `random.Random` and numpy

Streams (name: indices -> what it seeds):
  init: -> the model's initial params when there is no model.hf_dir
  sampling: step, round -> the rollout sampler in dynamic-sampling round `round` of RL step `step`
  eval: step -> the in-training eval's sampler after `step` RL steps
  sft_rows: -> which of the warm start's supervised answers carry the slip
  sft_batches: -> the warm start's batch order

A named stream first folds in its id, a stable hash (crc32) of its name with the top bit set.
The named ids are >= 2**31, which no step index reaches, so no named stream shares its keys.
Four streams keep the derivation they had before the streams were split by name (HISTORICAL):
  sampling  the root's own index stream, fold_in(fold_in(root, step), round): the stored
            one-step trainer golden (tests/testdata/tiny_cpu_step1_golden.json) was drawn so;
  init      the root key itself (never folded, so it is no key of `sampling`);
  sft_batches, sft_rows  the ints seed and seed + 17.
Why init and the warm start: tiny_cpu's warm start leaves its copy-task plateau (loss ~0.71)
within its 400 steps for some streams only. Measured 2026-12-01: the historical streams
(seed 0) reach loss 0.10 at step 400; the named ones reach 0.56 (seed 0) and stay at 0.70 after
600 steps (seed 1); seed 2 learns. So moving them would silently break the README's main job.
(The data order has its own config key, data.shuffle_seed, as in verl.)
"""

from __future__ import annotations

import zlib

import jax

STREAMS = ("init", "sampling", "eval", "sft_rows", "sft_batches")
_ROOT_KEY_STREAMS = ("sampling", "init")  # HISTORICAL: no stream id folded in (docstring)
_INT_OFFSETS = {"sft_batches": 0, "sft_rows": 17}  # HISTORICAL: seed + offset (docstring)
HISTORICAL = (*_ROOT_KEY_STREAMS, *_INT_OFFSETS)


def stream_id(name: str) -> int:
  """The uint32 folded into the root for stream `name`: crc32 of the name, top bit set."""
  if name not in STREAMS:
    raise ValueError(f"unknown random stream {name!r}; the streams are {STREAMS}")
  return zlib.crc32(name.encode()) | 0x80000000


def rng_for(seed: int, name: str, *indices: int) -> jax.Array:
  """The key of stream `name` at `indices` (e.g. the RL step) under the run's `seed`."""
  if name in HISTORICAL and name != "sampling" and indices:
    raise ValueError(f"stream {name!r} takes no indices")  # else init@i == sampling@i
  key = jax.random.key(seed)
  if name not in _ROOT_KEY_STREAMS:
    key = jax.random.fold_in(key, stream_id(name))  # checks the name
  for i in indices:
    if not 0 <= int(i) < 2**31:  # below the named ids (see the module docstring)
      raise ValueError(f"stream index {i} of {name!r} outside [0, 2**31)")
    key = jax.random.fold_in(key, int(i))
  return key


def seed_for(seed: int, name: str, *indices: int) -> int:
  """An int seed in [0, 2**31) drawn from `rng_for(seed, name, *indices)` (or HISTORICAL)."""
  if name in _INT_OFFSETS:
    if indices:
      raise ValueError(f"stream {name!r} takes no indices")
    return seed + _INT_OFFSETS[name]
  return int(jax.random.randint(rng_for(seed, name, *indices), (), 0, 2**31 - 1))
