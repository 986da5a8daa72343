"""Weights & Biases as a metrics backend: `metrics.backends` containing "wandb".

  pip install -e ".[wandb]"
  python -m fipo_jax.main --config configs/tiny_cpu.py --workdir /tmp/fipo_tiny \\
      --config.metrics.backends=jsonl,tensorboard,wandb --config.metrics.wandb_project=fipo

`fipo_jax.metrics.MetricsWriter` calls it on process 0 only (the others never import wandb).
- The run takes project, entity, name (default: the workdir's base name), group and tags from
  the `metrics` section, and logs the full validated run config once, when the process starts.
- Its id is kept in WORKDIR/wandb_run_id (through `fipo_jax.paths`, so a gs:// workdir works):
  a resumed trainer continues the same W&B run (`resume="allow"`). Steps redone after a resume
  from an older checkpoint are not sent again (W&B's steps only go forward); metrics.jsonl has
  the redone values.
- Scalars are logged at `step=` the RL step; non-finite values are left out, as in TensorBoard.
- Offline (`WANDB_MODE=offline`, how the tests run it) the run is written to WORKDIR/wandb/
  (`wandb sync WORKDIR/wandb/offline-run-*` uploads it later). wandb writes local files only:
  for a gs:// workdir they go to a local temporary directory, copied to WORKDIR/wandb on close.
- `close` ends wandb's service process (`wandb.teardown`): `finish` can return before the
  run's .wandb file is flushed. A run of the caller's own in the same process ends with it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import string
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fipo_jax import paths

if TYPE_CHECKING:
  from fipo_jax import config as config_lib

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


class WandbError(RuntimeError):
  """wandb could not start the run (not logged in, no network in online mode, bad entity)."""


def run_name(workdir: str) -> str:
  """A workdir's base name: /tmp/fipo_tiny -> fipo_tiny, gs://b/runs/x/ -> x."""
  return os.path.basename(os.fspath(workdir).rstrip("/")) or os.fspath(workdir)


class WandbLogger:
  """One W&B run per workdir: started (or resumed) on construction, finished by `close`."""

  def __init__(
    self, workdir: str, section: config_lib.MetricsSection, *, config: Mapping[str, Any]
  ):
    import wandb  # noqa: PLC0415 (the optional [wandb] extra)

    self.workdir = workdir
    paths.makedirs(workdir)
    id_path = paths.join(workdir, RUN_ID_FILE)
    resumed = paths.isfile(id_path)
    run_id = paths.read_text(id_path).strip() if resumed else _new_run_id()
    self._tmp = tempfile.mkdtemp(prefix="fipo_jax_wandb_") if paths.is_remote(workdir) else None
    try:
      self.run = wandb.init(
        project=section.wandb_project,
        entity=section.wandb_entity,
        name=section.wandb_name or run_name(workdir),
        group=section.wandb_group,
        tags=list(section.wandb_tags),
        id=run_id,
        resume="allow",
        dir=self._tmp or workdir,
        settings=wandb.Settings(console="off"),  # stdout stays the trainer's (tqdm)
      )
    except Exception as e:  # noqa: BLE001 - wandb raises many types; the user needs one line
      raise WandbError(
        f"metrics.backends has 'wandb' but wandb.init failed: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
        "(run `wandb login`, or set WANDB_MODE=offline)"
      ) from e
    self.run.config.update(dict(config), allow_val_change=True)  # once per process
    if not resumed:
      paths.write_text(id_path, run_id)
    self.resumed = resumed
    self._warned_old_step = False
    run_dir = os.path.dirname(self.run.dir)  # .../wandb/offline-run-<time>-<id>
    if paths.is_remote(workdir):
      run_dir = paths.join(workdir, "wandb", os.path.basename(run_dir))
    # Where to look: the run's page online, its directory offline (`wandb sync` uploads it).
    self.location = self.run.url or run_dir

  @property
  def run_id(self) -> str:
    return self.run.id

  def log(self, step: int, row: Mapping[str, Any]) -> None:
    """Logs the finite numbers of `row` at `step` (steps W&B already has are skipped)."""
    if step < self.run.step:
      if not self._warned_old_step:
        self._warned_old_step = True
        log.warning(
          "W&B run %s is at step %d; redone steps before it are not sent again",
          self.run.id,
          self.run.step,
        )
      return
    values = {k: v for k, v in row.items() if k != "step" and _finite_number(v)}
    self.run.log(values, step=int(step))

  def close(self) -> None:
    import wandb  # noqa: PLC0415

    self.run.finish()
    # finish() can return before wandb's service has flushed the run's .wandb file; ending
    # the service closes it, so the files are complete (and safe to copy) from here on.
    wandb.teardown()
    if self._tmp is not None:
      try:
        paths.upload(os.path.join(self._tmp, "wandb"), paths.join(self.workdir, "wandb"))
      except OSError as e:
        log.warning("copying W&B files to %s failed: %s", self.workdir, e)
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None


def _new_run_id() -> str:
  """8 lowercase letters and digits, the shape of W&B's own run ids."""
  return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _finite_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)
