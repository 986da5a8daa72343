"""The engine's KV layouts: which pool and decode kernel a model gets on a mesh, the cache a
fresh decode state holds, and the decode state's shardings.

'paged' (models/paged.py): a page pool whose layout follows the decode kernel
(kernels.decode_kernel: the gather pools [L, K, Pg, page, H], TPU ragged paged attention's
combined pool, GPU paged attention's folded pools); 'dense': a [L, B, S, K, H] cache (the
reference). Shapes: B slots, S cache length, M pages per slot, Pg pages.
"""

from __future__ import annotations

import jax

from fipo_jax import models, sharding
from fipo_jax.models import kernels, paged
from fipo_jax.sampling.engine_config import EngineConfig
from fipo_jax.sampling.steps import DecodeState


def paged_layout(model_cfg, cfg: EngineConfig, mesh) -> paged.PagedLayout:
  """Slots and pages over the mesh axes that split the slots; kv heads over `tensor` when it
  splits both the kv and the query heads (as the params' projections do); the decode kernel
  (and with it the pool's layout) from kernels.decode_kernel."""
  kv = sharding.mesh_axes("kv_heads", model_cfg.num_kv_heads, mesh)
  if sharding.mesh_axes("heads", model_cfg.num_heads, mesh) != kv:
    kv = ()
  return paged.PagedLayout(
    page_size=cfg.page, pages_per_block=max(1, cfg.decode_block // cfg.page), mesh=mesh,
    batch_axes=sharding.mesh_axes("cache_batch", cfg.num_slots, mesh), kv_axes=kv,
    kernel=kernels.decode_kernel(kernels.platform_of(mesh), model_cfg, cfg.page),
  )  # fmt: skip


def init_cache(model_cfg, cfg: EngineConfig, layout: paged.PagedLayout, num_pages: int):
  """A fresh decode state's cache: paged, `num_pages` pages in `layout` and empty slots;
  dense, zeros [L, B, S, K, H]."""
  if cfg.kv_layout == "paged":
    return paged.init_paged_cache(model_cfg, layout, cfg.num_slots, num_pages,
                                  cfg.pages_per_slot)  # fmt: skip
  return models.init_cache(model_cfg, cfg.num_slots, cfg.cache_len)


def decode_state_shardings(state: DecodeState, mesh: jax.sharding.Mesh):
  """Slots over the batch mesh axes, kv heads over `tensor` (the training rules table); a page
  pool's pages over the slots' axes (`PagedLayout`)."""
  cache_axes = ("layers", "cache_batch", "seq", "kv_heads", "head_dim")
  layout = getattr(state.cache, "layout", None)

  def one(path, x):
    name = jax.tree_util.keystr(path)
    if layout is not None and name.startswith(".cache"):
      if name.endswith(".k") or name.endswith(".v"):
        return jax.sharding.NamedSharding(mesh, layout.pool_spec())
      return jax.sharding.NamedSharding(mesh, layout.slot_spec(x.ndim))
    if name.endswith(".k") or name.endswith(".v"):
      return sharding.named_sharding(mesh, cache_axes, x.shape)
    return sharding.named_sharding(mesh, ("cache_batch",) + (None,) * (x.ndim - 1), x.shape)

  return jax.tree_util.tree_map_with_path(one, state)
