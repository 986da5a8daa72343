"""Metric writers: WORKDIR/metrics.jsonl, TensorBoard event files, W&B and PNG plots.

  writer = writer_for(rc, workdir, is_primary=jax.process_index() == 0)  # rc.metrics.backends
  writer.write(step, {"train/acc_mean": 0.4, "actor/pg_clipfrac": 0.01, ...})
  writer.close()

- metrics.jsonl ("jsonl"): one JSON object per `write`, `{"step": step, ...}`; non-finite values
  are written as null (strict JSON); non-scalar values are dropped (logged once).
- TensorBoard ("tensorboard"): scalars under WORKDIR/tensorboard (tensorboardX), non-finite
  values skipped. tensorboardX can only write local files (gs:// would need
  google-cloud-storage and still fails), so for a remote workdir the event files are written to
  a local temporary directory and copied to WORKDIR/tensorboard at every plot and on close.
- Weights & Biases ("wandb"): `fipo_jax.wandb_backend` (run id kept in the workdir, resumed).
- Plots (`fipo_jax.plots`, always) in WORKDIR/plots, redrawn every `plot_every` writes and on
  close, titled with the run's name; `python -m fipo_jax.compare` overlays several runs.
Only the primary process writes; on the others every method is a no-op. Resuming appends to
the existing metrics.jsonl; `truncate_after(step)` drops entries newer than the restored step.
Every file goes through `fipo_jax.paths`, so WORKDIR may be `gs://bucket/run` (a bucket object
cannot be appended to: there metrics.jsonl is rewritten whole at every write).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fipo_jax import config_schema, estimators, paths, plots, wandb_backend

if TYPE_CHECKING:
  from fipo_jax import config as config_lib

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def response_length_metrics(
  lengths: Any, max_response_length: int, prefix: str = "response_length/"
) -> dict[str, float]:
  """verl's `response_length/{mean,min,max,median,q25,q75,clip_ratio}` of response lengths."""
  stats = estimators.length_stats(lengths, max_response_length)
  return {prefix + k: v for k, v in stats.items()}


def advantage_token_mean(advantages: np.ndarray, response_lengths: np.ndarray,
                         arrays: Mapping[str, np.ndarray] | None = None) -> float:
  """The token-mean advantage of a batch (`critic/advantages/mean`).

  `arrays` {response_mask, advantages}: this process's response layout, when it holds every
  row (one process); else the [B] advantages and response lengths (clipped at T) every host
  has give the global number.
  """
  if arrays is not None:
    mask = arrays["response_mask"]
    return float(np.sum(arrays["advantages"] * mask) / max(mask.sum(), 1.0))
  lengths = np.asarray(response_lengths, np.float64)
  return float(np.sum(np.asarray(advantages, np.float64) * lengths) / max(lengths.sum(), 1.0))


def to_scalar(value: Any) -> float | int | bool | str | None:
  """A JSON-able scalar for `value` (numpy/jax 0-d or size-1 arrays included); None if the
  value is not a scalar."""
  if isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value
  try:
    arr = np.asarray(value)
  except Exception:  # noqa: BLE001 - anything unconvertible is simply not a scalar
    return None
  if arr.size != 1 or arr.dtype.kind not in "biuf":
    return None
  return arr.reshape(()).item()


class MetricsWriter:
  """Writes one row of metrics per step to its backends (jsonl, TensorBoard, an optional W&B
  logger) and to periodic PNG plots titled `run_name`."""

  def __init__(
    self,
    workdir: str,
    *,
    is_primary: bool = True,
    plot_every: int = 5,
    jsonl: bool = True,
    tensorboard: bool = True,
    plots: bool = True,
    wandb: wandb_backend.WandbLogger | None = None,
    run_name: str | None = None,
  ):
    self.workdir = workdir
    self.is_primary = is_primary
    self.plot_every = max(1, plot_every)
    self.path = paths.join(workdir, METRICS_FILE)
    self.plot_dir = paths.join(workdir, "plots")
    self.tensorboard_dir = paths.join(workdir, "tensorboard") if tensorboard else None
    self.run_name = run_name or wandb_backend.run_name(workdir)
    self.history: list[dict[str, Any]] = []
    self._jsonl = jsonl
    self._writes = 0
    self._dropped: set[str] = set()
    self._tb = None
    self._tb_local: str | None = None  # a local mirror of tensorboard_dir (remote workdirs)
    self._plots = plots
    self.wandb = wandb if is_primary else None
    self._wandb_location = wandb.location if self.wandb is not None else None
    if not is_primary:
      return
    paths.makedirs(workdir)
    self.history = read_metrics(self.path) if jsonl and paths.exists(self.path) else []
    if tensorboard:
      logdir = self.tensorboard_dir
      if paths.is_remote(logdir):
        logdir = self._tb_local = tempfile.mkdtemp(prefix="fipo_jax_tensorboard_")
      self._tb = _tensorboardx().SummaryWriter(logdir=logdir)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Records `metrics` at `step`; returns the row written (empty on non-primary processes)."""
    if not self.is_primary:
      return {}
    row: dict[str, Any] = {"step": int(step)}
    for key, value in metrics.items():
      if key == "step":
        continue
      scalar = to_scalar(value)
      if scalar is None:
        if key not in self._dropped:
          self._dropped.add(key)
          log.warning("metric %r is not a scalar (%s); not written", key, type(value).__name__)
        continue
      row[key] = scalar
    self.history.append(row)
    if self._jsonl:
      self._append_jsonl(row)
    if self.wandb is not None:
      self.wandb.log(row["step"], row)
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and _is_number(value) and math.isfinite(value):
          self._tb.add_scalar(key, value, global_step=row["step"])
    self._writes += 1
    if self._writes % self.plot_every == 0:
      if self._plots:
        self.plot()
      self.flush()
    return row

  def truncate_after(self, step: int) -> None:
    """Drops rows with step > `step` (after resuming from an older checkpoint)."""
    if not self.is_primary:
      return
    keep = [r for r in self.history if r["step"] <= step]
    if len(keep) != len(self.history):
      self.history = keep
      if self._jsonl:
        paths.write_text(self.path, _jsonl(keep))  # atomic locally

  def plot(self) -> list[str]:
    """Redraws the PNGs from the history; returns the files written."""
    if not self.is_primary or not self.history:
      return []
    try:
      return plots.plot_history(self.history, self.plot_dir, run_name=self.run_name)
    except Exception as e:  # noqa: BLE001 - a plotting failure must never stop training
      log.warning("plotting failed: %s", e)
      return []

  def flush(self) -> None:
    """Flushes TensorBoard (and copies its files to a remote workdir)."""
    if self._tb is not None:
      self._tb.flush()
      self._sync_tensorboard()

  def close(self) -> None:
    if not self.is_primary:
      return
    if self._plots:
      self.plot()
    if self.wandb is not None:
      self.wandb.close()
      self.wandb = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._sync_tensorboard()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb_local = None

  def outputs(self, checkpoint_dir: str) -> str:
    """`outputs_summary` of this writer's backends."""
    return outputs_summary(
      self.workdir,
      checkpoint_dir,
      jsonl=self._jsonl,
      tensorboard=self.tensorboard_dir is not None,
      wandb=self._wandb_location,
    )

  def _append_jsonl(self, row: dict[str, Any]) -> None:
    if paths.is_remote(self.path):  # an object cannot be appended to: rewritten whole
      paths.write_text(self.path, _jsonl(self.history))
    else:
      with open(self.path, "a") as f:
        f.write(_jsonl([row]))

  def _sync_tensorboard(self) -> None:
    if self._tb_local is None:
      return
    try:
      paths.upload(self._tb_local, self.tensorboard_dir)
    except OSError as e:  # a transient bucket error must not stop training; retried next time
      log.warning("copying TensorBoard files to %s failed: %s", self.tensorboard_dir, e)


def writer_for(rc: config_lib.RunConfig, workdir: str, *, is_primary: bool) -> MetricsWriter:
  """The trainer's writer: `rc.metrics.backends`, W&B (process 0 only) logging the full
  validated config, plots titled with metrics.wandb_name or the workdir's name."""
  m = rc.metrics
  name = m.wandb_name or wandb_backend.run_name(workdir)
  wandb = None
  if is_primary and "wandb" in m.backends:
    wandb = wandb_backend.WandbLogger(workdir, m, config=config_schema.as_dict(rc))
  return MetricsWriter(
    workdir,
    is_primary=is_primary,
    jsonl="jsonl" in m.backends,
    tensorboard="tensorboard" in m.backends,
    wandb=wandb,
    run_name=name,
  )


def progress_postfix(history: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """The progress bar's fields: the last step's train accuracy and the last eval accuracy seen
  (evals run every `eval_every` steps; a field with no value yet is left out, never 'nan')."""
  out = {}
  last = history[-1] if history else {}
  if _is_number(last.get("train/acc_mean")) and math.isfinite(last["train/acc_mean"]):
    out["acc"] = f"{last['train/acc_mean']:.2f}"
  for row in reversed(history):
    value = row.get("eval/acc_mean")
    if _is_number(value) and math.isfinite(value):
      out["eval"] = f"{value:.2f}"
      break
  return out


def outputs_summary(
  workdir: str,
  checkpoint_dir: str,
  *,
  tensorboard: bool = True,
  jsonl: bool = True,
  wandb: str | None = None,
) -> str:
  """The lines a run ends with: where its metrics, plots, TensorBoard logs, W&B run (`wandb`:
  its URL, or its local directory offline) and checkpoints are."""
  workdir = paths.absolute(workdir)
  rows = [("metrics", paths.join(workdir, METRICS_FILE))] if jsonl else []
  rows.append(("plots", paths.join(workdir, "plots") + "/"))
  if tensorboard:
    rows.append(("tensorboard", paths.join(workdir, "tensorboard") + "/"))
  if wandb:
    rows.append(("wandb", wandb))
  rows.append(("checkpoints", checkpoint_dir.rstrip("/") + "/"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(["outputs:", *(f"  {name:<{width}}  {path}" for name, path in rows)])


def _tensorboardx():
  """tensorboardX, imported as where torch is not installed: its writer imports torch when it
  can, only to accept torch tensors (we log floats), which costs about 2 CPU-s at every start."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, as without torch
  try:
    import tensorboardX  # noqa: PLC0415 (optional at import time of this module)
  finally:
    if blocked:
      del sys.modules["torch"]
  return tensorboardX


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl (null read back as NaN); a torn last line is ignored."""
  rows = []
  with paths.open_file(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # an interrupted write
      if isinstance(row, dict) and "step" in row:
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
  return rows


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
  return "".join(json.dumps(_finite_or_none(r), allow_nan=False) + "\n" for r in rows)


def _finite_or_none(row: Mapping[str, Any]) -> dict[str, Any]:
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
