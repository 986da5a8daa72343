"""Every random stream of a run, from one root key `jax.random.key(rc.seed)` split by name.

  rng_for(seed, "eval", step)    a key: the root, then the stream's id, then each index folded in
  seed_for(seed, "eval", step)   an int in [0, 2**31) drawn from that key, for the sampler
                                 (`driver.run(seed=...)`), `random.Random` and numpy

Streams (name: indices -> what it seeds):
  init: -> the model's initial params when there is no model.hf_dir
  sampling: step, round -> the rollout sampler in dynamic-sampling round `round` of RL step `step`
  overlap_sampling: step, 0 -> the sampler in step `step`'s overlap round (rollout.overlap_calls)
  eval: step -> the in-training eval's sampler after `step` RL steps
  eval_probe: step -> the step-0 check's sample of the held-out prompts at the rollout settings
  sft_rows: -> which of the warm start's supervised answers carry the slip
  sft_batches: -> the warm start's batch order (and, for parity, each example's form)

Every stream first folds in its id, a stable hash (crc32) of its name with the top bit set, then
its indices. The ids are >= 2**31, which no index reaches, so no two streams share a key, and
every seed gets the same derivation: no seed or stream is special-cased. (The warm start's loss
threshold, sft.loss_threshold, is what makes every seed's base model usable, not a chosen
stream.) The data order has its own config key, data.shuffle_seed, as in verl.
"""

from __future__ import annotations

import zlib

import jax

STREAMS = ("init", "sampling", "overlap_sampling", "eval", "eval_probe", "sft_rows", "sft_batches")


def stream_id(name: str) -> int:
  """The uint32 folded into the root for stream `name`: crc32 of the name, top bit set."""
  if name not in STREAMS:
    raise ValueError(f"unknown random stream {name!r}; the streams are {STREAMS}")
  return zlib.crc32(name.encode()) | 0x80000000


def rng_for(seed: int, name: str, *indices: int) -> jax.Array:
  """The key of stream `name` at `indices` (e.g. the RL step) under the run's `seed`."""
  key = jax.random.fold_in(jax.random.key(seed), stream_id(name))  # checks the name
  for i in indices:
    if not 0 <= int(i) < 2**31:  # below the stream ids (see the module docstring)
      raise ValueError(f"stream index {i} of {name!r} outside [0, 2**31)")
    key = jax.random.fold_in(key, int(i))
  return key


def seed_for(seed: int, name: str, *indices: int) -> int:
  """An int seed in [0, 2**31) drawn from `rng_for(seed, name, *indices)`."""
  return int(jax.random.randint(rng_for(seed, name, *indices), (), 0, 2**31 - 1))
