"""The jitted steps of the trainer: old/reference log-probs, one mini-batch update, SFT.

Every step is a pure module-level function of plain pytrees:

  log_prob_step(graphdef, params, batch, *, cfg)              -> (log_prob[B, T], entropy[B, T])
  train_step(graphdef, params, opt_state, batch, *, cfg, tx)  -> (params, opt_state, metrics)
  sft_step(graphdef, params, opt_state, batch, *, tx, ...)    -> (params, opt_state, metrics)
  influence_step(graphdef, params, batch, *, cfg)             -> {FIPO weights, log-ratio [B, T]}

and `jit_steps` compiles them once at the entry point with explicit shardings and donation.

Micro-batching follows verl without dynamic batch size: a mini-batch of M sequences is split into
`num_micro_batches` equal micro-batches, each micro-batch loss is the loss function's own
aggregation (token-mean over the micro-batch for FIPO/DAPO) scaled by 1/num_micro_batches, and the
gradients are summed before one optimizer step (docs/fipo_spec.md §2.9).
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
class PolicyBatch:
  """One batch of rollouts, prompt and response concatenated (S = P + T).

  Prompts are left-padded to P, responses right-padded to T.
  """

  input_ids: jax.Array  # int32[B, S], S = P + T
  attention_mask: jax.Array  # int32[B, S], 1 = real token
  positions: jax.Array  # int32[B, S]
  response_mask: jax.Array  # f32[B, T], 1 = response token
  old_log_probs: jax.Array  # f32[B, T]
  advantages: jax.Array  # f32[B, T], per-sequence advantage broadcast and masked
  ref_log_probs: jax.Array | None = None  # f32[B, T], only with a KL term
  rollout_is_weights: jax.Array | None = None  # f32[B, T], only with rl.rollout_is


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


def split_micro_batches(tree: Any, num_micro: int) -> Any:
  """[M, ...] -> [num_micro, M // num_micro, ...], micro-batch j = rows j, j+n, j+2n, ...

  Strided rather than contiguous, so that every device's shard of a batch-sharded array
  contributes equally to every micro-batch.
  """

  def split(x):
    if x is None:
      return None
    m = x.shape[0] // num_micro
    return jnp.swapaxes(x.reshape((m, num_micro) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, tree)


def _response_log_probs(graphdef, params, micro: PolicyBatch, *, cfg: UpdateConfig, entropy: bool):
  model = nnx.merge(graphdef, params)
  return models.sequence_log_probs(
    model,
    micro.input_ids,
    micro.attention_mask,
    micro.positions,
    num_response_tokens=micro.response_mask.shape[1],
    temperature=cfg.temperature,
    chunk_size=cfg.logprob_chunk_size,
    return_entropy=entropy,
  )


def _masked_token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / (jnp.sum(mask) + 1e-8)


def micro_batch_loss(params, graphdef, micro: PolicyBatch, *, cfg: UpdateConfig):
  """Actor loss of one micro-batch and its metrics; the loss and the logged pg/kl losses scaled
  by 1/num_micro_batches, as verl does. -> (loss, metrics).

  verl's dp_actor: policy loss - entropy_coeff * entropy + kl_loss_coef * KL(pi || ref), the
  entropy and KL terms aggregated with the policy loss's loss_agg_mode.
  """
  if cfg.use_kl_loss and micro.ref_log_probs is None:
    raise ValueError("use_kl_loss needs batch.ref_log_probs (the reference log-probs)")
  need_entropy = cfg.entropy_coeff != 0.0
  out = _response_log_probs(graphdef, params, micro, cfg=cfg, entropy=need_entropy)
  log_prob, ent = out if need_entropy else (out, None)
  loss, metrics = actor_objective(log_prob, ent, micro, cfg=cfg)
  scale = 1.0 / cfg.num_micro_batches  # verl: 1 / gradient_accumulation
  return loss * scale, aggregation.scale_loss_metrics(metrics, scale)


def actor_objective(log_prob, ent, micro, *, cfg: UpdateConfig):
  """The unscaled actor loss of one micro-batch from its log-probs [B, T] (and entropy).

  `micro` holds the response-layout fields old_log_probs, advantages, response_mask,
  ref_log_probs and rollout_is_weights ([B, T]); both the padded and the packed train steps
  call this. The rollout IS weights (None: off) multiply the per-token policy loss only.
  """
  need_entropy = cfg.entropy_coeff != 0.0
  loss_fn = losses_lib.get_policy_loss(cfg.loss_mode)
  loss, metrics = loss_fn(log_prob, micro.old_log_probs, micro.advantages, micro.response_mask,
                          cfg.policy_loss, **losses_lib.weights_kwarg(micro.rollout_is_weights))
  agg_mode = cfg.policy_loss.loss_agg_mode
  if need_entropy:
    loss = loss - cfg.entropy_coeff * aggregation.agg_loss(ent, micro.response_mask, agg_mode)
  if cfg.use_kl_loss:
    kl = losses_lib.kl_loss(log_prob, micro.ref_log_probs, micro.response_mask,
                            cfg.kl_loss_type, agg_mode)
    loss = loss + cfg.kl_loss_coef * kl
    metrics = {**metrics, "actor/kl_loss": kl, "actor/kl_coef": jnp.float32(cfg.kl_loss_coef)}
  return loss, metrics


def train_step(graphdef, params, opt_state, batch: PolicyBatch, *, cfg: UpdateConfig, tx):
  """One optimizer step on one mini-batch [M, ...] with gradient accumulation over micro-batches.

  A non-finite loss or gradient skips the update: params and optimizer state are returned
  unchanged and `train/skipped_step` is 1.
  """
  micro_batches = split_micro_batches(batch, cfg.num_micro_batches)
  grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

  def accumulate(grads, micro):
    (loss, metrics), g = grad_fn(params, graphdef, micro, cfg=cfg)
    return jax.tree.map(jnp.add, grads, g), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, micro_batches)
  # verl averages each metric over micro-batches; the loss is the sum of the scaled parts.
  return apply_gradients(params, opt_state, grads, jnp.sum(losses),
                         jax.tree.map(jnp.mean, metrics), tx=tx)


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


def log_prob_step(graphdef, params, batch: PolicyBatch, *, cfg: UpdateConfig):
  """Old (or reference) log-probs and entropy of the responses, micro-batch by micro-batch.

  Returns (log_prob f32[B, T], entropy f32[B, T]).
  """
  micro_batches = split_micro_batches(batch, cfg.num_micro_batches)
  fn = functools.partial(_response_log_probs, graphdef, params, cfg=cfg, entropy=True)
  log_prob, ent = jax.lax.map(fn, micro_batches)
  unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  return unsplit(log_prob), unsplit(ent)


def sft_step(graphdef, params, opt_state, batch: PolicyBatch, *, cfg: UpdateConfig, tx):
  """Supervised warm start: token-mean negative log-likelihood of the response tokens."""

  def loss_fn(p):
    log_prob = _response_log_probs(graphdef, p, batch, cfg=cfg, entropy=False)
    return -_masked_token_mean(log_prob, batch.response_mask)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"sft/loss": loss, "sft/grad_norm": optax.global_norm(grads)}


# What influence_step gives per token: FIPO's clipped and raw weights and the log-ratio
# log pi_theta - log pi_old (the official `negative_approx_kl`, 0 off the response mask).
INFLUENCE_KEYS = ("influence_weights", "raw_influence_weights", "log_ratio")


def influence_terms(log_prob, old_log_prob, advantages, response_mask, cfg: UpdateConfig):
  """INFLUENCE_KEYS -> f32[B, T] from the current log-probs [B, T] (both layouts use it)."""
  terms = losses_lib.fipo_terms(log_prob, old_log_prob, advantages, response_mask,
                                cfg.policy_loss)
  terms["log_ratio"] = terms["negative_approx_kl"] * response_mask
  return {k: terms[k] for k in INFLUENCE_KEYS}


def influence_step(graphdef, params, batch: PolicyBatch, *, cfg: UpdateConfig):
  """Per-token FIPO weights and log-ratio [M, T] with the current params (for dumps)."""
  log_prob = _response_log_probs(graphdef, params, batch, cfg=cfg, entropy=False)
  return influence_terms(log_prob, batch.old_log_probs, batch.advantages, batch.response_mask,
                         cfg)


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


def _under_mesh(mesh, fn):
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


def jit_steps(graphdef, *, cfg: UpdateConfig, tx, param_sharding=None, opt_sharding=None
              ) -> CompiledSteps:
  """jit the steps once, donating params and optimizer state.

  Input shardings come from the arguments (params are created in their shards, batches are put
  with `sharding.batch_sharding`); the updated state is pinned to its input sharding so that
  step t+1 sees exactly the layout of step t and never recompiles. None leaves stay unspecified.
  """
  state_outs = (param_sharding, opt_sharding, None)
  mesh = _mesh_of(param_sharding)
  train = jax.jit(
    _under_mesh(mesh, functools.partial(train_step, graphdef, cfg=cfg, tx=tx)),
    out_shardings=state_outs,
    donate_argnums=(0, 1),
  )
  # Pinned like the batch (rows over the batch axes), never left replicated by the compiler.
  rows = None if mesh is None else jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(sharding.mesh_axes("batch")))
  log_prob = jax.jit(_under_mesh(mesh, functools.partial(log_prob_step, graphdef, cfg=cfg)),
                     out_shardings=rows)
  return CompiledSteps(train=train, log_prob=log_prob)
