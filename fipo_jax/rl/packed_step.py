"""The trainer's jitted steps on the packed layout (`rl.use_remove_padding`, rl/packing.py).

  log_prob_step(graphdef, params, batch, *, cfg)              -> (log_prob, entropy) [NM, W, E, T]
  train_step(graphdef, params, opt_state, batch, *, cfg, tx)  -> (params, opt_state, metrics)
  influence_step(graphdef, params, batch, *, cfg)        -> {FIPO weights, log-ratio [NM, W, E, T]}

The model runs on packed rows [W * R, S] of micro-batch j; its next-token log-probs are
gathered back to the response layout [W * E, T] (`models.packed_response_log_probs`), where the
actor objective is the padded path's own (`train_step.actor_objective`): future-KL, the clip
modes, sequence drop and aggregation see the same [B, T] tensors, only with empty slots
(response mask 0, left out by every masked reduction).

Micro-batch loss scale (docs/fipo_spec.md §2.9). verl's dp_actor multiplies each micro-batch's
loss by `loss_scale_factor` before backward: `response_mask.shape[0] / ppo_mini_batch_size`
(sequences in the micro-batch / sequences in the mini-batch) with use_dynamic_bsz, and
`1 / gradient_accumulation` without it. This step always uses the first rule, with the
sequences counted from `seq_mask`: for equal micro-batches (fixed mode) it *is* the second rule
(n / (NM n) = 1 / NM), and with token-budget micro-batches (dynamic mode) it is verl's, so one
rule covers both and padding micro-batches (no sequence) weigh 0. Because each micro-batch's
loss is its own token mean, the objective is a sequence-weighted average of per-micro-batch
token means, as in verl. Our micro-batch spans every batch shard (one SPMD program), so its
token mean is over the micro-batch's sequences on all devices, where verl takes one per rank
and averages the ranks' gradients; the padded path makes the same choice.

Metrics are averaged over the micro-batches that hold sequences (verl appends one entry per
micro-batch and averages); a padding micro-batch (dynamic mode rounds NM up to a bucket) runs
neither forward nor backward (`lax.cond`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.algo import aggregation
from fipo_jax.rl import packing
from fipo_jax.rl import train_step as ts


@flax.struct.dataclass
class PackedBatch:
  """One mini-batch on the packed layout (rl/packing.py): NM micro-batches, W batch shards."""

  input_ids: jax.Array  # int32[NM, W, R, S]
  segment_ids: jax.Array  # int32[NM, W, R, S], 1, 2, ... per sequence in a row, 0 = padding
  positions: jax.Array  # int32[NM, W, R, S], each token's position in its own sequence
  token_index: jax.Array  # int32[NM, W, E, T], response token -> shard's flat [R * S] index
  response_mask: jax.Array  # f32[NM, W, E, T]
  old_log_probs: jax.Array  # f32[NM, W, E, T]
  advantages: jax.Array  # f32[NM, W, E, T]
  seq_mask: jax.Array  # f32[NM, W, E], 1 = the slot holds a sequence
  seq_index: jax.Array  # int32[NM, W, E], the slot's row in the mini-batch, -1 = empty
  ref_log_probs: jax.Array | None = None  # f32[NM, W, E, T], only with a KL term
  rollout_is_weights: jax.Array | None = None  # f32[NM, W, E, T], only with rl.rollout_is


@dataclasses.dataclass(frozen=True)
class _Responses:
  """The response-layout fields `ts.actor_objective` reads, as [W * E, T] rows."""

  old_log_probs: jax.Array
  advantages: jax.Array
  response_mask: jax.Array
  ref_log_probs: jax.Array | None
  rollout_is_weights: jax.Array | None = None


def _rows(x):
  """[W, E, ...] -> [W * E, ...] (None stays None)."""
  return None if x is None else x.reshape((-1,) + x.shape[2:])


def _log_probs(graphdef, params, micro: PackedBatch, *, cfg: ts.UpdateConfig, entropy: bool):
  """Response log-probs [W, E, T] (, entropy) of one micro-batch."""
  return models.packed_response_log_probs(
    nnx.merge(graphdef, params),
    micro.input_ids,
    micro.segment_ids,
    micro.positions,
    micro.token_index,
    temperature=cfg.temperature,
    chunk_size=cfg.logprob_chunk_size,
    return_entropy=entropy,
  )


def _row_count_fix(loss, metrics, micro: PackedBatch, *, cfg: ts.UpdateConfig):
  """'seq-mean-token-sum' averages over all B rows; empty slots are not sequences."""
  if cfg.policy_loss.loss_agg_mode != "seq-mean-token-sum":
    return loss, metrics
  slots = micro.seq_mask.size
  fix = slots / jnp.maximum(jnp.sum(micro.seq_mask), 1.0)
  fixed = {k: v * fix for k, v in metrics.items() if k in ("actor/pg_loss", "actor/kl_loss")}
  return loss * fix, {**metrics, **fixed}


def micro_batch_loss(params, graphdef, micro: PackedBatch, mini_seqs, *, cfg: ts.UpdateConfig):
  """Actor loss of one packed micro-batch scaled by its sequences / the mini-batch's."""
  if cfg.use_kl_loss and micro.ref_log_probs is None:
    raise ValueError("use_kl_loss needs batch.ref_log_probs (the reference log-probs)")
  need_entropy = cfg.entropy_coeff != 0.0
  out = _log_probs(graphdef, params, micro, cfg=cfg, entropy=need_entropy)
  log_prob, ent = out if need_entropy else (out, None)
  view = _Responses(
    _rows(micro.old_log_probs),
    _rows(micro.advantages),
    _rows(micro.response_mask),
    _rows(micro.ref_log_probs),
    _rows(micro.rollout_is_weights),
  )
  loss, metrics = ts.actor_objective(_rows(log_prob), _rows(ent), view, cfg=cfg)
  loss, metrics = _row_count_fix(loss, metrics, micro, cfg=cfg)
  scale = jnp.sum(micro.seq_mask) / mini_seqs  # verl's dynamic-batch rule
  return loss * scale, aggregation.scale_loss_metrics(metrics, scale)


def _zeros_like_shapes(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def accumulate_gradients(graphdef, params, batch: PackedBatch, *, cfg: ts.UpdateConfig):
  """Summed gradients, loss and micro-batch-averaged metrics of one packed mini-batch."""
  mini_seqs = jnp.maximum(jnp.sum(batch.seq_mask), 1.0)
  grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)
  run = lambda micro: grad_fn(params, graphdef, micro, mini_seqs, cfg=cfg)

  def accumulate(grads, micro):
    present = jnp.any(micro.seq_mask > 0)
    skip = lambda m: _zeros_like_shapes(jax.eval_shape(run, m))
    (loss, metrics), g = jax.lax.cond(present, run, skip, micro)
    return jax.tree.map(jnp.add, grads, g), (loss, metrics, present.astype(jnp.float32))

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, metrics, present) = jax.lax.scan(accumulate, zeros, batch)
  count = jnp.maximum(jnp.sum(present), 1.0)
  metrics = jax.tree.map(lambda m: jnp.sum(m * present) / count, metrics)
  return grads, jnp.sum(losses), metrics


def train_step(graphdef, params, opt_state, batch: PackedBatch, *, cfg: ts.UpdateConfig, tx):
  """One optimizer step on one packed mini-batch (see the module docstring for the scaling)."""
  grads, loss, metrics = accumulate_gradients(graphdef, params, batch, cfg=cfg)
  return ts.apply_gradients(params, opt_state, grads, loss, metrics, tx=tx)


def _per_micro(fn, batch: PackedBatch, out_shapes):
  """lax.map of fn over micro-batches; those without a sequence give zeros without running."""

  def one(micro):
    zeros = lambda _: _zeros_like_shapes(out_shapes)
    return jax.lax.cond(jnp.any(micro.seq_mask > 0), fn, zeros, micro)

  return jax.lax.map(one, batch)


def log_prob_step(graphdef, params, batch: PackedBatch, *, cfg: ts.UpdateConfig):
  """Old (or reference) log-probs and entropy f32[NM, W, E, T] in the batch's response layout."""
  shape = jax.ShapeDtypeStruct(batch.response_mask.shape[1:], jnp.float32)
  fn = functools.partial(_log_probs, graphdef, params, cfg=cfg, entropy=True)
  return _per_micro(fn, batch, (shape, shape))


def influence_step(graphdef, params, batch: PackedBatch, *, cfg: ts.UpdateConfig):
  """Per-token FIPO weights and log-ratio [NM, W, E, T] with the current params (for dumps)."""
  keys = ts.INFLUENCE_KEYS

  def one(micro):
    log_prob = _rows(_log_probs(graphdef, params, micro, cfg=cfg, entropy=False))
    terms = ts.influence_terms(
      log_prob,
      _rows(micro.old_log_probs),
      _rows(micro.advantages),
      _rows(micro.response_mask),
      cfg,
    )
    return {k: terms[k].reshape(micro.response_mask.shape) for k in keys}

  shape = jax.ShapeDtypeStruct(batch.response_mask.shape[1:], jnp.float32)
  return _per_micro(one, batch, dict.fromkeys(keys, shape))


def jit_steps(
  graphdef, *, cfg: ts.UpdateConfig, tx, param_sharding=None, opt_sharding=None
) -> ts.CompiledSteps:
  """The packed steps jitted as `train_step.jit_steps` does (donation, pinned state layout)."""
  mesh = ts._mesh_of(param_sharding)  # noqa: SLF001 -- the padded steps' own helpers
  under = functools.partial(ts._under_mesh, mesh)  # noqa: SLF001
  train = jax.jit(
    under(functools.partial(train_step, graphdef, cfg=cfg, tx=tx)),
    out_shardings=(param_sharding, opt_sharding, None),
    donate_argnums=(0, 1),
  )
  # Pinned like the batch (shards on axis 1), never left replicated by the compiler.
  shards = None if mesh is None else jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(None, sharding.mesh_axes("batch")))
  log_prob = jax.jit(under(functools.partial(log_prob_step, graphdef, cfg=cfg)),
                     out_shardings=shards)
  return ts.CompiledSteps(train=train, log_prob=log_prob)


def abstract_batch(shape: Any, response_len: int, *, with_ref: bool = False) -> PackedBatch:
  """ShapeDtypeStructs of a PackedBatch of packing.Shape `shape` (for eval_shape and AOT)."""
  sds = jax.ShapeDtypeStruct
  tokens = (shape.num_micro, shape.num_shards, shape.rows, shape.row_len)
  resp = (shape.num_micro, shape.num_shards, shape.slots, response_len)
  i32 = lambda s: sds(s, jnp.int32)
  f32 = lambda s: sds(s, jnp.float32)
  return PackedBatch(
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


def num_batch_shards(mesh) -> int:
  """W: the devices a batch is split over (the mesh axes of the 'batch' rule)."""
  return int(np.prod([mesh.shape[a] for a in sharding.mesh_axes("batch") if a in mesh.shape]))


def layout(rc, mesh, update_cfg: ts.UpdateConfig) -> dict[str, Any]:
  """The packer's settings for a run: row length, micro-batch mode, batch shards.

  With rl.use_dynamic_bsz a row is rl.ppo_max_token_len_per_device real tokens (verl's token
  budget per device per micro-batch) and micro-batches follow the budget; without it, rows of
  the longest allowed sequence hold the padded path's fixed micro-batches.
  """
  longest = rc.data.max_prompt_length + rc.rl.max_response_length
  dynamic = rc.rl.use_dynamic_bsz
  return dict(
    row_len=rc.rl.ppo_max_token_len_per_device if dynamic else longest,
    num_micro=None if dynamic else update_cfg.num_micro_batches,
    num_shards=num_batch_shards(mesh),
  )


_SEEN_SHAPES: set[tuple] = set()


def _log_shape(shape: packing.Shape, plans, response_len: int) -> None:
  """Logs the bucketed layout; a shape not seen before means the jitted steps compile."""
  key = (shape.num_micro, shape.num_shards, shape.rows, shape.slots, shape.row_len, response_len)
  useful = np.mean([packing.useful_fraction(p, shape) for p in plans])
  logging.info(
    "packing: %d mini-batches x %d micro-batches (%d used) x %d shards x %d rows x "
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
    logging.info("packing: new packed shape %s: the train and log-prob steps compile for it", key)


def mini_batches(
  rc, mesh, rollouts, advantages: np.ndarray, *, update_cfg: ts.UpdateConfig, pad_id: int
) -> tuple[list[PackedBatch], dict[str, np.ndarray]]:
  """[B] rollouts -> B / mini packed mini-batches on `mesh` (rollout._mini_batches' packed twin).

  Every host plans every mini-batch (the [B] rollouts are on every host) and fills only the
  batch shards its own devices hold. Returns (the mini-batches, this host's response-layout
  arrays of all of them, stacked: response_mask and advantages).
  """
  mini = rc.rl.ppo_mini_batch_size * rc.rl.n
  settings = layout(rc, mesh, update_cfg)
  d = settings["num_shards"]
  shards = sharding.process_rows(sharding.batch_sharding(mesh, 1, (d,)), d) or slice(0, d)
  packed = packing.pack_rollouts(
    rollouts.prompt_ids,
    rollouts.response_ids,
    rollouts.response_logprobs,
    advantages,
    mini=mini,
    max_prompt_length=rc.data.max_prompt_length,
    max_response_length=rc.rl.max_response_length,
    pad_id=pad_id,
    shards=shards,
    **settings,
  )
  _log_shape(packed.shape, packed.plans, rc.rl.max_response_length)
  batches = [device_batch(mesh, arrays, d) for arrays in packed.batches]
  stacked = {k: np.stack([b[k] for b in packed.batches]) for k in ("response_mask", "advantages")}
  return batches, stacked


def device_batch(mesh, arrays: dict[str, np.ndarray], num_shards: int) -> PackedBatch:
  """Global [NM, W, ...] arrays from this process's shards (all shards also work)."""

  def put(x):
    shape = (x.shape[0], num_shards) + x.shape[2:]
    spec = sharding.named_sharding(mesh, (None, "batch") + (None,) * (x.ndim - 2), shape)
    return jax.make_array_from_process_local_data(spec, x, shape)

  return PackedBatch(**{k: put(v) for k, v in arrays.items()})


def dump_rows(dumps: list[dict[str, np.ndarray]], batches: list[PackedBatch]):
  """Packed influence dumps (one per update: epochs x mini-batches) and the mini-batches, on
  the host -> [M, T] rows, as the padded dump has them: (dumps, per mini-batch
  {response_mask, advantages, response_ids})."""
  rows = lambda b, x: packing.rows_from_slots(np.asarray(b.seq_index), np.asarray(x))
  out = [{k: rows(batches[i % len(batches)], v) for k, v in d.items()} for i, d in enumerate(dumps)]
  fields = []
  for b in batches:
    ids = packing.response_ids(
      {k: np.asarray(getattr(b, k)) for k in ("input_ids", "token_index", "response_mask")}
    )
    fields.append(
      {
        "response_mask": rows(b, b.response_mask),
        "advantages": rows(b, b.advantages),
        "response_ids": rows(b, ids),
      }
    )
  return out, fields
