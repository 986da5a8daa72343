"""python -m fipo_jax.compare: overlay PNGs of several runs and the printed table.

The runs are metrics.jsonl + config.json files shaped like a tiny_cpu FIPO run and a DAPO run
(the same metric names; DAPO logs no influence weights). The README's command runs verbatim
on them, its /tmp workdirs moved under tmp_path.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import fake_gcs
import numpy as np
import pytest

from fipo_jax import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = (
  "heldout_acc",
  "train_acc",
  "response_length",
  "clip_fractions",
  "influence_weights",
  "entropy",
)
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours
EVALS = {"fipo": {0: 0.5, 5: 0.8, 10: 0.7}, "dapo": {0: 0.5, 5: 0.6, 10: 0.9}}


def _rows(kind: str, steps: int = 10) -> list[dict]:
  """A run's metrics.jsonl rows: eval at 0, 5, 10; FIPO with per-mini-batch weights."""
  rows = []
  for s in range(steps + 1):
    row = {"step": s}
    if s in EVALS[kind]:
      row["eval/acc_mean"] = EVALS[kind][s]
    if s > 0:
      length = 10.0 + s if kind == "fipo" else 20.0
      row.update(
        {
          "train/acc_mean": 0.3 + 0.05 * s + (0.02 if kind == "dapo" else 0.0),
          "response_length/mean": length,
          "response_length/q25": length - 2,
          "response_length/q75": length + 3,
          "train/num_prompts_kept": 16,
          "actor/pg_clipfrac": 0.02 / s,
          "actor/pg_clipfrac_lower": 0.0,
          "response_length/clip_ratio": 0.01 * (s % 3),
          "actor/entropy": 0.2 - 0.01 * s,
        }
      )
      if kind == "fipo":
        row.update(
          {
            "actor/influence_weights_mean_raw": 1.0 - 0.01 * (-1) ** s,
            "actor/influence_weights_mean": 1.0,
            "actor/IW_upper_clip_ratio": 0.05,
            "actor/IW_lower_clip_ratio": 0.1,
          }
        )
    rows.append(row)
  return rows


def _write_run(workdir: pathlib.Path, kind: str) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(kind)))
  config = {
    "rl": {
      "loss_mode": kind,
      "n": 8,
      "train_batch_size": 16,
      "ppo_mini_batch_size": 4,
      "ppo_epochs": 1,
    }
  }
  (workdir / "config.json").write_text(json.dumps(config))
  return workdir


def _readme_compare_command() -> list[str]:
  text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
  (line,) = [
    ln.strip() for ln in text.splitlines() if ln.strip().startswith("python -m fipo_jax.compare ")
  ]
  return shlex.split(line)[3:]


def _png(path: pathlib.Path) -> np.ndarray:
  import matplotlib.image  # noqa: PLC0415

  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.int32)


def _has_colour(img: np.ndarray, rgb, min_pixels: int = 50) -> bool:
  return bool((np.abs(img - np.asarray(rgb)).max(axis=-1) <= 8).sum() >= min_pixels)


@pytest.mark.slow
def test_readme_command_on_a_fipo_and_a_dapo_run(tmp_path):
  argv = _readme_compare_command()
  assert argv[:2] == ["/tmp/fipo_tiny", "/tmp/dapo_tiny"] and "--out" in argv
  local = [str(tmp_path / a[len("/tmp/") :]) if a.startswith("/tmp/") else a for a in argv]
  _write_run(tmp_path / "fipo_tiny", "fipo")
  _write_run(tmp_path / "dapo_tiny", "dapo")
  proc = subprocess.run(
    [sys.executable, "-m", "fipo_jax.compare", *local],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split()[:3] == ["run", "loss", "steps"]
  fipo, dapo = (ln.split() for ln in lines[1:3])
  # run, loss, steps, final (step), best (step), mean length over the last 10 steps (1..10)
  assert fipo == [
    "fipo_tiny",
    "fipo",
    "10",
    "0.700",
    "(step",
    "10)",
    "0.800",
    "(step",
    "5)",
    "15.50",
  ]
  assert dapo == [
    "dapo_tiny",
    "dapo",
    "10",
    "0.900",
    "(step",
    "10)",
    "0.900",
    "(step",
    "10)",
    "20.00",
  ]
  out = pathlib.Path(local[local.index("--out") + 1])
  for stem in FIGURES:
    img = _png(out / f"{stem}.png")
    h, w, _ = img.shape
    assert w >= 500 and h >= 280, (stem, img.shape)
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50, stem  # not blank
    assert _has_colour(img, C0), stem  # the first run's line ...
    # ... and the second's (DAPO has no influence weights: its dotted "not logged" entry)
    assert _has_colour(img, C1, 5 if stem == "influence_weights" else 50), stem


def test_x_axes_and_smoothing(tmp_path):
  run = compare.load_run(str(_write_run(tmp_path / "f", "fipo")))
  assert compare.x_values(run, "rl_step")[7] == 7.0
  assert compare.x_values(run, "optimizer_step")[7] == 28.0  # 16 / 4 mini-batches x 1 epoch
  tokens = compare.x_values(run, "tokens")
  assert tokens[0] == 0.0  # the eval-only step 0 trained on nothing
  assert tokens[2] == (11.0 + 12.0) * 16 * 8  # response_length/mean x prompts kept x rl.n
  assert compare.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
  assert compare.smooth([1.0, 3.0], 1) == [1.0, 3.0]


def test_options_and_labels(tmp_path, capsys):
  a = _write_run(tmp_path / "a" / "run", "fipo")
  b = _write_run(tmp_path / "b" / "run", "dapo")
  files, text = compare.compare([str(a), str(b)], str(tmp_path / "o"), x="tokens", k=3, last=2)
  assert {os.path.basename(f) for f in files} == {f"{s}.png" for s in FIGURES}
  assert str(a) in text and str(b) in text  # same base name: told apart by the whole path
  row = text.splitlines()[1].split()
  assert row[-1] == "19.50"  # fipo's mean length over its last 2 steps (19 and 20 tokens)
  _, text = compare.compare([str(a), str(b)], str(tmp_path / "o"), labels=["FIPO", "DAPO"])
  assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["FIPO", "DAPO"]
  with pytest.raises(compare.CompareError, match="2 labels for 1 workdirs"):
    compare.compare([str(a)], str(tmp_path / "o"), labels=["x", "y"])


def test_gs_workdirs(tmp_path, monkeypatch):
  bucket = fake_gcs.install(tmp_path, monkeypatch)
  try:
    _write_run(bucket / "b" / "runs" / "fipo", "fipo")
    _write_run(bucket / "b" / "runs" / "dapo", "dapo")
    files, text = compare.compare(["gs://b/runs/fipo", "gs://b/runs/dapo"], "gs://b/cmp")
    assert all(f.startswith("gs://b/cmp/") for f in files)
    assert _png(bucket / "b" / "cmp" / "heldout_acc.png").std() > 20
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["fipo", "dapo"]
    assert not (tmp_path / "cwd" / "gs:").exists()
  finally:
    fake_gcs.clear_caches()


@pytest.mark.parametrize(
  "args, message",
  [
    (["{tmp}/missing", "--out", "{tmp}/o"], "no metrics.jsonl"),
    (["{tmp}/f", "--out", "{tmp}/o", "--x", "walltime"], "invalid choice"),
    (["{tmp}/f", "--out", "{tmp}/o", "--smooth", "0"], "must be >= 1"),
    (["{tmp}/f"], "required: --out"),
  ],
)
@pytest.mark.slow
def test_errors_are_one_line_exit_2(tmp_path, args, message):
  _write_run(tmp_path / "f", "fipo")
  proc = subprocess.run(
    [sys.executable, "-m", "fipo_jax.compare", *(a.format(tmp=tmp_path) for a in args)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
