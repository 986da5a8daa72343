"""The padded layout in tests: rollouts -> a `steps.Batch` of one sequence per row, rows <-> slots,
and an independent padded reference (the oracle) for the steps.

The trainer has one set of steps (fipo_jax/rl/steps.py) for every layout. The oracle here is
written the plain way instead: [M, P + T] rows with an attention mask through
`models.sequence_log_probs`, verl's strided micro-batches (micro-batch j = rows j, j + NM, ...),
each micro-batch loss scaled by 1 / NM. Tests pin both layouts of the steps to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipo_jax import models
from fipo_jax.rl import packing, rollout_dump, steps


def batch(
  prompts,
  responses,
  advantages,
  *,
  p: int,
  t: int,
  num_micro: int = 1,
  num_shards: int = 1,
  logprobs=None,
  **rows,
) -> steps.Batch:
  """A steps.Batch of the padded layout from M prompts and responses (id lists); `rows` are
  more response-layout fields as [M, T] (old_log_probs, ref_log_probs, ...)."""
  if logprobs is None:
    logprobs = [np.zeros(len(r), np.float32) for r in responses]
  out = packing.pack_rollouts(
    prompts,
    responses,
    logprobs,
    np.asarray(advantages, np.float32),
    mini=len(prompts),
    max_prompt_length=p,
    max_response_length=t,
    pad_id=0,
    layout=packing.Layout(p + t, num_micro, num_shards, padded=True),
  )
  b = steps.Batch(**{k: jnp.asarray(v) for k, v in out.batches[0].items()})
  return b.replace(**{k: slots(b, v) for k, v in rows.items()})


def rows_of(b: steps.Batch, x) -> np.ndarray:
  """The response layout x [NM, W, E, ...] of batch b -> rows [M, ...] in mini-batch order."""
  return rollout_dump.rows_from_slots(np.asarray(b.seq_index), np.asarray(x))


def slots(b: steps.Batch, x) -> jax.Array:
  """Rows x [M, ...] -> the response layout [NM, W, E, ...] of batch b (empty slots 0)."""
  index = np.asarray(b.seq_index)
  x = np.asarray(x)
  out = np.where((index >= 0).reshape(index.shape + (1,) * (x.ndim - 1)), x[index], 0)
  return jnp.asarray(out.astype(x.dtype))


def pad_rows(prompts, responses, *, p: int, t: int, pad_id: int = 0):
  """Oracle rows: prompts left-padded to P, responses right-padded to T ->
  (input_ids, attention_mask, positions) int32[M, P + T], response_mask f32[M, T]."""
  m = len(prompts)
  ids = np.full((m, p + t), pad_id, np.int32)
  attn = np.zeros((m, p + t), np.int32)
  mask = np.zeros((m, t), np.float32)
  for i, (pid, rid) in enumerate(zip(prompts, responses, strict=True)):
    pid, rid = np.asarray(pid, np.int32)[-p:], np.asarray(rid, np.int32)[:t]
    ids[i, p - len(pid) : p + len(rid)] = np.concatenate([pid, rid])
    attn[i, p - len(pid) : p + len(rid)] = 1
    mask[i, : len(rid)] = 1.0
  positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
  return ids, attn, positions, mask


def log_probs(graphdef, params, tokens, *, t: int, cfg: steps.UpdateConfig, entropy=True):
  """Oracle response log-probs (, entropy) f32[M, T] of `tokens` = (ids, attention, positions)."""
  ids, attn, pos = tokens
  return models.sequence_log_probs(
    nnx.merge(graphdef, params),
    ids,
    attn,
    pos,
    num_response_tokens=t,
    temperature=cfg.temperature,
    chunk_size=cfg.logprob_chunk_size,
    return_entropy=entropy,
  )


def micro_loss(
  params,
  graphdef,
  tokens,
  resp: steps.Responses,
  *,
  t: int,
  cfg: steps.UpdateConfig,
  scale: float = 1.0,
):
  """Oracle loss of one micro-batch of rows, times `scale` (logged losses alike)."""
  need_entropy = cfg.entropy_coeff != 0.0
  out = log_probs(graphdef, params, tokens, t=t, cfg=cfg, entropy=need_entropy)
  log_prob, ent = out if need_entropy else (out, None)
  loss, metrics = steps.actor_objective(log_prob, ent, resp, cfg=cfg)
  scaled = ("actor/pg_loss", "actor/kl_loss")
  return loss * scale, {k: v * scale if k in scaled else v for k, v in metrics.items()}


def train_reference(
  params, graphdef, tokens, resp: steps.Responses, *, t: int, cfg: steps.UpdateConfig
):
  """Oracle mini-batch: verl's strided micro-batches, each loss / NM, gradients summed and
  metrics averaged. -> (grads, loss, metrics)."""
  nm = cfg.num_micro_batches
  grad = jax.value_and_grad(micro_loss, has_aux=True)
  total, loss, metrics = None, 0.0, []
  for j in range(nm):
    pick = lambda x, j=j: None if x is None else x[j::nm]
    part = steps.Responses(
      *(
        pick(getattr(resp, f))
        for f in (
          "old_log_probs",
          "advantages",
          "response_mask",
          "ref_log_probs",
          "rollout_is_weights",
        )
      )
    )
    (lj, mj), g = grad(
      params, graphdef, tuple(x[j::nm] for x in tokens), part, t=t, cfg=cfg, scale=1.0 / nm
    )
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    loss += lj
    metrics.append(mj)
  return total, loss, {k: jnp.mean(jnp.stack([m[k] for m in metrics])) for k in metrics[0]}
