"""PNG plots of one run's metrics (WORKDIR/plots) and the drawing helpers `fipo_jax.compare` shares.

  plot_history(history, "runs/fipo/plots", run_name="fipo")   # -> the PNGs written

One figure per topic, every one titled with the run's name, legends outside the data:
- accuracy.png: train/acc_mean and the held-out eval/acc_mean;
- response_length.png: mean and median, the q25-q75 band, min and max;
- influence_weights.png: one small panel per mini-batch (`.../mbK` keys), raw and clipped
  weights on a shared y axis with a line at 1, so mini-batch 1's constant 1.0 is visible;
- clip_fractions.png: PPO and FIPO clip fractions, truncated responses;
- overview.png: the four above on one page (influence weights as the step means).
Matplotlib runs on the Agg backend; every file is written whole through `fipo_jax.paths`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fipo_jax import paths

IW, IW_RAW = "actor/influence_weights_mean", "actor/influence_weights_mean_raw"
CLIP_KEYS = (
  "actor/pg_clipfrac",
  "actor/pg_clipfrac_lower",
  "actor/IW_upper_clip_ratio",
  "actor/IW_lower_clip_ratio",
  "actor/IW_overall_clip_ratio",
  "response_length/clip_ratio",
)
LEN = "response_length/"
FILES = ("accuracy", "response_length", "influence_weights", "clip_fractions", "overview")


def pyplot():
  """matplotlib.pyplot on the Agg backend (imported here: heavy, and only needed to plot)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` over the rows that log it with a finite value."""
  pts = [
    (int(r["step"]), float(r[key]))
    for r in history
    if is_number(r.get(key)) and math.isfinite(r[key])
  ]
  return [s for s, _ in pts], [v for _, v in pts]


def mini_batches(history: Sequence[Mapping[str, Any]]) -> list[int]:
  """The mini-batch indices K of the `actor/influence_weights_mean[_raw]/mbK` keys, sorted."""
  pat = re.compile(rf"^(?:{re.escape(IW)}|{re.escape(IW_RAW)})/mb(\d+)$")
  return sorted({int(m.group(1)) for r in history for k in r if (m := pat.match(k))})


def legend_outside(ax, **kw) -> None:
  """The axis legend to the right of the data (never over it); nothing when nothing is drawn."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kw)


def _legend_or_note(ax, drew: bool) -> None:
  if drew:
    legend_outside(ax)
  else:
    no_data(ax)


def no_data(ax, text: str = "not logged") -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def style(ax, title: str, ylabel: str, xlabel: str = "RL step") -> None:
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def save(fig, path: str, *, dpi: int = 90) -> str:
  """Writes `fig` as a PNG (atomically: a viewer never sees half a file) and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # keeps outside legends
  pyplot().close(fig)
  paths.write_bytes(path, buf.getvalue())
  return path


def _line(ax, history, key, label=None, **kw) -> bool:
  steps, values = series(history, key)
  if steps:
    ax.plot(
      steps, values, label=label or key, marker="o" if len(steps) < 30 else None, markersize=3, **kw
    )
  return bool(steps)


def draw_accuracy(ax, history) -> None:
  drew = _line(ax, history, "train/acc_mean", "train (all sampled responses)")
  drew |= _line(ax, history, "eval/acc_mean", "held-out (eval/acc_mean)")
  style(ax, "Accuracy", "accuracy")
  _legend_or_note(ax, drew)


def draw_response_length(ax, history) -> None:
  steps, mean = series(history, LEN + "mean")
  if not steps:
    style(ax, "Response length", "tokens")
    return no_data(ax)
  band = [
    (s, lo, hi)
    for s, lo, hi in zip(
      *series(history, LEN + "q25"), series(history, LEN + "q75")[1], strict=False
    )
  ]
  line = ax.plot(
    steps, mean, label="mean", lw=1.8, marker="o" if len(steps) < 30 else None, markersize=3
  )[0]
  if band:
    ax.fill_between(
      [b[0] for b in band],
      [b[1] for b in band],
      [b[2] for b in band],
      color=line.get_color(),
      alpha=0.2,
      lw=0,
      label="q25-q75",
    )
  _line(ax, history, LEN + "median", "median", ls="--", lw=1)
  for key, ls in (("min", ":"), ("max", "-.")):
    s, v = series(history, LEN + key)
    if s:
      ax.plot(s, v, ls=ls, lw=1, color="0.5", label=key)
  style(ax, "Response length (training rollouts)", "tokens")
  legend_outside(ax)


def draw_clip_fractions(ax, history) -> None:
  drew = False
  for key in CLIP_KEYS:
    drew |= _line(ax, history, key)
  style(ax, "Clip fractions", "fraction")
  _legend_or_note(ax, drew)


def draw_iw(ax, history, clipped_key: str, raw_key: str, title: str) -> bool:
  """Raw and clipped influence weights of one mini-batch (or the step mean) on `ax`."""
  drew = _line(ax, history, raw_key, "raw", lw=1.2)
  drew |= _line(ax, history, clipped_key, "clipped", lw=1.2, ls="--")
  if drew:
    ax.axhline(1.0, color="0.6", lw=0.8, zorder=0)
  style(ax, title, "weight")
  return drew


def draw_iw_mean(ax, history) -> None:
  if draw_iw(ax, history, IW, IW_RAW, "FIPO influence weights (step mean)"):
    legend_outside(ax)
  else:
    no_data(ax, "no influence weights logged\n(a loss without Future-KL)")


def influence_figure(history, run_name: str):
  """One small panel per mini-batch, raw and clipped weights, shared y axis."""
  plt = pyplot()
  mbs = mini_batches(history)
  if not mbs:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    draw_iw_mean(ax, history)
    fig.suptitle(f"{run_name}: FIPO influence weights")
    fig.tight_layout()
    return fig
  cols = min(4, len(mbs))
  rows = math.ceil(len(mbs) / cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), sharey=True, squeeze=False
  )
  for ax, k in zip(axes.flat, mbs, strict=False):
    draw_iw(ax, history, f"{IW}/mb{k}", f"{IW_RAW}/mb{k}", f"mini-batch {k}")
  for ax in list(axes.flat)[len(mbs) :]:
    ax.set_visible(False)
  for ax in axes[:, 1:].flat:
    ax.set_ylabel("")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.suptitle(f"{run_name}: FIPO influence weights per mini-batch (mean over tokens)")
  fig.tight_layout()
  fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
  return fig


def plot_history(
  history: Sequence[Mapping[str, Any]], out_dir: str, *, run_name: str = "run"
) -> list[str]:
  """Writes FILES (as PNGs) to `out_dir`; a topic without data says so instead of failing."""
  plt = pyplot()
  written = []
  single = (
    ("accuracy", draw_accuracy),
    ("response_length", draw_response_length),
    ("clip_fractions", draw_clip_fractions),
  )
  for stem, draw in single:
    fig, ax = plt.subplots(figsize=(8, 4))
    draw(ax, history)
    ax.set_title(f"{run_name}: {ax.get_title()}", fontsize=11)
    fig.tight_layout()
    written.append(save(fig, paths.join(out_dir, f"{stem}.png")))
  written.append(
    save(influence_figure(history, run_name), paths.join(out_dir, "influence_weights.png"))
  )
  fig, axes = plt.subplots(2, 2, figsize=(15, 8))
  for ax, draw in zip(
    axes.flat, (draw_accuracy, draw_response_length, draw_iw_mean, draw_clip_fractions), strict=True
  ):
    draw(ax, history)
  fig.suptitle(f"{run_name}: overview", fontsize=13)
  fig.tight_layout()
  written.append(save(fig, paths.join(out_dir, "overview.png")))
  return written
