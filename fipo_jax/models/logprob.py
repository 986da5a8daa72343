"""Memory-frugal per-token log-probs (and entropies) of given response tokens.

Only one [B, C, V] chunk of float32 logits exists at a time: a `lax.scan` over sequence chunks
whose body is rematerialised in the backward pass (vocab 152k x 20k tokens would otherwise be
12 GB per row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fipo_jax import sharding


def token_log_probs_from_hidden(
  hidden: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = 1024,
  return_entropy: bool = False,
):
  """hidden [B, T, D], unembedding w [D, V], targets int32[B, T] -> f32[B, T] (, entropy).

  log_prob[b, t] = log_softmax(hidden[b, t] @ w / temperature)[targets[b, t]], in float32.
  """
  b, t, _ = hidden.shape
  c = max(1, min(chunk_size, t))
  pad = (-t) % c
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (t + pad) // c
  h_chunks = hidden.reshape(b, n, c, -1).swapaxes(0, 1)  # [n, B, C, D]
  t_chunks = targets.reshape(b, n, c).swapaxes(0, 1)
  w = w.astype(hidden.dtype)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk(_, inputs):
    h, tgt = inputs
    h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    logits = sharding.constrain(
      logits, ("activation_batch", "activation_length", "activation_vocab")
    )
    logits = logits / jnp.float32(temperature)
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    picked = jnp.take_along_axis(logits, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = picked - logz
    if not return_entropy:
      return None, (logp, jnp.zeros_like(logp))
    probs = jnp.exp(logits - logz[..., None])
    entropy = logz - jnp.sum(probs * logits, axis=-1)
    return None, (logp, entropy)

  _, (logp, ent) = jax.lax.scan(chunk, None, (h_chunks, t_chunks))
  logp = logp.swapaxes(0, 1).reshape(b, -1)[:, :t]
  ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :t]
  return (logp, ent) if return_entropy else logp


def sequence_log_probs(
  model,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  positions: jax.Array,
  *,
  num_response_tokens: int,
  temperature: float = 1.0,
  chunk_size: int = 1024,
  return_entropy: bool = False,
):
  """Log-probs f32[B, T] of the last T tokens of input_ids [B, S] given their prefixes.

  out[b, t] = log_softmax(logits / temperature)[input_ids[b, S - T + t]] where the logits come
  from position S - T + t - 1 (verl's actor convention). With return_entropy, also returns the
  entropy f32[B, T] of the same tempered distributions.
  """
  length = input_ids.shape[1]
  t = num_response_tokens
  if not 0 < t < length:
    raise ValueError(f"num_response_tokens={t} must be in [1, {length - 1}] for S={length}")
  hidden = model.hidden_states(input_ids, positions=positions, attention_mask=attention_mask)
  return token_log_probs_from_hidden(
    hidden[:, length - t - 1 : length - 1],
    model.unembedding(),
    input_ids[:, length - t :],
    temperature=temperature,
    chunk_size=chunk_size,
    return_entropy=return_entropy,
  )


def next_token_log_probs(
  model,
  input_ids: jax.Array,
  segment_ids: jax.Array,
  positions: jax.Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = 1024,
  return_entropy: bool = False,
):
  """Packed rows int32[R, S] -> f32[R, S] (, entropy): the log-prob of each next token.

  out[r, p] = log_softmax(logits[r, p] / temperature)[input_ids[r, p + 1]], attention kept
  inside each segment. The last column and the positions whose next token starts another
  segment are finite but meaningless; callers read response positions only.
  """
  hidden = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids)
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  return token_log_probs_from_hidden(
    hidden,
    model.unembedding(),
    targets,
    temperature=temperature,
    chunk_size=chunk_size,
    return_entropy=return_entropy,
  )


def gather_rows(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [W, n], index int32[W, E, T] in [0, n) -> [W, E, T], out[w] = values[w][index[w]].

  A gather batched over W: with W split over devices, each device reads only its own rows.
  """
  return jax.vmap(lambda v, i: jnp.take(v, i, axis=0, mode="clip"))(values, index)


def packed_response_log_probs(
  model,
  input_ids: jax.Array,
  segment_ids: jax.Array,
  positions: jax.Array,
  token_index: jax.Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = 1024,
  return_entropy: bool = False,
):
  """Log-probs of responses laid out packed, returned in the response layout.

  input_ids/segment_ids/positions int32[W, R, S]: W batch shards of R packed rows of S tokens.
  token_index int32[W, E, T]: for response token t of sequence slot e of shard w, the index
  p into that shard's flattened [R * S] next-token log-probs (its packed position minus one).
  Returns f32[W, E, T] (, entropy f32[W, E, T]); entries outside the response mask are finite
  but meaningless.
  """
  d, r, length = input_ids.shape
  flat = lambda x: x.reshape(d * r, length)
  out = next_token_log_probs(
    model,
    flat(input_ids),
    flat(segment_ids),
    flat(positions),
    temperature=temperature,
    chunk_size=chunk_size,
    return_entropy=return_entropy,
  )
  outs = out if return_entropy else (out,)
  res = tuple(gather_rows(x.reshape(d, r * length), token_index) for x in outs)
  return res if return_entropy else res[0]
