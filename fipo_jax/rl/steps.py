"""The trainer's jitted steps, one set for every batch layout (rl/layouts.py, rl/packing.py).

  log_prob_step(graphdef, params, batch, *, cfg)              -> (log_prob, entropy) [NM, W, E, T]
  train_step(graphdef, params, opt_state, batch, *, cfg, tx)  -> (params, opt_state, metrics)
  influence_step(graphdef, params, batch, *, cfg)        -> {FIPO weights, log-ratio [NM, W, E, T]}
  sft_step(graphdef, params, opt_state, batch, *, cfg, tx)    -> (params, opt_state, metrics)

and `jit_steps` compiles them once at the entry point with explicit shardings and donation.

A `Batch` is one mini-batch of NM micro-batches over W batch shards. The model runs on rows
[W * R, S] of micro-batch j, each row holding one or more sequences told apart by segment ids;
its next-token log-probs are gathered back to the response layout [W * E, T]
(`models.packed_response_log_probs`), where future-KL, the clip modes, sequence drop and
aggregation see [B, T] tensors as the official code does, only with empty slots (response mask
0, left out by every masked reduction). The padded layout (rl.use_remove_padding=False) is the
same batch with one sequence per row: the prompt left-padded to P, the response right-padded
to T, E = R; the packer plans it (`packing.plan_padded`), these steps run it.

Micro-batch loss scale (docs/fipo_spec.md §2.9). verl's dp_actor multiplies each micro-batch's
loss by `loss_scale_factor` before backward: `response_mask.shape[0] / ppo_mini_batch_size`
(sequences in the micro-batch / sequences in the mini-batch) with use_dynamic_bsz, and
`1 / gradient_accumulation` without it. This step always uses the first rule, with the
sequences counted from `seq_mask`: for equal micro-batches (fixed mode, and the padded layout,
whose micro-batch j is rows j, j + NM, ... of the mini-batch as verl splits it) it *is* the
second rule (n / (NM n) = 1 / NM, the same float), and with token-budget micro-batches (dynamic
mode) it is verl's, so one rule covers both and padding micro-batches (no sequence) weigh 0.
Each micro-batch's loss is its own token mean, so the objective is a sequence-weighted average
of per-micro-batch token means, as in verl. Our micro-batch spans every batch shard (one SPMD
program), so its token mean is over the micro-batch's sequences on all devices, where verl
takes one per rank and averages the ranks' gradients.

Metrics are averaged over the micro-batches that hold sequences (verl appends one entry per
micro-batch and averages); a padding micro-batch (dynamic mode rounds NM up to a bucket) runs
neither forward nor backward (`lax.cond`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fipo_jax import models, sharding
from fipo_jax.algo import aggregation
from fipo_jax.algo import losses as losses_lib


@flax.struct.dataclass
class Batch:
  """One mini-batch: NM micro-batches, W batch shards, R rows of S tokens, E sequence slots."""

  input_ids: jax.Array  # int32[NM, W, R, S]
  segment_ids: jax.Array  # int32[NM, W, R, S], 1, 2, ... per sequence in a row, 0 = padding
  positions: jax.Array  # int32[NM, W, R, S], each token's position in its own sequence
  token_index: jax.Array  # int32[NM, W, E, T], response token -> shard's flat [R * S] index
  response_mask: jax.Array  # f32[NM, W, E, T], 1 = response token
  old_log_probs: jax.Array  # f32[NM, W, E, T]
  advantages: jax.Array  # f32[NM, W, E, T], per-sequence advantage broadcast and masked
  seq_mask: jax.Array  # f32[NM, W, E], 1 = the slot holds a sequence
  seq_index: jax.Array  # int32[NM, W, E], the slot's row in the mini-batch, -1 = empty
  ref_log_probs: jax.Array | None = None  # f32[NM, W, E, T], only with a KL term
  rollout_is_weights: jax.Array | None = None  # f32[NM, W, E, T], only with rl.rollout_is


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Static hyper-parameters of the jitted update (hashable, so jit can key on it)."""

  loss_mode: str = "fipo"  # a registered policy loss (algo.losses)
  policy_loss: losses_lib.PolicyLossConfig = losses_lib.PolicyLossConfig()
  num_micro_batches: int = 1
  temperature: float = 1.0  # verl's actor divides logits by the rollout temperature
  logprob_chunk_size: int = 512  # response tokens per log-softmax chunk
  entropy_coeff: float = 0.0
  use_kl_loss: bool = False  # KL to the reference policy: batches carry ref_log_probs
  kl_loss_coef: float = 0.0
  kl_loss_type: str = "low_var_kl"  # one of algo.losses.KL_TYPES

  def __post_init__(self):
    losses_lib.get_policy_loss(self.loss_mode)  # raises on an unknown name
    if self.kl_loss_type not in losses_lib.KL_TYPES:
      raise ValueError(f"kl_loss_type {self.kl_loss_type!r} not in {losses_lib.KL_TYPES}")


@flax.struct.dataclass
class Responses:
  """The response-layout fields `actor_objective` reads, each [B, T] (None: absent)."""

  old_log_probs: jax.Array
  advantages: jax.Array
  response_mask: jax.Array
  ref_log_probs: jax.Array | None = None
  rollout_is_weights: jax.Array | None = None


def _rows(x):
  """[W, E, ...] -> [W * E, ...] (None stays None)."""
  return None if x is None else x.reshape((-1,) + x.shape[2:])


def responses(micro: Batch) -> Responses:
  """One micro-batch's response fields as [W * E, T] rows."""
  return Responses(
    _rows(micro.old_log_probs),
    _rows(micro.advantages),
    _rows(micro.response_mask),
    _rows(micro.ref_log_probs),
    _rows(micro.rollout_is_weights),
  )


def _log_probs(graphdef, params, micro: Batch, *, cfg: UpdateConfig, entropy: bool):
  """Response log-probs f32[W, E, T] (, entropy) of one micro-batch."""
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


def actor_objective(log_prob, ent, resp: Responses, *, cfg: UpdateConfig):
  """The unscaled actor loss of one micro-batch from its log-probs [B, T] (and entropy).

  verl's dp_actor: policy loss - entropy_coeff * entropy + kl_loss_coef * KL(pi || ref), the
  entropy and KL terms aggregated with the policy loss's loss_agg_mode. The rollout IS weights
  (None: off) multiply the per-token policy loss only. -> (loss, metrics).
  """
  loss_fn = losses_lib.get_policy_loss(cfg.loss_mode)
  loss, metrics = loss_fn(
    log_prob,
    resp.old_log_probs,
    resp.advantages,
    resp.response_mask,
    cfg.policy_loss,
    **losses_lib.weights_kwarg(resp.rollout_is_weights),
  )
  agg_mode = cfg.policy_loss.loss_agg_mode
  if cfg.entropy_coeff != 0.0:
    loss = loss - cfg.entropy_coeff * aggregation.agg_loss(ent, resp.response_mask, agg_mode)
  if cfg.use_kl_loss:
    kl = losses_lib.kl_loss(
      log_prob, resp.ref_log_probs, resp.response_mask, cfg.kl_loss_type, agg_mode
    )
    loss = loss + cfg.kl_loss_coef * kl
    metrics = {**metrics, "actor/kl_loss": kl, "actor/kl_coef": jnp.float32(cfg.kl_loss_coef)}
  return loss, metrics


def _row_count_fix(loss, metrics, micro: Batch, *, cfg: UpdateConfig):
  """'seq-mean-token-sum' averages over all B rows; empty slots are not sequences."""
  if cfg.policy_loss.loss_agg_mode != "seq-mean-token-sum":
    return loss, metrics
  slots = micro.seq_mask.size
  fix = slots / jnp.maximum(jnp.sum(micro.seq_mask), 1.0)
  fixed = {k: v * fix for k, v in metrics.items() if k in ("actor/pg_loss", "actor/kl_loss")}
  return loss * fix, {**metrics, **fixed}


def micro_batch_loss(params, graphdef, micro: Batch, mini_seqs, *, cfg: UpdateConfig):
  """Actor loss of one micro-batch scaled by its sequences / the mini-batch's `mini_seqs`,
  and its metrics, the logged pg/kl losses scaled alike (as verl's dp_actor logs them)."""
  if cfg.use_kl_loss and micro.ref_log_probs is None:
    raise ValueError("use_kl_loss needs batch.ref_log_probs (the reference log-probs)")
  need_entropy = cfg.entropy_coeff != 0.0
  out = _log_probs(graphdef, params, micro, cfg=cfg, entropy=need_entropy)
  log_prob, ent = out if need_entropy else (out, None)
  loss, metrics = actor_objective(_rows(log_prob), _rows(ent), responses(micro), cfg=cfg)
  loss, metrics = _row_count_fix(loss, metrics, micro, cfg=cfg)
  scale = jnp.sum(micro.seq_mask) / mini_seqs  # verl's dynamic-batch rule, see the docstring
  return loss * scale, aggregation.scale_loss_metrics(metrics, scale)


def _zeros_like_shapes(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def accumulate_gradients(graphdef, params, batch: Batch, *, cfg: UpdateConfig):
  """Summed gradients, loss and micro-batch-averaged metrics of one mini-batch."""
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


def train_step(graphdef, params, opt_state, batch: Batch, *, cfg: UpdateConfig, tx):
  """One optimizer step on one mini-batch, gradients accumulated over its micro-batches.

  A non-finite loss or gradient skips the update: params and optimizer state are returned
  unchanged and `train/skipped_step` is 1.
  """
  grads, loss, metrics = accumulate_gradients(graphdef, params, batch, cfg=cfg)
  return apply_gradients(params, opt_state, grads, loss, metrics, tx=tx)


def apply_gradients(params, opt_state, grads, loss, metrics, *, tx):
  """The optimizer step on accumulated gradients, skipped (state kept) when non-finite."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_params = jax.tree.map(keep, new_params, params)
  new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  metrics = {
    **metrics,
    "actor/loss": loss,
    "actor/grad_norm": grad_norm,
    "train/skipped_step": 1.0 - finite.astype(jnp.float32),
  }
  return new_params, new_opt_state, metrics


def _per_micro(fn, batch: Batch, out_shapes):
  """lax.map of fn over micro-batches; those without a sequence give zeros without running."""

  def one(micro):
    zeros = lambda _: _zeros_like_shapes(out_shapes)
    return jax.lax.cond(jnp.any(micro.seq_mask > 0), fn, zeros, micro)

  return jax.lax.map(one, batch)


def log_prob_step(graphdef, params, batch: Batch, *, cfg: UpdateConfig):
  """Old (or reference) log-probs and entropy f32[NM, W, E, T] in the batch's response layout."""
  shape = jax.ShapeDtypeStruct(batch.response_mask.shape[1:], jnp.float32)
  fn = functools.partial(_log_probs, graphdef, params, cfg=cfg, entropy=True)
  return _per_micro(fn, batch, (shape, shape))


def sft_step(graphdef, params, opt_state, batch: Batch, *, cfg: UpdateConfig, tx):
  """Supervised warm start: token-mean negative log-likelihood of all response tokens."""

  def loss_fn(p):
    fn = functools.partial(_log_probs, graphdef, p, cfg=cfg, entropy=False)
    log_prob = jax.lax.map(fn, batch)
    mask = batch.response_mask
    return -jnp.sum(log_prob * mask) / (jnp.sum(mask) + 1e-8)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"sft/loss": loss, "sft/grad_norm": optax.global_norm(grads)}


# What influence_step gives per token: FIPO's clipped and raw weights and the log-ratio
# log pi_theta - log pi_old (the official `negative_approx_kl`, 0 off the response mask).
INFLUENCE_KEYS = ("influence_weights", "raw_influence_weights", "log_ratio")


def influence_terms(log_prob, old_log_prob, advantages, response_mask, cfg: UpdateConfig):
  """INFLUENCE_KEYS -> f32[B, T] from the current log-probs [B, T]."""
  terms = losses_lib.fipo_terms(log_prob, old_log_prob, advantages, response_mask, cfg.policy_loss)
  terms["log_ratio"] = terms["negative_approx_kl"] * response_mask
  return {k: terms[k] for k in INFLUENCE_KEYS}


def influence_step(graphdef, params, batch: Batch, *, cfg: UpdateConfig):
  """Per-token FIPO weights and log-ratio f32[NM, W, E, T] with the current params (dumps)."""

  def one(micro):
    log_prob = _rows(_log_probs(graphdef, params, micro, cfg=cfg, entropy=False))
    terms = influence_terms(
      log_prob, _rows(micro.old_log_probs), _rows(micro.advantages), _rows(micro.response_mask), cfg
    )
    return {k: terms[k].reshape(micro.response_mask.shape) for k in INFLUENCE_KEYS}

  shape = jax.ShapeDtypeStruct(batch.response_mask.shape[1:], jnp.float32)
  return _per_micro(one, batch, dict.fromkeys(INFLUENCE_KEYS, shape))


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """The jitted entry points, bound to one model graph, optimizer and update config."""

  train: Any
  log_prob: Any


def _mesh_of(shardings):
  """The mesh of the first NamedSharding in a pytree of shardings (None if there is none)."""
  for s in jax.tree.leaves(shardings):
    if isinstance(s, jax.sharding.NamedSharding):
      return s.mesh
  return None


def under_mesh(mesh, fn):
  """fn traced with `mesh` as the ambient mesh, so the model's activation sharding constraints
  (sharding.constrain) and the splash kernel's shard_map see it."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  # wraps() copies no name from a functools.partial: name the step itself, so that profiles
  # and HLO dumps say jit_train_step, not jit_wrapped.
  wrapped.__name__ = wrapped.__qualname__ = getattr(fn, "func", fn).__name__
  return wrapped


def jit_steps(
  graphdef, *, cfg: UpdateConfig, tx, param_sharding=None, opt_sharding=None
) -> CompiledSteps:
  """jit the steps once, donating params and optimizer state.

  Input shardings come from the arguments (params are created in their shards, batches are put
  with shards on axis 1 by `layouts.device_batch`); the updated state is pinned to its input
  sharding so that step t+1 sees exactly the layout of step t and never recompiles.
  """
  mesh = _mesh_of(param_sharding)
  train = jax.jit(
    under_mesh(mesh, functools.partial(train_step, graphdef, cfg=cfg, tx=tx)),
    out_shardings=(param_sharding, opt_sharding, None),
    donate_argnums=(0, 1),
  )
  # Pinned like the batch (shards on axis 1), never left replicated by the compiler.
  shards = (
    None
    if mesh is None
    else jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding.mesh_axes("batch"))
    )
  )
  log_prob = jax.jit(
    under_mesh(mesh, functools.partial(log_prob_step, graphdef, cfg=cfg)), out_shardings=shards
  )
  return CompiledSteps(train=train, log_prob=log_prob)
