"""A run's batch layout on the host: its packer settings, its mini-batches on the mesh.

`packing.Layout` is what the packer needs: the row length, the micro-batches and the batch
shards; `for_run` derives it from a RunConfig. Padded (rl.use_remove_padding=False) and packed
rows are two layouts of one `steps.Batch`, run by the same jitted steps (rl/steps.py):

  for_run(rc, mesh, update_cfg)                                       -> packing.Layout
  mini_batches(rc, mesh, rollouts, advantages, *, update_cfg, pad_id) -> [steps.Batch], arrays
  abstract_batch(shape, T)                                            -> steps.Batch of SDSs

Influence dumps come back to [M, T] rows through `rollout_dump.row_arrays`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax import sharding
from fipo_jax.rl import packing, steps


def num_batch_shards(mesh) -> int:
  """W: the devices a batch is split over (the mesh axes of the 'batch' rule)."""
  return int(np.prod([mesh.shape[a] for a in sharding.mesh_axes("batch") if a in mesh.shape]))


def for_run(rc, mesh, update_cfg: steps.UpdateConfig) -> packing.Layout:
  """The packer's settings for a run: row length, micro-batch mode, batch shards.

  Padded (rl.use_remove_padding=False): rows of P + T, one sequence each, the update's fixed
  micro-batches. Packed with rl.use_dynamic_bsz: a row is rl.ppo_max_token_len_per_device real
  tokens (verl's token budget per device per micro-batch) and micro-batches follow the budget;
  without it, rows of the longest allowed sequence hold the fixed micro-batches.
  """
  longest = rc.data.max_prompt_length + rc.rl.max_response_length
  padded = not rc.rl.use_remove_padding
  dynamic = not padded and rc.rl.use_dynamic_bsz
  return packing.Layout(
    row_len=rc.rl.ppo_max_token_len_per_device if dynamic else longest,
    num_micro=None if dynamic else update_cfg.num_micro_batches,
    num_shards=num_batch_shards(mesh),
    padded=padded,
  )


def mini_batches(
  rc, mesh, rollouts, advantages: np.ndarray, *, update_cfg: steps.UpdateConfig, pad_id: int
) -> tuple[list[steps.Batch], dict[str, np.ndarray]]:
  """[B] rollouts -> B / mini mini-batches on `mesh`, on the run's layout (`for_run`).

  Every host plans every mini-batch (the [B] rollouts are on every host) and fills only the
  batch shards its own devices hold. Returns (the mini-batches, this host's response-layout
  arrays of all of them, stacked: response_mask and advantages).
  """
  layout = for_run(rc, mesh, update_cfg)
  d = layout.num_shards
  shards = sharding.process_rows(sharding.batch_sharding(mesh, 1, (d,)), d) or slice(0, d)
  packed = packing.pack_rollouts(
    rollouts.prompt_ids,
    rollouts.response_ids,
    rollouts.response_logprobs,
    advantages,
    mini=rc.rl.ppo_mini_batch_size * rc.rl.n,
    max_prompt_length=rc.data.max_prompt_length,
    max_response_length=rc.rl.max_response_length,
    layout=layout,
    pad_id=pad_id,
    shards=shards,
  )
  _log_shape(packed, rc.rl.max_response_length)
  batches = [device_batch(mesh, arrays, d) for arrays in packed.batches]
  stacked = {k: np.stack([b[k] for b in packed.batches]) for k in ("response_mask", "advantages")}
  return batches, stacked


def device_batch(mesh, arrays: dict[str, np.ndarray], num_shards: int) -> steps.Batch:
  """Global [NM, W, ...] arrays from this process's shards (all shards also work)."""

  def put(x):
    shape = (x.shape[0], num_shards) + x.shape[2:]
    spec = sharding.named_sharding(mesh, (None, "batch") + (None,) * (x.ndim - 2), shape)
    return jax.make_array_from_process_local_data(spec, x, shape)

  return steps.Batch(**{k: put(v) for k, v in arrays.items()})


def abstract_batch(
  shape: packing.Shape, response_len: int, *, with_ref: bool = False
) -> steps.Batch:
  """ShapeDtypeStructs of a Batch of packing.Shape `shape` (for eval_shape and AOT)."""
  sds = jax.ShapeDtypeStruct
  tokens = (shape.num_micro, shape.num_shards, shape.rows, shape.row_len)
  resp = (shape.num_micro, shape.num_shards, shape.slots, response_len)
  i32 = lambda s: sds(s, jnp.int32)
  f32 = lambda s: sds(s, jnp.float32)
  return steps.Batch(
    input_ids=i32(tokens),
    segment_ids=i32(tokens),
    positions=i32(tokens),
    token_index=i32(resp),
    response_mask=f32(resp),
    old_log_probs=f32(resp),
    advantages=f32(resp),
    seq_mask=f32(resp[:3]),
    seq_index=i32(resp[:3]),
    ref_log_probs=f32(resp) if with_ref else None,
  )


_SEEN_SHAPES: set[tuple] = set()


def _log_shape(packed: packing.PackedRollouts, response_len: int) -> None:
  """Logs the bucketed layout; a shape not seen before means the jitted steps compile."""
  shape, plans, useful = packed.shape, packed.plans, packed.useful
  key = (shape.num_micro, shape.num_shards, shape.rows, shape.slots, shape.row_len, response_len)
  logging.info(
    "layout: %d mini-batches x %d micro-batches (%d used) x %d shards x %d rows x "
    "%d tokens, %d slots; %.0f%% of the tokens are real",
    len(plans),
    shape.num_micro,
    max(p.num_micro for p in plans),
    shape.num_shards,
    shape.rows,
    shape.row_len,
    shape.slots,
    100 * useful,
  )
  if key not in _SEEN_SHAPES:
    _SEEN_SHAPES.add(key)
    logging.info("layout: new shape %s: the train and log-prob steps compile for it", key)


