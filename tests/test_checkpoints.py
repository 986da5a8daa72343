"""Orbax checkpoints: sharded round trip on the 8-device CPU mesh, keep-k plus best, resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fipo_jax import checkpoints


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh, seed):
  """nnx params sharded over the mesh, plus an AdamW state that follows them."""
  model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(seed)),
                         nnx.Linear(8, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed + 1)))
  _, params = nnx.split(model)
  specs = {(16, 8): P("fsdp", "data"), (8,): P("fsdp"), (8, 4): P("fsdp", None), (4,): P()}
  params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, specs[x.shape])), params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return params, opt_state


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    if isinstance(x, jax.Array) and x.ndim:
      assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


def test_round_trip_sharded_with_extra(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  rng = jax.random.key(42)
  extra = {"rng": jax.random.key_data(rng).tolist(),
           "data_state": {"epoch": 1, "position": 7, "seed": 1, "skipped_rows": 2},
           "carry_over": {"prompt_indices": np.arange(3), "num_gen_batches": np.int64(2)},
           "best": float("nan")}
  with checkpoints.CheckpointManager(str(tmp_path / "ckpt"), keep=2) as mgr:
    assert mgr.restore_latest(params=params, opt_state=opt_state) is None  # empty dir
    assert mgr.save(3, params=params, opt_state=opt_state, extra=extra)
    mgr.wait()
  # A fresh manager (a new process) restores into differently-valued targets.
  targets = _state(mesh, 1)
  with checkpoints.CheckpointManager(str(tmp_path / "ckpt"), keep=2) as mgr:
    got = mgr.restore_latest(params=targets[0], opt_state=targets[1])
  assert got.step == 3
  _assert_same(got.params, params)
  _assert_same(got.opt_state, opt_state)
  assert got.extra["data_state"] == extra["data_state"]
  assert got.extra["carry_over"] == {"prompt_indices": [0, 1, 2], "num_gen_batches": 2}
  assert got.extra["best"] is None
  key = jax.random.wrap_key_data(jnp.asarray(got.extra["rng"], jnp.uint32))
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(rng))
  assert got.params["layers"][0]["kernel"].value.sharding.spec == P("fsdp", "data")
  assert got.params["layers"][1]["kernel"].value.dtype == jnp.bfloat16


def test_restore_into_abstract_targets_with_new_shardings(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=1, async_save=False)
  mgr.save(1, params=params, opt_state=opt_state)
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          params)
  got = mgr.restore(1, params=abstract, opt_state=opt_state)
  for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(params), strict=True):
    assert x.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  step, only = mgr.restore_params(params=abstract)  # eval/export: no optimizer state read
  assert step == 1
  _assert_same(only, got.params)
  mgr.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoints.CheckpointManager(str(tmp_path / "empty")).restore_params(params=abstract)


def test_keep_last_k_plus_best_and_restore_latest(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=2, best_metric="eval/acc_mean")
  evals = {2: 0.3, 4: 0.8, 6: 0.5, 8: float("nan")}  # odd steps carry no eval
  for step in range(1, 11):
    metrics = {"train/acc_mean": 0.1}
    if step in evals:
      metrics["eval/acc_mean"] = evals[step]
    mgr.save(step, params=params, opt_state=opt_state, metrics=metrics, extra={"step": step})
  mgr.wait()
  assert mgr.all_steps() == [4, 9, 10]  # last 2, plus the best eval (0.8 at step 4)
  assert mgr.best_step() == 4
  assert not mgr.save(10, params=params, opt_state=opt_state)  # already saved
  mgr.close()
  # Resume: a new manager sees the same steps and restores the latest.
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=2, best_metric="eval/acc_mean")
  got = mgr.restore_latest(params=params, opt_state=opt_state)
  assert got.step == 10 and got.extra == {"step": 10}
  mgr.save(11, params=params, opt_state=opt_state, metrics={"eval/acc_mean": 0.9})
  mgr.save(12, params=params, opt_state=opt_state)
  mgr.save(13, params=params, opt_state=opt_state)
  mgr.close()
  assert checkpoints.CheckpointManager(str(tmp_path), keep=2).all_steps() == [11, 12, 13]


def test_min_mode_and_partial_save_ignored(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=1, best_metric="loss", best_mode="min")
  for step, loss in [(1, 2.0), (2, 1.0), (3, 3.0)]:
    mgr.save(step, params=params, opt_state=opt_state, metrics={"loss": loss})
  mgr.wait()
  assert mgr.all_steps() == [2, 3]
  mgr.close()
  # An uncommitted (crashed) save is a temporary directory: not listed, not restored.
  (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=1, best_metric="loss", best_mode="min")
  assert mgr.restore_latest(params=params, opt_state=opt_state).step == 3
  mgr.close()
  with pytest.raises(ValueError, match="keep"):
    checkpoints.CheckpointManager(str(tmp_path), keep=0)


def test_extra_is_plain_json(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=1, async_save=False)
  mgr.save(5, params=params, opt_state=opt_state, extra={"x": np.float32(1.5), "y": (1, 2)})
  files = [f for f in tmp_path.glob("5/extra/*") if f.name != "commit_success.txt"]
  assert files
  text = "".join(f.read_text() for f in files if f.is_file())
  assert json.loads(text) == {"x": 1.5, "y": [1, 2]}
  mgr.close()
