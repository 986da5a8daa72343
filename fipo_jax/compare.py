"""python -m fipo_jax.compare W1 W2 ... --out DIR: several runs on one set of figures.

  python -m fipo_jax.compare /tmp/fipo_tiny /tmp/dapo_tiny --out /tmp/fipo_vs_dapo \\
      [--x rl_step|optimizer_step|tokens] [--smooth K] [--last K] [--labels a,b]

Reads each workdir's metrics.jsonl and config.json (local or gs://, through `fipo_jax.paths`)
and writes overlay PNGs to DIR, one line per run labelled by its name (metrics.wandb_name, else
the workdir's base name; --labels overrides):
  heldout_acc.png (eval/acc_mean), train_acc.png (train/acc_mean), response_length.png (mean
  with the q25-q75 band), clip_fractions.png, influence_weights.png (mean raw and clipped
  weights, FIPO's clip ratios), entropy.png (when a run logs actor/entropy).
The x axis is the RL step, the optimizer step (RL step x rl.num_mini_batches x rl.ppo_epochs)
or the response tokens trained on so far (response_length/mean x train/num_prompts_kept x
rl.n, summed). --smooth K draws a trailing K-point mean over the raw points, drawn faint.
It prints one table: steps run, final and best held-out accuracy, and the mean response length
over the last --last K RL steps. A bad argument or an unreadable run ends in one line on stderr,
exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from fipo_jax import cli, paths, plots, wandb_backend
from fipo_jax import config as config_lib
from fipo_jax import metrics as metrics_lib

X_AXES = {
  "rl_step": "RL step",
  "optimizer_step": "optimizer step",
  "tokens": "response tokens trained on",
}
EVAL = "eval/acc_mean"
LEN_MEAN = "response_length/mean"
LINE_STYLES = ("-", (0, (5, 2)), "-.", ":")
# (file stem, title, [(metric, panel title, y label)]): one panel per metric, a line per run.
FIGURES = (
  ("heldout_acc", "Held-out accuracy", [(EVAL, "eval/acc_mean", "accuracy")]),
  (
    "train_acc",
    "Train accuracy (all sampled responses)",
    [("train/acc_mean", "train/acc_mean", "accuracy")],
  ),
  (
    "clip_fractions",
    "Clip fractions",
    [
      ("actor/pg_clipfrac", "PPO clip fraction (pg_clipfrac)", "fraction"),
      ("actor/pg_clipfrac_lower", "dual-clip fraction (pg_clipfrac_lower)", "fraction"),
      ("response_length/clip_ratio", "truncated responses", "fraction"),
    ],
  ),
  (
    "influence_weights",
    "FIPO influence weights",
    [
      (plots.IW_RAW, "mean weight, raw", "weight"),
      (plots.IW, "mean weight, clipped", "weight"),
      ("actor/IW_upper_clip_ratio", "clipped above", "fraction"),
      ("actor/IW_lower_clip_ratio", "clipped below", "fraction"),
    ],
  ),
  ("entropy", "Policy entropy", [("actor/entropy", "actor/entropy", "nats per token")]),
)


class CompareError(ValueError):
  """A run that cannot be read or a bad argument: one line for the user."""


@dataclasses.dataclass
class Run:
  """One workdir's metrics: `history` rows (metrics.jsonl) and `x` (step -> x-axis value)."""

  label: str
  workdir: str
  history: list[dict[str, Any]]
  config: dict[str, Any]
  x: dict[int, float] = dataclasses.field(default_factory=dict)

  @property
  def loss_mode(self) -> str:
    return str(self.config.get("rl", {}).get("loss_mode", "?"))


def load_run(workdir: str, label: str | None = None) -> Run:
  """The run in `workdir` (its metrics.jsonl must exist; config.json is optional)."""
  path = paths.join(workdir, metrics_lib.METRICS_FILE)
  if not paths.isfile(path):
    raise CompareError(f"{workdir}: no {metrics_lib.METRICS_FILE} (not a trainer workdir?)")
  history = sorted(metrics_lib.read_metrics(path), key=lambda r: r["step"])
  if not history:
    raise CompareError(f"{path}: no rows")
  cfg_path = paths.join(workdir, "config.json")
  config = json.loads(paths.read_text(cfg_path)) if paths.isfile(cfg_path) else {}
  name = (config.get("metrics") or {}).get("wandb_name")
  return Run(label or name or wandb_backend.run_name(workdir), workdir, history, config)


def _rl_value(run: Run, key: str) -> Any:
  """rl.<key> of the run's config.json, else the schema default."""
  return run.config.get("rl", {}).get(key, config_lib.schema()["rl"][key])


def x_values(run: Run, x: str) -> dict[int, float]:
  """RL step -> the x axis value at the end of that step."""
  steps = [int(r["step"]) for r in run.history]
  if x == "rl_step":
    return {s: float(s) for s in steps}
  if x == "optimizer_step":
    per = (
      _rl_value(run, "train_batch_size")
      // _rl_value(run, "ppo_mini_batch_size")
      * _rl_value(run, "ppo_epochs")
    )
    return {s: float(s * per) for s in steps}
  n, total, out = _rl_value(run, "n"), 0.0, {}
  for r in run.history:
    mean, kept = r.get(LEN_MEAN), r.get("train/num_prompts_kept")
    if plots.is_number(mean) and plots.is_number(kept) and math.isfinite(mean):
      total += mean * kept * n
    out[int(r["step"])] = total
  return out


def smooth(values: Sequence[float], k: int) -> list[float]:
  """Trailing k-point mean (the first points average what there is)."""
  out, acc = [], 0.0
  for i, v in enumerate(values):
    acc += v - (values[i - k] if i >= k else 0.0)
    out.append(acc / min(i + 1, k))
  return out


def styles(n: int) -> list[dict[str, Any]]:
  """A colour and a line style per run: a dashed line over a solid one leaves both visible
  where two runs log the same values (e.g. zero clip fractions)."""
  return [{"color": f"C{i % 10}", "ls": LINE_STYLES[i % len(LINE_STYLES)]} for i in range(n)]


def _plot_metric(ax, runs: Sequence[Run], key: str, k: int, colors) -> None:
  """One line per run (smoothed over a faint raw line with k > 1); runs without it say so."""
  for run, (color, ls) in zip(runs, ((c["color"], c["ls"]) for c in colors), strict=True):
    steps, values = plots.series(run.history, key)
    if not steps:
      ax.plot([], [], color=color, ls=ls, lw=1.6, label=f"{run.label} (not logged)")
      continue
    xs = [run.x[s] for s in steps]
    marker = "o" if len(xs) < 15 else None
    if k > 1:
      ax.plot(xs, values, color=color, alpha=0.25, lw=0.8)
      values = smooth(values, k)
    ax.plot(xs, values, color=color, ls=ls, label=run.label, marker=marker, markersize=3, lw=1.6)


def _plot_length(ax, runs: Sequence[Run], k: int, colors) -> None:
  for run, (color, ls) in zip(runs, ((c["color"], c["ls"]) for c in colors), strict=True):
    steps, mean = plots.series(run.history, LEN_MEAN)
    if not steps:
      ax.plot([], [], color=color, ls=ls, lw=1.6, label=f"{run.label} (not logged)")
      continue
    lo = dict(zip(*plots.series(run.history, "response_length/q25"), strict=True))
    hi = dict(zip(*plots.series(run.history, "response_length/q75"), strict=True))
    band = [s for s in steps if s in lo and s in hi]
    lo_v, hi_v = [lo[s] for s in band], [hi[s] for s in band]
    if k > 1:
      mean, lo_v, hi_v = smooth(mean, k), smooth(lo_v, k), smooth(hi_v, k)
    ax.plot([run.x[s] for s in steps], mean, color=color, ls=ls, lw=1.6, label=f"{run.label} mean")
    if band:
      ax.fill_between(
        [run.x[s] for s in band],
        lo_v,
        hi_v,
        color=color,
        alpha=0.18,
        lw=0,
        label=f"{run.label} q25-q75",
      )


def _title(runs: Sequence[Run]) -> str:
  return " vs ".join(f"{r.label} ({r.loss_mode})" if r.loss_mode != "?" else r.label for r in runs)


def write_figures(
  runs: Sequence[Run], out_dir: str, *, x: str = "rl_step", k: int = 1
) -> list[str]:
  """The overlay PNGs in `out_dir` (entropy.png only when some run logs actor/entropy)."""
  plt = plots.pyplot()
  colors = styles(len(runs))
  xlabel, written = X_AXES[x], []
  note = f" (trailing {k}-point mean)" if k > 1 else ""
  for stem, title, panels in FIGURES:
    if stem == "entropy" and not any(plots.series(r.history, panels[0][0])[0] for r in runs):
      continue
    cols = 3 if len(panels) == 3 else min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, sub, ylabel) in zip(axes.flat, panels, strict=False):
      _plot_metric(ax, runs, key, k, colors)
      plots.style(ax, sub if len(panels) > 1 else key, ylabel, xlabel)
    for ax in list(axes.flat)[len(panels) :]:
      ax.set_visible(False)
    plots.legend_outside(axes.flat[cols - 1])
    fig.suptitle(f"{title}{note}: {_title(runs)}", fontsize=12)
    fig.tight_layout()
    written.append(plots.save(fig, paths.join(out_dir, f"{stem}.png")))
  fig, ax = plt.subplots(figsize=(9, 4.2))
  _plot_length(ax, runs, k, colors)
  plots.style(ax, "", "tokens", xlabel)
  plots.legend_outside(ax)
  fig.suptitle(f"Response length (mean, q25-q75 band){note}: {_title(runs)}", fontsize=12)
  fig.tight_layout()
  written.append(plots.save(fig, paths.join(out_dir, "response_length.png")))
  return written


def summary(run: Run, last: int) -> dict[str, Any]:
  """Steps run, final and best held-out accuracy (with their steps), and the mean response
  length over the run's last `last` RL steps."""
  steps_run = max(int(r["step"]) for r in run.history)
  ev_steps, ev = plots.series(run.history, EVAL)
  len_steps, lens = plots.series(run.history, LEN_MEAN)
  tail = [v for s, v in zip(len_steps, lens, strict=True) if s > steps_run - last]
  best = max(range(len(ev)), key=lambda i: (ev[i], -ev_steps[i])) if ev else None
  return {
    "run": run.label,
    "loss": run.loss_mode,
    "steps": steps_run,
    "final": (ev[-1], ev_steps[-1]) if ev else None,
    "best": (ev[best], ev_steps[best]) if best is not None else None,
    "length": sum(tail) / len(tail) if tail else None,
  }


def table(runs: Sequence[Run], last: int) -> str:
  """The printed comparison, one row per run, columns aligned."""
  head = [
    "run",
    "loss",
    "steps",
    f"final {EVAL}",
    f"best {EVAL}",
    f"mean response length (last {last} steps)",
  ]
  rows = [head]
  for run in runs:
    s = summary(run, last)
    acc = lambda v: f"{v[0]:.3f} (step {v[1]})" if v else "-"
    rows.append(
      [
        s["run"],
        s["loss"],
        str(s["steps"]),
        acc(s["final"]),
        acc(s["best"]),
        f"{s['length']:.2f}" if s["length"] is not None else "-",
      ]
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  return "\n".join(
    "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
  )


def compare(
  workdirs: Sequence[str],
  out_dir: str,
  *,
  x: str = "rl_step",
  k: int = 1,
  last: int = 10,
  labels: Sequence[str] | None = None,
) -> tuple[list[str], str]:
  """Loads the runs, writes the figures; returns (the PNGs, the table)."""
  if labels and len(labels) != len(workdirs):
    raise CompareError(f"--labels: {len(labels)} labels for {len(workdirs)} workdirs")
  runs = [load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
  names = [r.label for r in runs]
  for r in runs:
    if names.count(r.label) > 1:  # e.g. a/run and b/run: the whole path tells them apart
      r.label = r.workdir.rstrip("/")
    r.x = x_values(r, x)
  paths.makedirs(out_dir)
  return write_figures(runs, out_dir, x=x, k=k), table(runs, last)


def main(argv: Sequence[str] | None = None) -> None:
  p = cli.Parser("compare", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", help="trainer workdirs (local or gs://)")
  p.add_argument("--out", required=True, help="directory for the PNGs (local or gs://)")
  p.add_argument("--x", choices=tuple(X_AXES), default="rl_step", help="x axis")
  p.add_argument("--smooth", type=int, default=1, help="trailing mean over K points (1: off)")
  p.add_argument("--last", type=int, default=10, help="RL steps of the length column")
  p.add_argument("--labels", default=None, help="comma-separated run names, in order")
  a = p.parse_args(argv)
  if a.smooth < 1 or a.last < 1:
    p.error("--smooth and --last must be >= 1")
  labels = [s.strip() for s in a.labels.split(",")] if a.labels else None
  try:
    files, text = compare(a.workdirs, a.out, x=a.x, k=a.smooth, last=a.last, labels=labels)
  except (CompareError, OSError, json.JSONDecodeError) as e:
    p.fail(e)
  print(text)
  print(f"figures in {a.out}: {', '.join(f.rstrip('/').rsplit('/', 1)[-1] for f in files)}")


if __name__ == "__main__":
  main()
