"""What a run prints: no PyTorch notice, no orbax warning per save, a progress bar without 'nan',
and a closing list of where the outputs went."""

import logging
import math
import subprocess
import sys

import jax.numpy as jnp

from fipo_jax import checkpoints as ckpt_lib
from fipo_jax import metrics as metrics_lib

NAN = math.nan


def test_bar_shows_the_last_eval_and_never_nan():
  post = metrics_lib.progress_postfix
  assert post([]) == {}
  assert post([{"step": 1, "train/acc_mean": 0.5}]) == {"acc": "0.50"}  # no eval yet
  history = [
    {"step": 0, "eval/acc_mean": 0.25},
    {"step": 1, "train/acc_mean": 0.5, "eval/acc_mean": NAN},
    {"step": 2, "train/acc_mean": 0.625},
  ]
  assert post(history) == {"acc": "0.62", "eval": "0.25"}  # between evals: the last one
  history.append({"step": 3, "train/acc_mean": NAN, "eval/acc_mean": 0.75})
  assert post(history) == {"eval": "0.75"}  # an empty step has no accuracy to show


def test_outputs_summary_names_every_output(tmp_path):
  text = metrics_lib.outputs_summary("gs://b/run", "gs://b/run/checkpoints")
  assert text.splitlines() == [
    "outputs:",
    "  metrics      gs://b/run/metrics.jsonl",
    "  plots        gs://b/run/plots/",
    "  tensorboard  gs://b/run/tensorboard/",
    "  checkpoints  gs://b/run/checkpoints/",
  ]
  local = metrics_lib.outputs_summary("runs/x", str(tmp_path / "ck"), tensorboard=False)
  assert "tensorboard" not in local and "runs/x/metrics.jsonl" in local
  assert local.splitlines()[1].split()[1].startswith("/")  # absolute: valid from any cwd


def _stderr_of(code: str) -> str:
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  return proc.stderr


def test_no_pytorch_notice_without_torch():
  # sys.modules['torch'] = None makes transformers see no torch, as on a JAX-only install.
  hide = "import sys; sys.modules['torch'] = None; "
  assert "PyTorch was not found" in _stderr_of(hide + "import transformers")  # the notice
  assert "PyTorch was not found" not in _stderr_of(hide + "import fipo_jax, transformers")


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _saves_warn(tmp_path, name: str) -> bool:
  records = _Records()
  logging.getLogger("absl").addHandler(records)
  try:
    with ckpt_lib.CheckpointManager(str(tmp_path / name), keep=2) as mgr:
      mgr.save(
        1, params={"w": jnp.ones(2)}, opt_state={"m": jnp.zeros(2)}, metrics=None
      )  # a save between evals
  finally:
    logging.getLogger("absl").removeHandler(records)
  return any("tracked_metric" in m for m in records.messages)


def test_saves_without_eval_metrics_do_not_warn(tmp_path):
  assert not _saves_warn(tmp_path, "quiet")
  # The filter is what silences it: without it orbax warns at this save.
  logging.getLogger("absl").removeFilter(ckpt_lib._NOTICE_FILTER)
  try:
    assert _saves_warn(tmp_path, "loud")
  finally:
    logging.getLogger("absl").addFilter(ckpt_lib._NOTICE_FILTER)
