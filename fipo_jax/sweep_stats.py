"""Seed statistics of a sweep (`python -m fipo_jax.sweep`): per-run numbers, mean and 95% CI
over seeds, the cell table and the overlay plots with bands.

  cells = {"rl.loss_mode=fipo": [run, run, run], "rl.loss_mode=dapo": [...]}  # compare.Run
  text = table(cells, threshold=0.8)          # markdown, one row per cell
  files = write_figures(cells, "out/")        # mean line and 95% band per cell

The interval is Student's t over seeds: mean +- t(0.975, n - 1) * sd / sqrt(n) (sd with n - 1);
with one seed there is no interval. `steps to threshold` is the first eval step whose
eval/acc_mean reaches the threshold, averaged over the seeds that reach it (the cell says how
many did). `length growth` is the last eval's eval/response_length/mean over the first's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fipo_jax import compare, paths, plots

EVAL_ACC, EVAL_LEN = "eval/acc_mean", "eval/response_length/mean"
# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion around z (error < 1e-3).
_T975 = (
  12.706,
  4.303,
  3.182,
  2.776,
  2.571,
  2.447,
  2.365,
  2.306,
  2.262,
  2.228,
  2.201,
  2.179,
  2.160,
  2.145,
  2.131,
  2.120,
  2.110,
  2.101,
  2.093,
  2.086,
  2.080,
  2.074,
  2.069,
  2.064,
  2.060,
  2.056,
  2.052,
  2.048,
  2.045,
  2.042,
)
_Z975 = 1.959964
# (file stem, metric, y label) of the overlay figures.
FIGURES = (
  ("heldout_acc", EVAL_ACC, "held-out accuracy"),
  ("heldout_length", EVAL_LEN, "held-out mean response length (tokens)"),
  ("train_acc", "train/acc_mean", "train accuracy"),
  ("response_length", "response_length/mean", "train mean response length (tokens)"),
)


def t975(df: int) -> float:
  """The 0.975 quantile of Student's t with `df` degrees of freedom."""
  if df < 1:
    raise ValueError(f"df must be >= 1, got {df}")
  if df <= len(_T975):
    return _T975[df - 1]
  z = _Z975
  return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, CI half-width, n) of the finite values; half-width nan below 2 values."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  if v.size == 1:
    return float(v[0]), float("nan"), 1
  return float(v.mean()), t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size), v.size


def run_summary(run: compare.Run, threshold: float) -> dict[str, Any]:
  """One run's final and best held-out accuracy, steps to `threshold`, length growth."""
  steps, acc = plots.series(run.history, EVAL_ACC)
  _, lens = plots.series(run.history, EVAL_LEN)
  reached = [s for s, a in zip(steps, acc, strict=True) if a >= threshold]
  return {
    "final": acc[-1] if acc else None,
    "best": max(acc) if acc else None,
    "steps_to": reached[0] if reached else None,
    "growth": lens[-1] / lens[0] if len(lens) >= 2 and lens[0] > 0 else None,
    "first_acc": acc[0] if acc else None,
    "first_len": lens[0] if lens else None,
    "last_len": lens[-1] if lens else None,
  }


def _fmt(m: float, h: float, n: int, digits: int) -> str:
  if n == 0:
    return "-"
  if math.isnan(h):
    return f"{m:.{digits}f}"
  return f"{m:.{digits}f} ± {h:.{digits}f}"


def cell_rows(cells: Mapping[str, Sequence[compare.Run]], threshold: float) -> list[dict]:
  """Per cell: n seeds and (mean, half-width, n) of each summary column."""
  out = []
  for name, runs in cells.items():
    s = [run_summary(r, threshold) for r in runs]
    col = lambda k, s=s: mean_ci([x[k] for x in s])
    out.append(
      {
        "cell": name,
        "seeds": len(runs),
        "final": col("final"),
        "best": col("best"),
        "steps_to": col("steps_to"),
        "growth": col("growth"),
        "first_len": col("first_len"),
        "last_len": col("last_len"),
        "reached": sum(x["steps_to"] is not None for x in s),
        "runs": s,
      }
    )
  return out


def table(cells: Mapping[str, Sequence[compare.Run]], threshold: float) -> str:
  """The markdown table: per cell final and best held-out accuracy, steps to the threshold and
  length growth, each mean ± 95% CI over seeds."""
  head = [
    "cell",
    "seeds",
    "final eval/acc_mean",
    "best eval/acc_mean",
    f"steps to acc >= {threshold:g} (reached)",
    "eval length first -> last",
    "length growth (last/first)",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in cell_rows(cells, threshold):
    lines.append(
      "| "
      + " | ".join(
        [
          r["cell"],
          str(r["seeds"]),
          _fmt(*r["final"], 3),
          _fmt(*r["best"], 3),
          f"{_fmt(*r['steps_to'], 1)} ({r['reached']}/{r['seeds']})",
          f"{_fmt(*r['first_len'], 1)} -> {_fmt(*r['last_len'], 1)}",
          _fmt(*r["growth"], 2),
        ]
      )
      + " |"
    )
  return "\n".join(lines)


def band(runs: Sequence[compare.Run], key: str) -> tuple[np.ndarray, ...]:
  """(steps, mean, lo, hi) of `key` over the runs at each step some run logs it; the 95% t
  band where 2 or more runs have the step (else lo = hi = mean)."""
  by_step: dict[int, list[float]] = {}
  for run in runs:
    for s, v in zip(*plots.series(run.history, key), strict=True):
      by_step.setdefault(s, []).append(v)
  steps = np.asarray(sorted(by_step), np.float64)
  stats = [mean_ci(by_step[int(s)]) for s in steps]
  mean = np.asarray([m for m, _, _ in stats])
  half = np.asarray([0.0 if math.isnan(h) else h for _, h, _ in stats])
  return steps, mean, mean - half, mean + half


def write_figures(cells: Mapping[str, Sequence[compare.Run]], out_dir: str) -> list[str]:
  """One PNG per FIGURES entry: a mean line per cell over its seeds, the 95% band shaded."""
  plt = plots.pyplot()
  colors = compare.styles(len(cells))
  written = []
  for stem, key, ylabel in FIGURES:
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    drew = False
    for (name, runs), st in zip(cells.items(), colors, strict=True):
      steps, mean, lo, hi = band(runs, key)
      if steps.size == 0:
        continue
      drew = True
      marker = "o" if steps.size < 15 else None
      ax.plot(
        steps,
        mean,
        color=st["color"],
        ls=st["ls"],
        lw=1.7,
        marker=marker,
        markersize=3,
        label=f"{name} (n={len(runs)})",
      )
      ax.fill_between(steps, lo, hi, color=st["color"], alpha=0.2, lw=0)
    if not drew:
      plots.no_data(ax)
    plots.style(ax, f"{key}: mean over seeds, 95% t band", ylabel)
    plots.legend_outside(ax)
    fig.tight_layout()
    written.append(plots.save(fig, paths.join(out_dir, f"{stem}.png")))
  return written
