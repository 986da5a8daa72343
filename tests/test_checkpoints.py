"""Orbax checkpoints: sharded round trip on the 8-device CPU mesh, keep-k plus best, resume."""

import asyncio
import gc
import json
import logging
import sys
import threading
import types

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


@pytest.mark.slow
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


def _truncate_weights(step_dir):
  """Short data files in `step_dir`'s params, as a disk fault or a half-done copy leaves them
  (all of them: which ones a restore reads depends on how orbax merged the processes' files)."""
  for f in [*(step_dir / "params").glob("d/*"), *(step_dir / "params").glob("ocdbt.process_*/d/*")]:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  with checkpoints.CheckpointManager(str(tmp_path), keep=3) as mgr:
    for step in (1, 2, 3):
      mgr.save(step, params=params, opt_state=opt_state, extra={"step": step})
  _truncate_weights(tmp_path / "3")
  targets = _state(mesh, 1)
  with checkpoints.CheckpointManager(str(tmp_path), keep=3) as mgr:
    with pytest.raises(checkpoints.CheckpointUnreadable, match=r"step 3 in .* cannot be read "
                       r"\(.*\); pick another step with --step K \(kept: 1, 2\)"):
      mgr.restore_params(params=targets[0])  # eval/export: named, nothing moved
    assert mgr.restore_params(params=targets[0], step=2)[0] == 2
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*kept steps: 1, 2, 3"):
      mgr.restore_params(params=targets[0], step=7)
    got = mgr.restore_latest(params=targets[0], opt_state=targets[1])
    assert (got.step, got.skipped, got.extra) == (2, (3,), {"step": 2})
    _assert_same(got.params, params)
    assert mgr.all_steps() == [1, 2]
    assert mgr.save(3, params=params, opt_state=opt_state)  # step 3 is redone
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3", "3.unreadable"]


@pytest.mark.parametrize("path", ["restore_params", "restore_latest"])
def test_each_restore_path_quiets_abandoned_reads_before_reading(tmp_path, mesh, monkeypatch,
                                                                 path):
  """The sibling reads of a damaged step fail or finish right after orbax raises, so the filters
  are in place before any read: eval/export/generate (restore_params) and resume alike (CI once
  printed a closed-loop traceback from eval, whose path installed them only after the error)."""
  params, opt_state = _state(mesh, 0)
  with checkpoints.CheckpointManager(str(tmp_path), keep=1) as mgr:
    mgr.save(1, params=params, opt_state=opt_state)
  installed_at_read = []
  handler = checkpoints.ocp.StandardCheckpointHandler
  monkeypatch.setattr(sys, "unraisablehook", lambda u: None)  # not the quiet wrapper yet

  class Spy(handler):
    def restore(self, *a, **kw):
      installed_at_read.append(getattr(sys.unraisablehook, "_fipo_quiet_reads", False))
      return super().restore(*a, **kw)

  monkeypatch.setattr(checkpoints.ocp, "StandardCheckpointHandler", Spy)
  with checkpoints.CheckpointManager(str(tmp_path), keep=1) as mgr:
    if path == "restore_params":
      mgr.restore_params(params=params)
    else:
      mgr.restore_latest(params=params, opt_state=opt_state)
  assert installed_at_read and all(installed_at_read), installed_at_read


def test_no_restorable_checkpoint_raises_and_moves_nothing(tmp_path, mesh):
  params, opt_state = _state(mesh, 0)
  with checkpoints.CheckpointManager(str(tmp_path), keep=2) as mgr:
    for step in (1, 2):
      mgr.save(step, params=params, opt_state=opt_state)
  _truncate_weights(tmp_path / "2")
  # Shapes that do not fit the run (a changed config) fail step 1, and damage step 2.
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, *x.shape), x.dtype), params)
  with checkpoints.CheckpointManager(str(tmp_path), keep=2) as mgr:
    with pytest.raises(checkpoints.CheckpointUnreadable,
                       match=r"no checkpoint in .* can be restored \(step 2: .*; step 1: .*\)"):
      mgr.restore_latest(params=wrong, opt_state=opt_state)
    assert mgr.all_steps() == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


class _Processes:
  """`first_restorable` on n threads standing in for processes: `gather` is an all-gather."""

  def __init__(self, n: int):
    # The timeout is no speed bound: processes out of lockstep (a bug) wait on each other for
    # ever, and this turns that hang into a failure.
    self.barrier = threading.Barrier(n, timeout=600)
    self.slots: list = [None] * n

  def gather(self, p: int):
    def gather(x):
      self.slots[p] = np.asarray(x)
      self.barrier.wait()
      out = np.stack(self.slots)
      self.barrier.wait()  # nobody overwrites a slot before every process has read it
      return out

    return gather

  def run(self, steps: list[list[int]], fails: list[set[int]]):
    out: list = [None] * len(steps)

    def process(p):
      def try_restore(step):
        if step in fails[p]:
          raise OSError(f"short file on process {p} at step {step}")
        return step

      out[p] = checkpoints.first_restorable(steps[p], try_restore, gather=self.gather(p))

    threads = [threading.Thread(target=process, args=(p,)) for p in range(len(steps))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return out


def test_processes_agree_on_the_newest_step_that_restores_on_all_of_them():
  # Process 2 lists a step 6 the others do not (yet) see; damage differs per process.
  got = _Processes(3).run(steps=[[3, 4, 5], [5, 4, 3], [3, 4, 5, 6]],
                          fails=[{5}, {5, 4}, set()])
  assert [step for step, _ in got] == [3, 3, 3]
  assert got[0][1] == {5: "OSError: short file on process 0 at step 5",
                       4: "it did not restore on process 1"}
  assert got[1][1] == {5: "OSError: short file on process 1 at step 5",
                       4: "OSError: short file on process 1 at step 4"}
  assert got[2][1] == {5: "it did not restore on process 0, 1",
                       4: "it did not restore on process 1"}
  # None restores on every process: all of them say so (and none goes on alone).
  got = _Processes(2).run(steps=[[1, 2], [1, 2]], fails=[{2}, {1}])
  assert [step for step, _ in got] == [None, None]
  assert set(got[0][1]) == set(got[1][1]) == {1, 2}
  # One process: the plain fallback.
  assert checkpoints.first_restorable([1, 2], lambda s: s) == (2, {})


def test_move_aside_on_a_bucket_never_deletes(tmp_path, monkeypatch):
  import fake_gcs  # noqa: PLC0415 (tests/ is on sys.path under pytest)

  root = fake_gcs.install(tmp_path, monkeypatch)
  try:
    params, opt = {"w": jnp.arange(4.0)}, {"m": jnp.ones(2)}
    with checkpoints.CheckpointManager("gs://b/run/checkpoints", keep=2) as mgr:
      mgr.save(1, params=params, opt_state=opt, extra={"k": 1})
      mgr.wait()
      mgr.save(2, params={"w": params["w"] + 1}, opt_state=opt, extra={"k": 2})
    ckpts = root / "b" / "run" / "checkpoints"
    _truncate_weights(ckpts / "2")
    with checkpoints.CheckpointManager("gs://b/run/checkpoints", keep=2) as mgr:
      got = mgr.restore_latest(params=params, opt_state=opt)
    assert (got.step, got.skipped, got.extra) == (1, (2,), {"k": 1})
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2.unreadable"]
    assert (ckpts / "2.unreadable" / "params").is_dir()
    (ckpts / "2").mkdir()  # the same step damaged again later: a second name, nothing replaced
    assert checkpoints.move_aside("gs://b/run/checkpoints/2").endswith("/2.unreadable.2")
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2.unreadable", "2.unreadable.2"]
  finally:
    fake_gcs.clear_caches()


def _collect_failing_read(name: str) -> None:
  """Starts a coroutine called `name` that raises when closed, then drops it: Python reports
  the exception through sys.unraisablehook ("Exception ignored in <coroutine ...>")."""

  @types.coroutine
  def suspend():
    yield

  async def body():
    try:
      await suspend()
    finally:
      raise RuntimeError("read failed")  # noqa: B012 - the abandoned read's late failure

  body.__qualname__ = name
  coro = body()
  coro.send(None)  # suspended in the sleep, like a read still in flight
  del coro
  gc.collect()


def test_reads_abandoned_by_a_failed_restore_do_not_print_tracebacks(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoints.quiet_abandoned_reads()
  checkpoints.quiet_abandoned_reads()  # idempotent: one wrapper
  _collect_failing_read("_read_array_index_and_device_put")
  assert seen == []
  _collect_failing_read("some_other_coroutine")  # everything else still reaches the old hook
  assert [str(u.exc_value) for u in seen] == ["read failed"]


def test_a_read_finishing_on_the_closed_loop_prints_no_traceback(monkeypatch):
  """A sibling read that completes after the failed restore closed orbax's event loop: its
  callback's `call_soon_threadsafe` raises in TensorStore's thread (printed via excepthook)."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[1]))
  checkpoints.quiet_abandoned_reads()
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError:
    exc_info = sys.exc_info()
  sys.excepthook(*exc_info)  # as TensorStore's PyErr_Print reports it
  sys.unraisablehook(types.SimpleNamespace(  # or as an unraisable callback error
    exc_type=exc_info[0], exc_value=exc_info[1], exc_traceback=exc_info[2], object=print))
  assert seen == []
  try:  # any other error still reaches the previous hook
    raise RuntimeError("Event loop is closed")
  except RuntimeError:
    sys.excepthook(*sys.exc_info())
  assert [str(e) for e in seen] == ["Event loop is closed"]


def _drop_failed_task(name: str) -> None:
  """Runs a task whose coroutine (called `name`) raises, never retrieves its exception and drops
  it: asyncio logs "Task exception was never retrieved" with the traceback when it is collected."""

  async def body():
    raise RuntimeError("read failed")

  body.__code__ = body.__code__.replace(co_name=name)
  loop = asyncio.new_event_loop()
  task = loop.create_task(body())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task
  gc.collect()


def test_a_failed_read_task_collected_later_logs_no_traceback(caplog):
  """orbax gathers one task per array; when one fails it raises at once, and the sibling tasks
  that fail too are collected later, unretrieved (seen in CI as an ERROR line with a traceback
  after the step had been named in one warning)."""
  checkpoints.quiet_abandoned_reads()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _drop_failed_task("_read_array_index_and_device_put")
    assert caplog.records == []
    _drop_failed_task("some_other_coroutine")  # any other task's error is still logged
  assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
    "Task exception was never retrieved"]
