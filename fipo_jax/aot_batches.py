"""The abstract mini-batches that fipo_jax.aot compiles the train step on (no allocation).

padded_shape   the padded layout (rl.use_remove_padding=False): M rows of P + T;
packed_shape   the packed layout (packing.Shape) a mini-batch of sequences of given mean lengths
               fills;
batch          the abstract arrays of either. Shapes use the legend in fipo_jax/__init__.
"""

from __future__ import annotations

import math


def padded_shape(run, mesh, cfg):
  """The padded layout of a mini-batch (packing.Shape): one sequence per row of P + T, the
  update's micro-batches, ceil(M / NM / W) rows (= slots) per shard."""
  from fipo_jax.rl import layouts, packing

  d = layouts.num_batch_shards(mesh)
  m, nm = run.rl.ppo_mini_batch_size * run.rl.n, cfg.num_micro_batches
  rows = math.ceil(m // nm / d)
  seq = run.data.max_prompt_length + run.rl.max_response_length
  return packing.Shape(num_micro=nm, num_shards=d, rows=rows, slots=rows, row_len=seq)


def packed_shape(run, mesh, cfg, mean_prompt: int, mean_response: int):
  """The packed layout a mini-batch of sequences of the mean lengths fills (packing.Shape).

  Rows are counted as if packing were perfect (first-fit decreasing comes within a few per
  cent of it on many sequences); with fixed micro-batches the rows of one hold its sequences.
  """
  from fipo_jax.rl import layouts, packing

  layout = layouts.for_run(run, mesh, cfg)
  d, length, nm = layout.num_shards, layout.row_len, layout.num_micro
  m = run.rl.ppo_mini_batch_size * run.rl.n
  seq = min(mean_prompt, run.data.max_prompt_length) + min(mean_response,
                                                           run.rl.max_response_length)
  if nm is None:  # token budget: one row per chip per micro-batch
    nm, rows = math.ceil(math.ceil(m * seq / length) / d), 1
  else:
    rows = math.ceil(math.ceil(m / nm / d) * seq / length)
  slots = packing.bucket(2 * math.ceil(m / (nm * d)))
  return packing.Shape(num_micro=nm, num_shards=d, rows=rows, slots=slots, row_len=length)


def batch(run, mesh, shape, cfg):
  """A mini-batch of `shape` (padded or packed) as sharded ShapeDtypeStructs (shards on axis 1)."""
  import jax

  from fipo_jax import sharding
  from fipo_jax.rl import layouts

  abstract = layouts.abstract_batch(shape, run.rl.max_response_length, with_ref=cfg.use_kl_loss)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.named_sharding(
    mesh, (None, "batch") + (None,) * (x.ndim - 2), x.shape))
  return jax.tree.map(place, abstract)
