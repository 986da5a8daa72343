"""A run's batch layout on the host: the packer's settings, mini-batches on the mesh, dumps.

`Layout` is what the packer needs (rl/packing.py): the row length, the micro-batches and the
batch shards; `for_run` derives it from a RunConfig. Padded (rl.use_remove_padding=False) and
packed rows are two layouts of one `steps.Batch`, run by the same jitted steps (rl/steps.py):

  pack_rollouts(prompts, responses, logprobs, advantages, *, layout, ...) -> PackedRollouts
  mini_batches(rc, mesh, rollouts, advantages, *, update_cfg, pad_id)   -> [steps.Batch], arrays
  abstract_batch(shape, T)                                              -> steps.Batch of SDSs
  dump_rows(dumps, batches)                   -> the influence dumps back in [M, T] rows
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax import sharding
from fipo_jax.rl import packing, steps


@dataclasses.dataclass(frozen=True)
class Layout:
  """The packer's settings for a run's mini-batches (`for_run` builds them from a config).

  padded: one sequence per row of row_len = P + T tokens (rl.use_remove_padding=False), the
  fixed micro-batches of `num_micro`; else packed rows of row_len tokens, num_micro None for
  token-budget micro-batches (verl's use_dynamic_bsz).
  """

  row_len: int
  num_micro: int | None
  num_shards: int
  padded: bool = False

  def __post_init__(self):
    if self.padded and self.num_micro is None:
      raise ValueError("the padded layout has fixed micro-batches (num_micro)")


def num_batch_shards(mesh) -> int:
  """W: the devices a batch is split over (the mesh axes of the 'batch' rule)."""
  return int(np.prod([mesh.shape[a] for a in sharding.mesh_axes("batch") if a in mesh.shape]))


def for_run(rc, mesh, update_cfg: steps.UpdateConfig) -> Layout:
  """The packer's settings for a run: row length, micro-batch mode, batch shards.

  Padded (rl.use_remove_padding=False): rows of P + T, one sequence each, the update's fixed
  micro-batches. Packed with rl.use_dynamic_bsz: a row is rl.ppo_max_token_len_per_device real
  tokens (verl's token budget per device per micro-batch) and micro-batches follow the budget;
  without it, rows of the longest allowed sequence hold the fixed micro-batches.
  """
  longest = rc.data.max_prompt_length + rc.rl.max_response_length
  padded = not rc.rl.use_remove_padding
  dynamic = not padded and rc.rl.use_dynamic_bsz
  return Layout(
    row_len=rc.rl.ppo_max_token_len_per_device if dynamic else longest,
    num_micro=None if dynamic else update_cfg.num_micro_batches,
    num_shards=num_batch_shards(mesh),
    padded=padded,
  )


@dataclasses.dataclass(frozen=True)
class PackedRollouts:
  """Every mini-batch of a rollout batch on one packed layout."""

  batches: list[dict[str, np.ndarray]]  # steps.Batch fields per mini-batch (selected shards)
  plans: list[packing.Plan]
  shape: packing.Shape


def _plans(
  lengths: tuple[np.ndarray, np.ndarray],
  layout: Layout,
  max_prompt_length: int,
  max_response_length: int,
) -> list[packing.Plan]:
  """The plan of one mini-batch of (prompt, response) lengths int[M] on `layout`."""
  if layout.padded:
    return packing.plan_padded(
      *lengths,
      num_shards=layout.num_shards,
      num_micro=layout.num_micro,
      max_prompt_length=max_prompt_length,
      max_response_length=max_response_length,
    )
  return packing.plan_mini_batch(
    sum(lengths), num_shards=layout.num_shards, row_len=layout.row_len, num_micro=layout.num_micro
  )


def pack_rollouts(
  prompts: Sequence[np.ndarray],
  responses: Sequence[np.ndarray],
  logprobs: Sequence[np.ndarray],
  advantages: np.ndarray,
  *,
  mini: int,
  max_prompt_length: int,
  max_response_length: int,
  layout: Layout,
  pad_id: int,
  shards: slice | None = None,
) -> PackedRollouts:
  """Packs R = k * mini sequences, mini-batch by mini-batch, into one shared static Shape.

  Prompts keep their last max_prompt_length tokens and responses their first
  max_response_length. Every process plans all mini-batches (the plans agree everywhere) and
  fills only the batch shards `shards` its devices hold. The padded layout's shape is exact
  (R = E = its rows per shard), a packed one's is bucketed.
  """
  if layout.padded and layout.row_len != max_prompt_length + max_response_length:
    raise ValueError(
      f"padded rows are P + T = {max_prompt_length + max_response_length} "
      f"tokens, not {layout.row_len}"
    )
  prompts = [np.asarray(p, np.int32)[-max_prompt_length:] for p in prompts]
  responses = [np.asarray(r, np.int32)[:max_response_length] for r in responses]
  lengths = (
    np.asarray([len(p) for p in prompts], np.int64),
    np.asarray([len(r) for r in responses], np.int64),
  )
  parts = [slice(i, i + mini) for i in range(0, len(prompts), mini)]
  plans = [
    _plans((lengths[0][s], lengths[1][s]), layout, max_prompt_length, max_response_length)
    for s in parts
  ]
  buckets = () if layout.padded else packing.DEFAULT_BUCKETS
  shape = packing.layout_shape(plans, dynamic=layout.num_micro is None, buckets=buckets)
  resp = packing.response_arrays(responses, logprobs, np.asarray(advantages), max_response_length)
  batches = []
  for s, plan in zip(parts, plans, strict=True):
    arrays = packing.pack_tokens(
      plan,
      shape,
      prompts[s],
      responses[s],
      response_len=max_response_length,
      pad_id=pad_id,
      shards=shards,
    )
    for key, value in resp.items():
      arrays[key] = packing.to_slots(plan, shape, value[s], shards=shards)
    rows = np.arange(len(plan.lengths), dtype=np.int32)
    arrays["seq_index"] = packing.to_slots(plan, shape, rows, shards=shards, fill=-1)
    arrays["seq_mask"] = (arrays["seq_index"] >= 0).astype(np.float32)
    batches.append(arrays)
  return PackedRollouts(batches=batches, plans=plans, shape=shape)


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
  packed = pack_rollouts(
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
  _log_shape(packed.shape, packed.plans, rc.rl.max_response_length)
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


def abstract_batch(shape: packing.Shape, response_len: int, *, with_ref: bool = False
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


def _log_shape(shape: packing.Shape, plans, response_len: int) -> None:
  """Logs the bucketed layout; a shape not seen before means the jitted steps compile."""
  key = (shape.num_micro, shape.num_shards, shape.rows, shape.slots, shape.row_len, response_len)
  useful = np.mean([packing.useful_fraction(p, shape) for p in plans])
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


def rows_from_slots(seq_index: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The response layout y [NM, W, E, ...] -> per-sequence rows [M, ...]; seq_index
  int[NM, W, E] (-1 = empty) says each slot's row (`packing.from_slots` without the plan)."""
  seq_index, y = np.asarray(seq_index), np.asarray(y)
  used = seq_index >= 0
  out = np.zeros((int(used.sum()),) + y.shape[seq_index.ndim :], y.dtype)
  out[seq_index[used]] = y[used]
  return out


def response_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
  """The response token ids [NM, W, E, T] of a batch (token_index points one before)."""
  ids = np.asarray(batch["input_ids"])
  flat = ids.reshape(ids.shape[:2] + (-1,))
  nxt = np.minimum(np.asarray(batch["token_index"]) + 1, flat.shape[-1] - 1)
  got = np.take_along_axis(flat[:, :, None, :], nxt.reshape(nxt.shape[:3] + (-1,)), axis=-1)
  return np.where(np.asarray(batch["response_mask"]) > 0, got, 0)


def dump_rows(dumps: Sequence[dict[str, np.ndarray]], batches: Sequence[steps.Batch]):
  """Influence dumps (one per update: epochs x mini-batches) and the mini-batches, on the
  host -> [M, T] rows: (dumps, per mini-batch {response_mask, advantages, response_ids});
  update u belongs to mini-batch u % num_mini."""
  rows = lambda b, x: rows_from_slots(np.asarray(b.seq_index), np.asarray(x))
  out = [{k: rows(batches[i % len(batches)], v) for k, v in d.items()} for i, d in enumerate(dumps)]
  fields = []
  for b in batches:
    ids = response_ids({k: np.asarray(getattr(b, k))
                        for k in ("input_ids", "token_index", "response_mask")})
    fields.append({"response_mask": rows(b, b.response_mask),
                   "advantages": rows(b, b.advantages), "response_ids": rows(b, ids)})
  return out, fields
