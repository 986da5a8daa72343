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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fipo_jax import paths

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

  def restore(self, step: int, *, params: Any, opt_state: Any) -> Restored:
    """Restores `step` into the shapes/dtypes/shardings of the `params`/`opt_state` targets."""
    args = ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_tree(params)),
      opt_state=ocp.args.StandardRestore(abstract_tree(opt_state)),
      extra=ocp.args.JsonRestore(),
    )
    out = self._mgr.restore(int(step), args=args)
    return Restored(step=int(step), params=out["params"], opt_state=out["opt_state"],
                    extra=dict(out["extra"] or {}))

  def restore_params(self, *, params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of `step` (default: the latest) without reading the optimizer state,
    e.g. for eval or export. Raises FileNotFoundError if there is no checkpoint."""
    self._mgr.reload()
    step = self._mgr.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self._mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_tree(params))))
    return step, out["params"]

  def restore_latest(self, *, params: Any, opt_state: Any) -> Restored | None:
    """The latest complete checkpoint, or None when the directory has none."""
    self._mgr.reload()  # pick up steps written by an earlier process
    step = self._mgr.latest_step()
    if step is None:
      return None
    log.info("restoring checkpoint step %d from %s", step, self.directory)
    return self.restore(step, params=params, opt_state=opt_state)

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
