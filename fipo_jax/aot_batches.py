"""The abstract mini-batches that fipo_jax.aot compiles the train step on (no allocation).

padded_batch   M rows of P + T, the padded layout (rl.use_remove_padding=False);
packed_shape   the packed layout (packing.Shape) a mini-batch of sequences of given mean lengths
               fills; packed_batch builds its arrays. Shapes use the legend in fipo_jax/__init__.
"""

from __future__ import annotations

import math


def padded_batch(run, mesh, cfg):
  """The padded step's mini-batch: M rows of P + T, as sharded ShapeDtypeStructs."""
  import jax
  import jax.numpy as jnp

  from fipo_jax import sharding
  from fipo_jax.rl import train_step as ts

  p, t = run.data.max_prompt_length, run.rl.max_response_length
  rows, seq = run.rl.ppo_mini_batch_size * run.rl.n, p + t
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
  return ts.PolicyBatch(input_ids=i32(rows, seq), attention_mask=i32(rows, seq),
                        positions=i32(rows, seq), response_mask=f32(rows, t),
                        old_log_probs=f32(rows, t), advantages=f32(rows, t),
                        ref_log_probs=f32(rows, t) if cfg.use_kl_loss else None)


def packed_shape(run, mesh, cfg, mean_prompt: int, mean_response: int):
  """The packed layout a mini-batch of sequences of the mean lengths fills (packing.Shape).

  Rows are counted as if packing were perfect (first-fit decreasing comes within a few per
  cent of it on many sequences); with fixed micro-batches the rows of one hold its sequences.
  """
  from fipo_jax.rl import packed_step, packing

  settings = packed_step.layout(run, mesh, cfg)
  d, length, nm = settings["num_shards"], settings["row_len"], settings["num_micro"]
  m = run.rl.ppo_mini_batch_size * run.rl.n
  seq = min(mean_prompt, run.data.max_prompt_length) + min(mean_response,
                                                           run.rl.max_response_length)
  if nm is None:  # token budget: one row per chip per micro-batch
    nm, rows = math.ceil(math.ceil(m * seq / length) / d), 1
  else:
    rows = math.ceil(math.ceil(m / nm / d) * seq / length)
  slots = packing.bucket(2 * math.ceil(m / (nm * d)))
  return packing.Shape(num_micro=nm, num_shards=d, rows=rows, slots=slots, row_len=length)


def packed_batch(run, mesh, shape, cfg):
  """A packed mini-batch of `shape` as sharded ShapeDtypeStructs (shards on axis 1)."""
  import jax

  from fipo_jax import sharding
  from fipo_jax.rl import packed_step

  abstract = packed_step.abstract_batch(shape, run.rl.max_response_length,
                                        with_ref=cfg.use_kl_loss)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.named_sharding(
    mesh, (None, "batch") + (None,) * (x.ndim - 2), x.shape))
  return jax.tree.map(place, abstract)
