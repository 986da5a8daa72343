"""Abstract init -> shardings -> materialise: models are never built whole on one device."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from fipo_jax import sharding as sharding_lib
from fipo_jax.models import config as config_lib
from fipo_jax.models import transformer as transformer_lib


def abstract_model(cfg: config_lib.ModelConfig) -> transformer_lib.Transformer:
  """The model with ShapeDtypeStruct leaves (no allocation)."""
  return nnx.eval_shape(lambda: transformer_lib.Transformer(cfg, rngs=nnx.Rngs(0)))


def param_shardings(cfg: config_lib.ModelConfig, mesh: Mesh | None):
  """(graphdef, abstract state, shardings state) for cfg on mesh (None: first device)."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return graphdef, abs_state, sharding_lib.state_shardings(abs_state, mesh)


def init_model(cfg: config_lib.ModelConfig, *, seed: int = 0, rng: jax.Array | None = None,
               mesh: Mesh | None = None) -> transformer_lib.Transformer:
  """Randomly initialised model whose params are created directly in their shards."""
  graphdef, _, shardings = param_shardings(cfg, mesh)
  key = jax.random.key(seed) if rng is None else rng

  def make(key):
    return nnx.state(transformer_lib.Transformer(cfg, rngs=nnx.Rngs(params=key)))

  state = jax.jit(make, out_shardings=shardings)(key)
  return nnx.merge(graphdef, state)


def count_params(model_or_state) -> int:
  """Number of scalar parameters (works on abstract models too)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
    else model_or_state
  return sum(x.size for x in jax.tree.leaves(state))
