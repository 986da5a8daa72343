"""The engine's ahead-of-time traces (`fipo_jax.aot` and the HLO tests): its jitted prefill,
insert and generate steps on abstract, sharded inputs, so nothing is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fipo_jax import sharding
from fipo_jax.models import paged
from fipo_jax.sampling import params as params_lib
from fipo_jax.sampling.engine_config import stop_array
from fipo_jax.sampling.steps import DecodeState


class Traces:
  """Mixed into `Engine`: reads its mesh, layout, config and jitted steps."""

  def abstract_decode_state(self) -> DecodeState:
    """`init_decode_state()` as sharded ShapeDtypeStructs (nothing allocated)."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(self._zero_state), self.state_shardings,
    )  # fmt: skip

  def trace_prefill(self, params, *, sampling: params_lib.SamplingMethod) -> jax.stages.Traced:
    """The largest prefill (Up = Rb = batch_bucket(num_slots), P = max_prefill_len), traced.

    params: arrays or sharded ShapeDtypeStructs; token inputs are sharded over the batch axes.
    """
    bsz, plen = self.cfg.batch_bucket(self.cfg.num_slots), self.cfg.max_prefill_len

    def arg(shape, dtype):
      return jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape))
      )

    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding.replicated(self.mesh))
    return self._prefill.trace(
      self.graphdef, params, arg((bsz, plen), jnp.int32), arg((bsz,), jnp.int32),
      arg((bsz, 3), jnp.int32), seed, cfg=self.model_cfg, sampling=sampling,
    )  # fmt: skip

  def trace_generate(self, params, *, sampling: params_lib.SamplingMethod) -> jax.stages.Traced:
    """One `generate` call (steps_per_call decode steps of all B slots, S cache), traced."""
    rep = sharding.replicated(self.mesh)
    stop = jax.ShapeDtypeStruct(stop_array([0]).shape, jnp.int32, sharding=rep)
    min_free = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return self._generate.trace(
      self.graphdef, params, self.abstract_decode_state(), stop, min_free,
      sampling=sampling, steps=self.cfg.steps_per_call,
    )  # fmt: skip

  def trace_insert(self, prefix) -> jax.stages.Traced:
    """The largest insert (every slot: I = num_slots rounded up, shard-major) into the abstract
    decode state, traced. prefix: a Prefix of sharded ShapeDtypeStructs (prefill's output)."""
    bsz = self._request_order(range(self.cfg.num_slots))[0]
    rep = sharding.replicated(self.mesh)
    if self.paged:  # prefill's output sharding (traced out_info carries none)
      spec = jax.NamedSharding(self.mesh, paged.prefix_spec(self.layout, prefix.cache.k.shape[1]))
      kv = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec)
      cache = prefix.cache.replace(k=kv(prefix.cache.k), v=kv(prefix.cache.v))
      prefix = prefix.replace(cache=cache)
    arg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
    stop = jax.ShapeDtypeStruct(stop_array([0]).shape, jnp.int32, sharding=rep)
    return self._insert.trace(
      prefix,
      self.abstract_decode_state(),
      arg(bsz),
      arg(bsz),
      arg(bsz, self.cfg.pages_per_slot),
      arg(bsz),
      arg(bsz),
      stop,
    )
