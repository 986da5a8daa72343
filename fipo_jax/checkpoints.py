"""Orbax checkpoints of a run: params, optimizer state and a JSON `extra` blob.

  ckpt = CheckpointManager(paths.join(workdir, "checkpoints"), keep=3,
                           best_metric="eval/acc_mean")
  restored = ckpt.restore_latest(params=params, opt_state=opt_state)  # None if empty
  if restored is not None:
    step, params, opt_state, extra = (restored.step, restored.params, restored.opt_state,
                                      restored.extra)
  ...
  ckpt.save(step, params=params, opt_state=opt_state, metrics=metrics, extra={
    "rng": jax.random.key_data(rng).tolist(), "data_state": it.get_state(), ...})
  ckpt.wait()

- One step directory per save, items `params`, `opt_state` (orbax StandardSave: sharded arrays,
  each host writes its shards) and `extra` (JSON: rng key data as a list, data-iterator state,
  dynamic-sampling carry-over, counters). Writes are asynchronous and atomic (orbax writes to a
  temporary directory and renames it when complete), so a crash mid-save leaves the previous
  checkpoints intact and the partial one is ignored.
- Kept: the last `keep` steps, plus the step with the best `best_metric` (when a save carried
  that metric; steps saved without it compete only for the last-`keep` slots).
- Restore takes the live (or abstract `jax.ShapeDtypeStruct`) params/opt_state trees as targets:
  arrays come back with the targets' shapes, dtypes and shardings, written straight into their
  shards.
- The directory may be local or a bucket (`gs://...`: orbax's own GCS support, which needs
  `google-cloud-storage`, in the `[tpu]` extra).
- A checkpoint damaged after its save (a short or missing file, empty metadata, a missing
  item, shapes that do not fit the run) does not stop a resume: `restore_latest` restores the
  newest step that does restore, on every process alike (`first_restorable`), moves each newer
  one aside to `<step>.unreadable` (renamed, never deleted) and lists them in
  `Restored.skipped`. When no kept step restores it raises `CheckpointUnreadable` naming them
  and moves nothing. `restore_params` (eval, generate, export) raises it for the step asked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from fipo_jax import distributed, paths

log = logging.getLogger(__name__)


class _NoTrackedMetricNotice(logging.Filter):
  """Drops orbax's warning for a save without metrics: saves between evals carry none by
  design (they compete only for the last-`keep` slots), so it would print at every save."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`; did not provide metrics")


_NOTICE_FILTER = _NoTrackedMetricNotice()
logging.getLogger("absl").addFilter(_NOTICE_FILTER)  # orbax logs through absl.logging


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint."""

  step: int
  params: Any
  opt_state: Any
  extra: dict[str, Any]
  skipped: tuple[int, ...] = ()  # newer steps that did not restore (now moved aside)


class CheckpointUnreadable(ValueError):
  """A checkpoint step (or every kept one) cannot be restored; the message says which and why.

  A ValueError: the CLIs report it as a bad input (one line, exit 2)."""


UNREADABLE_SUFFIX = ".unreadable"  # not a step name to orbax: a moved-aside step is never listed


def abstract_tree(tree: Any) -> Any:
  """Arrays -> jax.ShapeDtypeStruct with their sharding (restore targets); others unchanged."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray | np.generic):
      return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return x

  return jax.tree.map(leaf, tree)


class CheckpointManager:
  """Keep-last-k plus best-by-metric orbax checkpoints of (params, opt_state, extra)."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = "eval/acc_mean",
               best_mode: str = "max", async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = paths.absolute(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      # Higher is better for both BestN and best_fn once 'min' metrics are negated.
      sign = 1.0 if best_mode == "max" else -1.0
      best_fn = lambda m: sign * float(m[best_metric])
      policies.append(checkpoint_managers.BestN(get_metric_fn=best_fn, n=1,
                                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
      # best_fn also makes orbax persist each step's metrics, so the best step survives restarts.
      best_fn=best_fn, best_mode="max",
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies=policies),
      enable_async_checkpointing=async_save, create=True,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("params", "opt_state", "extra"))

  def save(self, step: int, *, params: Any, opt_state: Any, extra: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None) -> bool:
    """Starts saving `step` (asynchronously); returns False if that step is already saved.

    `metrics` may be the step's full metrics dict: only `best_metric` is kept, and only when
    present and finite (a NaN eval never becomes the best checkpoint).
    """
    step = int(step)
    if step in self._mgr.all_steps():
      log.info("checkpoint for step %d exists; not saving again", step)
      return False
    best = None
    if self.best_metric and metrics is not None and self.best_metric in metrics:
      value = float(np.asarray(metrics[self.best_metric]))
      if math.isfinite(value):
        best = {self.best_metric: value}
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      extra=ocp.args.JsonSave(_jsonable(dict(extra or {}))),
    )
    return bool(self._mgr.save(step, args=args, metrics=best))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None if no save carried it)."""
    return self._mgr.best_step() if self.best_metric else None

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(int(step))  # orbax's default step name

  def restore(self, step: int, *, params: Any, opt_state: Any) -> Restored:
    """Restores `step` into the shapes/dtypes/shardings of the `params`/`opt_state` targets.

    Reads the items with orbax's handlers, not through the manager: the manager's restore ends
    in a barrier of all processes, which one whose restore raised never reaches (see
    `first_restorable`). Each process reads only its own shards either way."""
    step_dir = self._step_dir(step)
    quiet_abandoned_reads()  # before reading: a damaged step's sibling reads fail right after
    return Restored(
      step=int(step),
      params=ocp.StandardCheckpointHandler().restore(
        step_dir / "params", args=ocp.args.StandardRestore(abstract_tree(params))),
      opt_state=ocp.StandardCheckpointHandler().restore(
        step_dir / "opt_state", args=ocp.args.StandardRestore(abstract_tree(opt_state))),
      extra=dict(ocp.JsonCheckpointHandler().restore(step_dir / "extra") or {}),
    )

  def restore_params(self, *, params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of `step` (default: the latest) without reading the optimizer state,
    e.g. for eval or export. Raises FileNotFoundError if there is no such checkpoint, and
    CheckpointUnreadable (naming the step, the reason and the other kept steps) if it does
    not restore."""
    self._mgr.reload()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (kept steps: "
                              f"{', '.join(map(str, steps))})")
    quiet_abandoned_reads()
    try:
      restored = ocp.StandardCheckpointHandler().restore(
        self._step_dir(step) / "params", args=ocp.args.StandardRestore(abstract_tree(params)))
    except Exception as e:  # noqa: BLE001 - any damage: named, with the way out
      others = [s for s in steps if s != step]
      hint = (f"; pick another step with --step K (kept: {', '.join(map(str, others))})"
              if others else "; no other step is kept")
      raise CheckpointUnreadable(f"checkpoint step {step} in {self.directory} cannot be read "
                                 f"({reason(e)}){hint}") from e
    return step, restored

  def restore_latest(self, *, params: Any, opt_state: Any) -> Restored | None:
    """The newest checkpoint that restores on every process, or None when there is none.

    Newer steps that do not restore are warned about (one line each: step and reason), moved
    aside by process 0 and listed in `Restored.skipped`. Raises CheckpointUnreadable (and moves
    nothing: shapes that do not fit the run are more likely a changed config than damage) when
    no kept step restores."""
    self._mgr.reload()  # pick up steps written by an earlier process
    steps = self.all_steps()
    if not steps:
      return None
    log.info("restoring the latest checkpoint (of steps %s) from %s", steps, self.directory)
    restored, failures = first_restorable(
      steps, lambda s: self.restore(s, params=params, opt_state=opt_state))
    for step, why in failures.items():
      log.warning("checkpoint step %d in %s cannot be restored: %s", step, self.directory, why)
    if restored is None:
      raise CheckpointUnreadable(
        f"no checkpoint in {self.directory} can be restored ("
        + "; ".join(f"step {s}: {failures[s]}" for s in sorted(failures, reverse=True))
        + "); nothing was moved: fix or move those step directories, or use another workdir")
    skipped = tuple(sorted(failures, reverse=True))
    self._set_aside(skipped)
    return dataclasses.replace(restored, skipped=skipped)

  def _set_aside(self, steps: Sequence[int]) -> None:
    """Process 0 renames each step directory to `<step>.unreadable[.k]`; all processes wait."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        moved = move_aside(str(self._step_dir(step)))
        log.warning("checkpoint step %d moved aside to %s", step, moved)
    distributed.sync("checkpoints:set_aside")
    self._mgr.reload()  # the moved steps are gone from the manager's list

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _jsonable(v: Any) -> Any:
  """Plain JSON types for `extra` (numpy/jax scalars and arrays become numbers and lists)."""
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, list | tuple):
    return [_jsonable(x) for x in v]
  if isinstance(v, jax.Array | np.ndarray | np.generic):
    return _jsonable(np.asarray(v).tolist())
  if isinstance(v, float) and not math.isfinite(v):
    return None  # strict JSON has no NaN/inf
  return v


def reason(e: BaseException, limit: int = 240) -> str:
  """One line saying why: 'TypeName: first words of the message' (TensorStore's run long)."""
  text = " ".join(str(e).split())
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def move_aside(step_dir: str) -> str:
  """Renames `step_dir` (local or gs://) to `<step_dir>.unreadable` (`.unreadable.2`, ... when
  taken); returns the new path. Nothing is deleted."""
  src = epath.Path(step_dir)
  dst = epath.Path(step_dir + UNREADABLE_SUFFIX)
  k = 1
  while dst.exists():
    k += 1
    dst = epath.Path(f"{step_dir}{UNREADABLE_SUFFIX}.{k}")
  src.rename(dst)
  return os.fspath(dst)


def gather_processes(x: np.ndarray) -> np.ndarray:
  """[P, *x.shape]: every process's `x`, stacked (a collective; one process: `x[None]`)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def first_restorable(steps: Sequence[int], try_restore: Callable[[int], Any],
                     gather: Callable[[np.ndarray], np.ndarray] = gather_processes
                     ) -> tuple[Any | None, dict[int, str]]:
  """(the result of `try_restore` for the newest step that restores on every process, or None;
  {newer step that did not: why}). Every process calls it at the same point (a collective).

  The processes go through the steps that all of them list, newest first, in lockstep: each
  tries the step, then they gather one ok flag each. The first step that every process restored
  is the one all of them return; a step that failed anywhere is skipped everywhere (its reason
  reads 'process p failed' where this process's own try succeeded). `gather` stacks one array
  per process ([P, ...]); tests replace it to run the processes as threads.
  """
  mine = np.asarray(sorted({int(s) for s in steps}, reverse=True), np.int32)
  width = int(gather(np.asarray([len(mine)], np.int32)).max())
  padded = np.full((width,), -1, np.int32)
  padded[: len(mine)] = mine
  listed = gather(padded)  # [P, width]
  common = [int(s) for s in listed[0] if s >= 0 and all(s in row for row in listed[1:])]
  failures: dict[int, str] = {}
  for step in common:
    try:
      result, why = try_restore(step), None
    except Exception as e:  # noqa: BLE001 - any damage: the next older step is tried
      result, why = None, reason(e)
    oks = gather(np.asarray([why is None], np.int32))[:, 0]
    if oks.all():
      return result, failures
    failed = [p for p, ok in enumerate(oks) if not ok]
    failures[step] = why or f"it did not restore on process {', '.join(map(str, failed))}"
  return None, failures


# orbax's per-array read coroutines; the ones a failed restore leaves behind are collected later.
_ABANDONED_READS = ("_read_array_index_and_device_put",)


def _frame_names(tb) -> list[str]:
  """The function names of a traceback's frames, outermost first."""
  return [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]


def _is_late_read_callback(exc_type, exc_value, tb) -> bool:
  """The error of a TensorStore read that finished after the failed restore's event loop
  closed: its done-callback's `loop.call_soon_threadsafe` raised in TensorStore's thread."""
  if exc_type is not RuntimeError or str(exc_value) != "Event loop is closed":
    return False
  return _frame_names(tb)[-2:] == ["call_soon_threadsafe", "_check_closed"]


class _AbandonedReadTask(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for a read task of a failed restore
  (logged with its traceback when the task is collected); other asyncio errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or "exception was never retrieved" not in str(record.msg):
      return True
    return not any(name in _ABANDONED_READS for name in _frame_names(exc.__traceback__))


_ABANDONED_TASK_FILTER = _AbandonedReadTask()


def quiet_abandoned_reads() -> None:
  """Drops the reports of the reads a failed restore left in flight. When one array of a
  damaged step fails, orbax raises at once and closes its event loop; sibling reads of the same
  step fail or finish later, after the step was already named in one line: never-awaited read
  coroutines are reported through sys.unraisablehook ("Exception ignored in <coroutine>") and
  failed read tasks through asyncio's logger ("Task exception was never retrieved") when
  collected, and a read finishing on the closed loop prints its callback's RuntimeError from
  TensorStore's thread through sys.excepthook. Other reports pass through. Idempotent."""
  logging.getLogger("asyncio").addFilter(_ABANDONED_TASK_FILTER)  # a no-op when already added
  if getattr(sys.unraisablehook, "_fipo_quiet_reads", False):
    return
  previous, previous_excepthook = sys.unraisablehook, sys.excepthook

  def hook(unraisable) -> None:
    name = getattr(unraisable.object, "__qualname__", "") or ""
    if any(name.endswith(n) for n in _ABANDONED_READS) or _is_late_read_callback(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
      log.debug("abandoned checkpoint read failed: %s", unraisable.exc_value)
      return
    previous(unraisable)

  def excepthook(exc_type, exc_value, tb) -> None:
    if _is_late_read_callback(exc_type, exc_value, tb):
      log.debug("abandoned checkpoint read finished on a closed event loop")
      return
    previous_excepthook(exc_type, exc_value, tb)

  hook._fipo_quiet_reads = True
  sys.unraisablehook = hook
  sys.excepthook = excepthook


def exit_if_unreadable(error: object, code: int = 2) -> None:
  """Ends the process at once (os._exit) when `error` is a CheckpointUnreadable, after the
  caller printed its one line: the failed restore leaves TensorStore reads in flight whose
  callbacks would print tracebacks on the closed event loop at interpreter exit."""
  if isinstance(error, CheckpointUnreadable):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
