"""Mesh construction, the rules table, and sharded loading on the 8-device CPU mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fipo_jax import models, sharding
from tests import test_model_helpers as mh


def test_make_mesh_sizes():
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  assert mesh.axis_names == sharding.AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("kwargs,field", [
  (dict(data=3, fsdp=1, tensor=1), "mesh"),
  (dict(data=3, fsdp=-1), "mesh.fsdp"),
  (dict(data=-1, fsdp=-1), "mesh.data: at most one mesh axis may be -1"),
  (dict(tensor=0), "mesh.tensor"),
])
def test_make_mesh_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    sharding.make_mesh(**kwargs)


def test_make_mesh_and_the_config_apply_one_mesh_rule():
  from fipo_jax import config_mesh  # noqa: PLC0415

  for sizes in ((3, -1, 1), (2, 2, 1), (-1, 1, -1)):
    with pytest.raises(ValueError) as mesh_err:
      sharding.make_mesh(*sizes)
    with pytest.raises(ValueError) as config_err:
      config_mesh.MeshSection(*sizes).resolve(jax.device_count())
    assert str(mesh_err.value) == str(config_err.value)


def test_mesh_axes_is_the_divisibility_rule():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.mesh_axes("batch") == ("data", "fsdp")  # no size: the table as written
  assert sharding.mesh_axes("batch", 8, mesh) == ("data", "fsdp")
  assert sharding.mesh_axes("batch", 6, mesh) == ("data",)  # 6 % (2 * 2): fsdp dropped
  assert sharding.mesh_axes("batch", 3, mesh) == ()
  assert sharding.mesh_axes("batch", 8, mesh, used=("data",)) == ("fsdp",)
  assert sharding.mesh_axes(None, 8, mesh) == ()
  no_tensor = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
  assert sharding.mesh_axes("kv_heads", 4, no_tensor) == ()  # an axis the mesh lacks
  with pytest.raises(KeyError, match="not in sharding.RULES"):
    sharding.mesh_axes("nope")


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  assert sharding.logical_to_spec(("batch", "seq")) == P(("data", "fsdp"))
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
    None, "fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "vocab")) == P("fsdp", "tensor")
  # A mesh axis that does not divide the dimension is dropped (3 kv heads on tensor=2).
  assert sharding.logical_to_spec(("embed", "kv_heads"), (8, 3), mesh) == P("fsdp")
  with pytest.raises(KeyError, match="nonsense"):
    sharding.logical_to_spec(("nonsense",))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = mh.random_hf_model("qwen2", seed=11)
  path = tmp_path_factory.mktemp("hf_shard")
  hf.save_pretrained(path)
  return path


EXPECTED = {  # the rules table written out for fsdp x tensor
  ("embed",): P("tensor", "fsdp"),
  ("lm_head",): P("fsdp", "tensor"),
  ("final_norm",): P(),
  ("layers", "q_proj"): P(None, "fsdp", "tensor"),
  ("layers", "k_proj"): P(None, "fsdp", "tensor"),
  ("layers", "o_proj"): P(None, "tensor", None, "fsdp"),
  ("layers", "q_bias"): P(None, "tensor"),
  ("layers", "gate_proj"): P(None, "fsdp", "tensor"),
  ("layers", "down_proj"): P(None, "tensor", "fsdp"),
  ("layers", "input_norm"): P(),
}


def _forward(model, ids, mask, pos):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, pos):
    return nnx.merge(graphdef, state)(ids, positions=pos, attention_mask=mask)

  return np.asarray(run(state, ids, mask, pos))


@pytest.mark.parametrize("fsdp,tensor", [(4, 2), (8, 1)])
@pytest.mark.slow
def test_sharded_load_matches_single_device(hf_dir, fsdp, tensor):
  ids, mask, pos = mh.padded_batch(np.random.default_rng(0), 96, [7, 5], [1, 3], 8)
  args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
  single = models.from_pretrained(hf_dir)
  mesh = sharding.make_mesh(fsdp=fsdp, tensor=tensor)
  sharded = models.from_pretrained(hf_dir, mesh=mesh)
  for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
    arr = var.get_value()
    want = sharding.named_sharding(mesh, var.get_metadata()["axes"], arr.shape)
    assert arr.sharding.is_equivalent_to(want, arr.ndim), path
    if path in EXPECTED:  # with tensor=1 the 'tensor' entries are size-1 axes, still named
      assert arr.sharding.spec == EXPECTED[path], (path, arr.sharding.spec)
  np.testing.assert_allclose(_forward(sharded, *args), _forward(single, *args), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_init_model_sharded_equals_unsharded():
  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  a = nnx.state(models.init_model(cfg, seed=5, mesh=mesh), nnx.Param)
  b = nnx.state(models.init_model(cfg, seed=5), nnx.Param)
  for (path, va), (_, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True):
    x = va.get_value()
    want = sharding.named_sharding(mesh, va.get_metadata()["axes"], x.shape)
    assert x.sharding.is_equivalent_to(want, x.ndim), path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(vb.get_value()))


@pytest.mark.slow
def test_shard_params_and_batch_sharding():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8)
  state = sharding.shard_params(nnx.state(models.init_model(cfg), nnx.Param), mesh)
  q = state["layers"]["q_proj"].get_value()
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  x = jax.device_put(jnp.zeros((8, 5)), sharding.batch_sharding(mesh))
  assert x.sharding.spec == P(("data", "fsdp"))


class _HeldRows:
  """A sharding stand-in whose addressable devices hold the given row blocks."""

  def __init__(self, *blocks):
    self._blocks = blocks

  def addressable_devices_indices_map(self, shape):
    return {i: (slice(lo, hi),) for i, (lo, hi) in enumerate(self._blocks)}


def test_process_rows_contiguous_block_or_none():
  # One process holds every device, so every row, whatever the mesh layout.
  mesh = sharding.make_mesh(data=2, fsdp=-1)
  assert sharding.process_rows(sharding.batch_sharding(mesh, 2, (16, 3)), 16) == slice(0, 16)
  # Several hosts: a host whose devices hold rows 4-11 packs exactly those (any device order);
  # replicas of a block count once.
  assert sharding.process_rows(_HeldRows((8, 12), (4, 8), (4, 8)), 16) == slice(4, 12)
  # Devices not grouped by process (rows 0-3 and 8-11): no single block, caller packs all rows.
  assert sharding.process_rows(_HeldRows((0, 4), (8, 12)), 16) is None
