"""python -m fipo_jax.inspect WORKDIR --step K [--out DIR]: FIPO's per-token view of RL step K.

  python -m fipo_jax.main --config configs/tiny_cpu.py --workdir /tmp/fipo_tiny \\
      --config.dump_influence=True
  python -m fipo_jax.inspect /tmp/fipo_tiny --step 10 --out /tmp/fipo_tiny_inspect

Reads WORKDIR/rollout_data/{K}.jsonl (the trainer's dump, `dump_influence`, rl/rollout_dump.py)
and WORKDIR/metrics.jsonl (local or gs://) and writes to DIR (default WORKDIR/inspect):
- tokens_step{K}.png: responses of the step, positive and negative advantage apart; each
  response twice, its tokens shaded by FIPO's clipped influence weight f (at the row's last
  update of the step; 1 = DAPO's weight) and by the step's delta log p (log pi after the step
  - log pi_old, `log_ratio_after`);
- acc_vs_length.png: held-out accuracy against held-out mean response length over training,
  one point per eval, a least-squares line per training stage (the paper's Fig. 3f).
It prints what "Sparse but Critical" (arXiv 2603.22446) measures: the share of tokens whose
log-probability barely moves (|delta log p| <= --threshold nats, default 0.01: the token's
probability changes by under 1%), by advantage sign, the most-moved tokens with their context,
the share of tokens FIPO weighs away from 1, and the Fig. 3f fit (slope per 1k tokens, R^2).
Bad arguments, a missing dump or metrics file: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from fipo_jax import cli, paths, plots, token_plots
from fipo_jax import metrics as metrics_lib
from fipo_jax.rl import rollout_dump

EVAL_ACC, EVAL_LEN = "eval/acc_mean", "eval/response_length/mean"


class InspectError(ValueError):
  """A run or a step that cannot be read: one line for the user."""


def token_table(rows: Sequence[dict]) -> dict[str, np.ndarray]:
  """Every dumped token of a step, flat [N]: delta log p, clipped and raw weight at the row's
  last update, the row's advantage, and (row, position) to find it again."""
  cols: dict[str, list] = {k: [] for k in ("delta", "weight", "raw", "adv", "row", "pos")}
  for i, r in enumerate(rows):
    t = len(r["tokens"])
    cols["delta"] += r["log_ratio_after"]
    cols["weight"] += r["influence_weights"][-1]
    cols["raw"] += r["raw_influence_weights"][-1]
    cols["adv"] += [r["advantage"]] * t
    cols["row"] += [i] * t
    cols["pos"] += list(range(t))
  return {k: np.asarray(v, np.float64) for k, v in cols.items()}


def sparsity(tab: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
  """Shares of tokens with |delta log p| <= threshold: all, A > 0, A < 0; and FIPO's weights."""
  still = np.abs(tab["delta"]) <= threshold
  share = lambda sel: float(still[sel].mean()) if sel.any() else float("nan")
  moved_w = np.abs(tab["weight"] - 1.0) > 1e-6
  return {
    "tokens": int(still.size),
    "threshold": threshold,
    "barely_moved": share(np.ones_like(still)),
    "barely_moved_pos": share(tab["adv"] > 0),
    "barely_moved_neg": share(tab["adv"] < 0),
    "weight_not_1": float(moved_w.mean()) if still.size else float("nan"),
    "weight_above_1": float((tab["weight"] > 1.0 + 1e-6).mean()) if still.size else float("nan"),
    "weight_below_1": float((tab["weight"] < 1.0 - 1e-6).mean()) if still.size else float("nan"),
    "mean_abs_delta": float(np.abs(tab["delta"]).mean()) if still.size else float("nan"),
  }


def top_moved(rows: Sequence[dict], tab: dict[str, np.ndarray], k: int, context: int = 4):
  """The k tokens with the largest |delta log p|: token, context before it, delta, A, f."""
  out = []
  for i in np.argsort(-np.abs(tab["delta"]), kind="stable")[:k]:
    r, p = rows[int(tab["row"][i])], int(tab["pos"][i])
    out.append(
      {
        "token": r["tokens"][p],
        "context": "".join(r["tokens"][max(0, p - context) : p]),
        "position": p,
        "delta": float(tab["delta"][i]),
        "advantage": float(tab["adv"][i]),
        "weight": float(tab["weight"][i]),
        "row": int(r["index"]),
      }
    )
  return out


def length_fit(history: Sequence[dict], stages: int) -> list[dict[str, Any]]:
  """Fig. 3f: per training stage (equal runs of eval points), accuracy = a + w * length by
  least squares: {steps, w (per 1k tokens), r2, points}; stages with < 3 points are skipped."""
  pts = [
    (r["step"], r[EVAL_LEN], r[EVAL_ACC])
    for r in history
    if plots.is_number(r.get(EVAL_LEN)) and plots.is_number(r.get(EVAL_ACC))
  ]
  out = []
  for chunk in np.array_split(np.asarray(pts, np.float64).reshape(-1, 3), max(stages, 1)):
    if len(chunk) < 3 or np.ptp(chunk[:, 1]) == 0:
      continue
    w, a = np.polyfit(chunk[:, 1], chunk[:, 2], 1)
    resid = chunk[:, 2] - (a + w * chunk[:, 1])
    tot = float(np.sum((chunk[:, 2] - chunk[:, 2].mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / tot if tot > 0 else float("nan")
    out.append(
      {
        "steps": (int(chunk[0, 0]), int(chunk[-1, 0])),
        "w": float(w) * 1000,
        "a": float(a),
        "r2": r2,
        "points": len(chunk),
      }
    )
  return out


def report(stats: dict, top: list[dict], fits: list[dict], step: int) -> str:
  """The printed summary."""
  pct = lambda v: f"{100 * v:.1f}%"
  lines = [
    f"RL step {step}: {stats['tokens']} response tokens dumped",
    f"barely moved (|delta log p| <= {stats['threshold']:g}): {pct(stats['barely_moved'])} of "
    f"tokens; A > 0: {pct(stats['barely_moved_pos'])}, A < 0: {pct(stats['barely_moved_neg'])}",
    f"mean |delta log p| {stats['mean_abs_delta']:.4f}; FIPO weight f != 1 on "
    f"{pct(stats['weight_not_1'])} (> 1: {pct(stats['weight_above_1'])}, "
    f"< 1: {pct(stats['weight_below_1'])}) at each row's last update",
    f"top {len(top)} moved tokens (delta log p, advantage, weight f, context | token):",
  ]
  for t in top:
    lines.append(
      f"  {t['delta']:+.4f}  A={t['advantage']:+.2f}  f={t['weight']:.3f}  "
      f"row {t['row']} pos {t['position']}: {t['context']!r} | {t['token']!r}"
    )
  for f in fits:
    lines.append(
      f"acc vs length, steps {f['steps'][0]}-{f['steps'][1]} ({f['points']} evals): "
      f"slope {f['w']:+.4f} per 1k tokens, R^2 {f['r2']:.2f}"
    )
  if not fits:
    lines.append("acc vs length: fewer than 3 evals with a length spread, no fit")
  return "\n".join(lines)


def inspect(
  workdir: str,
  step: int,
  out_dir: str | None = None,
  *,
  rows: int = 6,
  threshold: float = 0.01,
  top: int = 10,
  stages: int = 2,
) -> tuple[list[str], str]:
  """Writes the PNGs of RL step `step` to out_dir; returns (the PNGs, the printed report)."""
  if not paths.isfile(rollout_dump.dump_path(workdir, step)):
    have = rollout_dump.dumped_steps(workdir)
    raise InspectError(
      f"{workdir}: no rollout dump for step {step} (dumped steps: "
      f"{have or 'none; train with --config.dump_influence=True'})"
    )
  metrics_path = paths.join(workdir, metrics_lib.METRICS_FILE)
  if not paths.isfile(metrics_path):
    raise InspectError(f"{workdir}: no {metrics_lib.METRICS_FILE}")
  dumped = rollout_dump.read_step(workdir, step)
  history = sorted(metrics_lib.read_metrics(metrics_path), key=lambda r: r["step"])
  out_dir = out_dir or paths.join(workdir, "inspect")
  paths.makedirs(out_dir)
  tab = token_table(dumped)
  fits = length_fit(history, stages)
  heatmap, drawn, tokens = token_plots.token_heatmap(
    dumped,
    paths.join(out_dir, f"tokens_step{step}.png"),
    rows=rows,
    title=f"{workdir}: RL step {step}",
  )
  files = [
    heatmap,
    token_plots.acc_vs_length(
      history, fits, paths.join(out_dir, "acc_vs_length.png"), title=workdir
    ),
  ]
  text = report(sparsity(tab, threshold), top_moved(dumped, tab, top), fits, step)
  return files, f"{text}\nheat map: {tokens} tokens of {drawn} responses"


def main(argv: Sequence[str] | None = None) -> None:
  p = cli.Parser("inspect", description=__doc__.splitlines()[0])
  p.add_argument("workdir", help="a trainer workdir run with dump_influence (local or gs://)")
  p.add_argument("--step", type=int, required=True, help="the RL step (1-based) to show")
  p.add_argument("--out", default=None, help="directory for the PNGs (default WORKDIR/inspect)")
  p.add_argument("--rows", type=int, default=6, help="responses shown per advantage sign")
  p.add_argument("--threshold", type=float, default=0.01, help="|delta log p| of 'barely moved'")
  p.add_argument("--top", type=int, default=10, help="most-moved tokens printed")
  p.add_argument("--stages", type=int, default=2, help="training stages of the Fig. 3f fit")
  a = p.parse_args(argv)
  if a.rows < 1 or a.top < 0 or a.stages < 1 or not a.threshold > 0:
    p.error("--rows and --stages must be >= 1, --top >= 0, --threshold > 0")
  try:
    files, text = inspect(
      a.workdir, a.step, a.out, rows=a.rows, threshold=a.threshold, top=a.top, stages=a.stages
    )
  except (InspectError, OSError, json.JSONDecodeError, KeyError) as e:
    p.fail(e)
  print(text)
  print(f"figures: {', '.join(files)}")


if __name__ == "__main__":
  main()
