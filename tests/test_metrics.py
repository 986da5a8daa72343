"""MetricsWriter: jsonl rows, TensorBoard events, PNG plots; NaN, missing keys, non-primary."""

import json
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import metrics, plots


def _read_tb_scalars(logdir):
  """{tag: [(step, value)]} from TFRecord event files (tensorboardX's own protos)."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  out = {}
  for name in sorted(os.listdir(logdir)):
    data = (logdir / name).read_bytes()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 16 + length
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _rows(path):
  return [json.loads(line) for line in open(path)]


def test_tensorboard_writer_starts_without_importing_torch(tmp_path):
  """tensorboardX's writer imports torch whenever it is installed; the trainer's does not (about
  2 CPU-s at every start), and torch stays importable afterwards."""
  code = ("import sys; from fipo_jax import metrics; "
          f"w = metrics.MetricsWriter({str(tmp_path)!r}, jsonl=False, plots=False); "
          "w.write(1, {'a': 1.0}); w.close(); imported = 'torch' in sys.modules; "
          "import importlib.util; print(imported, importlib.util.find_spec('torch') is None "
          "or importlib.import_module('torch') is not None)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
  assert _read_tb_scalars(tmp_path / "tensorboard") == {"a": [(1, 1.0)]}


def test_jsonl_tensorboard_and_plots(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), plot_every=100)  # plots on close
  w.write(0, {"eval/acc_mean": 0.25})  # eval-only row: other keys missing
  for step in range(1, 5):
    w.write(
      step,
      {
        "train/acc_mean": np.float32(0.1 * step),
        "actor/pg_clipfrac": jnp.asarray(0.01 * step),
        "actor/influence_weights_mean_raw": 1.0 + 0.01 * step,
        "actor/influence_weights_mean_raw/mb2": 1.0 + 0.02 * step,
        "actor/grad_norm": float("nan") if step == 2 else 1.5,
        "train/num_gen_batches": 2,
        "timing_s/gen": 0.5,
        "histogram": np.arange(3),
        "note": "ok",
      },
    )
  assert not (tmp_path / "plots").exists()  # not yet due (plot_every=100) ...
  w.close()  # ... but always drawn on close
  rows = _rows(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  assert rows[0] == {"step": 0, "eval/acc_mean": 0.25}
  assert rows[2]["actor/grad_norm"] is None  # NaN -> null (strict JSON)
  assert rows[3]["train/acc_mean"] == pytest.approx(0.3) and rows[3]["train/num_gen_batches"] == 2
  assert "histogram" not in rows[1] and rows[1]["note"] == "ok"
  assert os.listdir(tmp_path / "tensorboard")
  scalars = _read_tb_scalars(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["actor/grad_norm"]] == [1, 3, 4]  # NaN skipped
  assert scalars["eval/acc_mean"] == [(0, pytest.approx(0.25))]
  assert [v for _, v in scalars["train/acc_mean"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
  for stem in ("accuracy", "response_length", "influence_weights", "clip_fractions", "overview"):
    png = tmp_path / "plots" / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
  assert not [p for p in os.listdir(tmp_path / "plots") if ".tmp" in p]


def test_series_skips_nan_and_mini_batches_are_found():
  history = [
    {
      "step": 1,
      "actor/influence_weights_mean_raw": 1.0,
      "actor/influence_weights_mean_raw/mb2": 1.1,
      "actor/influence_weights_mean/mb1": 1.0,
    },
    {"step": 2, "actor/influence_weights_mean_raw": math.nan},
    {
      "step": 3,
      "actor/influence_weights_mean_raw": 1.2,
      "actor/influence_weights_mean_rawish/mb7": 5.0,
      "actor/ppo_kl/mb9": 0.1,
    },
  ]
  assert plots.series(history, "actor/influence_weights_mean_raw") == ([1, 3], [1.0, 1.2])
  assert plots.series(history, "missing") == ([], [])
  assert plots.mini_batches(history) == [1, 2]


def _history(num_mb=4, steps=6):
  """Rows shaped like a FIPO run's: the first mini-batch's weights are exactly 1."""
  rows = [{"step": 0, "eval/acc_mean": 0.5}]
  for s in range(1, steps + 1):
    row = {
      "step": s,
      "train/acc_mean": 0.1 * s,
      "response_length/mean": 10.0 + s,
      "response_length/q25": 8.0 + s,
      "response_length/q75": 12.0 + s,
      "actor/pg_clipfrac": 0.01 * s,
      "actor/influence_weights_mean": 1.0,
      "actor/influence_weights_mean_raw": 1.0 + 0.01 * s,
    }
    for k in range(1, num_mb + 1):
      row[f"actor/influence_weights_mean_raw/mb{k}"] = 1.0 if k == 1 else 1.0 + 0.03 * k * (-1) ** s
      row[f"actor/influence_weights_mean/mb{k}"] = 1.0 if k == 1 else 1.0 + 0.02 * (-1) ** s
    rows.append(row)
  return rows


def _outside(fig, ax, legend) -> bool:
  """The legend's box lies right of the axes' data area (it covers no data)."""
  fig.canvas.draw()
  r = fig.canvas.get_renderer()
  return legend.get_window_extent(r).x0 >= ax.get_window_extent(r).x1 - 1


@pytest.mark.parametrize("num_mb", [4, 8])
def test_influence_weights_one_panel_per_mini_batch(num_mb):
  fig = plots.influence_figure(_history(num_mb), "my_run")
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == [f"mini-batch {k}" for k in range(1, num_mb + 1)]
  assert "my_run" in fig._suptitle.get_text()
  mb1 = panels[0]
  labels = [line.get_label() for line in mb1.get_lines()]
  assert labels[:2] == ["raw", "clipped"]  # both drawn on mini-batch 1 (constant 1.0) ...
  assert set(mb1.get_lines()[0].get_ydata()) == {1.0}
  lo, hi = mb1.get_ylim()
  assert lo < 1.0 - 0.01 and hi > 1.0 + 0.01  # ... inside the panel, not on its edge
  assert all(ax.get_shared_y_axes().joined(mb1, ax) for ax in panels)  # one scale
  (legend,) = fig.legends
  assert (
    legend.get_window_extent(fig.canvas.get_renderer()).x0
    >= max(ax.get_window_extent().x1 for ax in panels) - 1
  )
  plots.pyplot().close(fig)


def test_per_run_figures_are_titled_and_legends_sit_outside(tmp_path, monkeypatch):
  plt = plots.pyplot()
  seen = []
  real_save = plots.save

  def spy(fig, path):
    seen.append((fig, path))
    for ax in fig.axes:
      if ax.get_legend() is not None:
        assert _outside(fig, ax, ax.get_legend()), (path, ax.get_title())
    return real_save(fig, path)

  monkeypatch.setattr(plots, "save", spy)
  files = plots.plot_history(_history(), str(tmp_path), run_name="fipo_7b")
  assert sorted(os.path.basename(f) for f in files) == sorted(f"{s}.png" for s in plots.FILES)
  for fig, path in seen:
    titles = [ax.get_title() for ax in fig.axes] + [
      fig._suptitle.get_text() if fig._suptitle else ""
    ]
    assert any("fipo_7b" in t for t in titles), path
  assert sum(ax.get_legend() is not None for fig, _ in seen for ax in fig.axes) >= 6
  plt.close("all")


def test_resume_appends_and_truncates(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False, plots=False)
  for step in range(1, 6):
    w.write(step, {"train/acc_mean": step / 10})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/acc')  # a write torn by a crash
  w2 = metrics.MetricsWriter(str(tmp_path), tensorboard=False, plots=False)
  assert [r["step"] for r in w2.history] == [1, 2, 3, 4, 5]
  w2.truncate_after(3)  # resumed from the step-3 checkpoint
  w2.write(4, {"train/acc_mean": 0.9})
  assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
  assert w2.history[-1]["train/acc_mean"] == 0.9


def test_non_primary_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path / "w"), is_primary=False)
  assert w.write(1, {"train/acc_mean": 1.0}) == {}
  w.truncate_after(0)
  assert w.plot() == []
  w.close()
  assert not (tmp_path / "w").exists()


def test_plot_with_no_matching_metrics(tmp_path):
  files = plots.plot_history([{"step": 1, "other": 1.0}], str(tmp_path))
  assert len(files) == 5 and all(os.path.getsize(f) > 0 for f in files)


def test_response_length_metrics_names():
  m = metrics.response_length_metrics([3, 8, 8, 1], max_response_length=8)
  assert m == {
    "response_length/mean": 5.0,
    "response_length/min": 1.0,
    "response_length/max": 8.0,
    "response_length/median": 5.5,
    "response_length/q25": 2.5,
    "response_length/q75": 8.0,
    "response_length/clip_ratio": 0.5,
  }
