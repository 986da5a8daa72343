"""The figures of `python -m fipo_jax.inspect`: the token heat map and Fig. 3f.

  token_heatmap(rows, "out/tokens_step10.png", rows=6)   # rows: rollout_dump.read_step(...)
  acc_vs_length(history, fits, "out/acc_vs_length.png")

The heat map lays tokens out as text in a monospace font, wrapped at LINE_CHARS characters, each
on a cell shaded by its value: left FIPO's clipped weight f (centred on 1), right the step's
delta log p (centred on 0), on a red (up) / blue (down) scale shared by all shown responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fipo_jax import plots

LINE_CHARS = 64  # characters per wrapped line
_CHAR_IN, _LINE_IN = 0.085, 0.22  # inches per character and per line (8 pt monospace)
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # whitespace made visible


def _shown(token: str) -> str:
  return "".join(_VISIBLE.get(c, c) for c in token) or "\u2205"


def _pick(rows: Sequence[dict], sign: int, n: int) -> list[dict]:
  """Up to n rows with advantage of `sign`, latest mini-batch first (mini-batch 0's weights
  are exactly 1: FIPO has not acted there yet)."""
  sel = [r for r in rows if np.sign(r["advantage"]) == sign]
  return sorted(sel, key=lambda r: (-r["mini_batch"], r["index"]))[:n]


def _layout(sections: Sequence[tuple[str, list[dict]]]):
  """-> (lines, cells): header lines [(y, text, bold)] and token cells [(y, x, w, text, row
  key, position)], in character x and line y units."""
  lines, cells, y = [], [], 0
  for title, picked in sections:
    lines.append((y, f"{title}: {len(picked)} response(s)", True))
    y += 1
    for r in picked:
      u = r["updates"][-1]
      lines.append(
        (
          y,
          f"#{r['index']}  A={r['advantage']:+.2f}  score={r['score']:g}  "
          f"mini-batch {r['mini_batch']} (f at update {u})",
          False,
        )
      )
      y, x = y + 1, 0.0
      for p, tok in enumerate(r["tokens"]):
        text = _shown(tok)
        w = len(text) + 0.5
        if x + w > LINE_CHARS and x > 0:
          y, x = y + 1, 0.0
        cells.append((y, x, w, text, r["index"], p))
        x += w
      y += 1
    y += 0.5
  return lines, cells, y


def _values(rows: Sequence[dict]) -> dict[str, dict[tuple[int, int], float]]:
  out: dict[str, dict[tuple[int, int], float]] = {"weight": {}, "delta": {}}
  for r in rows:
    for p, (w, d) in enumerate(zip(r["influence_weights"][-1], r["log_ratio_after"], strict=True)):
      out["weight"][(r["index"], p)] = w
      out["delta"][(r["index"], p)] = d
  return out


def _panel(fig, rect, lines, cells, height, values, *, center: float, label: str):
  """One column of the heat map on axes at `rect`, with its colour bar below."""
  from matplotlib import colors, patches  # noqa: PLC0415

  ax = fig.add_axes(rect)
  ax.set_xlim(0, LINE_CHARS)
  ax.set_ylim(height, -0.5)
  ax.axis("off")
  vals = [values[(c[4], c[5])] for c in cells]
  span = max(max((abs(v - center) for v in vals), default=0.0), 1e-3)
  norm = colors.TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
  cmap = plots.pyplot().get_cmap("RdBu_r")
  for y, text, bold in lines:
    ax.text(
      0,
      y,
      text,
      va="center",
      ha="left",
      fontsize=8.5 if bold else 7.5,
      fontweight="bold" if bold else "normal",
      color="0.1" if bold else "0.35",
    )
  for (y, x, w, text, _, _), v in zip(cells, vals, strict=True):
    shade = norm(v)
    ax.add_patch(patches.Rectangle((x, y - 0.45), w - 0.08, 0.9, color=cmap(shade), lw=0))
    ink = "white" if abs(shade - 0.5) > 0.36 else "black"
    ax.text(
      x + (w - 0.08) / 2,
      y,
      text,
      va="center",
      ha="center",
      fontsize=8,
      family="monospace",
      color=ink,
    )
  return ax, plots.pyplot().cm.ScalarMappable(norm=norm, cmap=cmap), label


def token_heatmap(
  dumped: Sequence[dict], path: str, *, rows: int = 6, title: str = ""
) -> tuple[str, int, int]:
  """The PNG at `path`: positive then negative advantage responses of a step's dump (up to
  `rows` each), tokens shaded by f (left) and by delta log p (right).
  Returns (the path, the responses drawn, the tokens drawn per panel)."""
  plt = plots.pyplot()
  sections = [
    ("A > 0 (reinforced)", _pick(dumped, 1, rows)),
    ("A < 0 (suppressed)", _pick(dumped, -1, rows)),
  ]
  lines, cells, height = _layout(sections)
  values = _values([r for _, picked in sections for r in picked])
  col_w, pad = LINE_CHARS * _CHAR_IN, 0.3
  fig_w, body_h, foot_h = 2 * col_w + 3 * pad, height * _LINE_IN, 0.9
  fig = plt.figure(figsize=(fig_w, body_h + foot_h + 0.5))
  h = fig.get_figheight()
  panels = (
    ("weight", 1.0, "FIPO weight f (clipped; 1 = DAPO)"),
    ("delta", 0.0, "delta log p after the step (log pi_new - log pi_old)"),
  )
  for k, (key, center, label) in enumerate(panels):
    left = (pad + k * (col_w + pad)) / fig_w
    rect = (left, foot_h / h, col_w / fig_w, body_h / h)
    _, mappable, label = _panel(
      fig, rect, lines, cells, height, values[key], center=center, label=label
    )
    cax = fig.add_axes((left + 0.1 * col_w / fig_w, 0.35 / h, 0.8 * col_w / fig_w, 0.12 / h))
    fig.colorbar(mappable, cax=cax, orientation="horizontal").set_label(label, fontsize=8)
  fig.suptitle(
    f"{title}: tokens shaded by FIPO weight (left) and delta log p (right)",
    fontsize=10,
    y=1 - 0.12 / h,
  )
  drawn = sum(len(picked) for _, picked in sections)
  return plots.save(fig, path, dpi=150), drawn, len(cells)  # dpi: 8 pt tokens stay legible


def acc_vs_length(
  history: Sequence[dict], fits: Sequence[dict[str, Any]], path: str, *, title: str = ""
) -> str:
  """Held-out accuracy against held-out mean response length, one point per eval coloured by
  RL step, with each stage's least-squares line (inspect.length_fit). Returns the path."""
  plt = plots.pyplot()
  pts = [
    (r["step"], r["eval/response_length/mean"], r["eval/acc_mean"])
    for r in history
    if plots.is_number(r.get("eval/response_length/mean"))
    and plots.is_number(r.get("eval/acc_mean"))
  ]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if pts:
    steps, lens, accs = (np.asarray(c, np.float64) for c in zip(*pts, strict=True))
    ax.plot(lens, accs, color="0.75", lw=0.8, zorder=1)
    sc = ax.scatter(lens, accs, c=steps, cmap="viridis", s=28, zorder=2)
    fig.colorbar(sc, ax=ax, label="RL step")
    for i, f in enumerate(fits):
      sel = (steps >= f["steps"][0]) & (steps <= f["steps"][1])
      xs = np.linspace(lens[sel].min(), lens[sel].max(), 2)
      ax.plot(
        xs,
        f["a"] + f["w"] / 1000 * xs,
        color=f"C{i + 1}",
        lw=1.5,
        label=f"steps {f['steps'][0]}-{f['steps'][1]}: w={f['w']:+.3f}/1k tok, R^2={f['r2']:.2f}",
      )
    if fits:
      ax.legend(fontsize=8, loc="best")
  else:
    plots.no_data(ax, "no eval with eval/response_length/mean")
  plots.style(
    ax,
    f"{title}: accuracy vs response length (Fig. 3f)",
    "eval/acc_mean",
    "eval/response_length/mean (tokens)",
  )
  fig.tight_layout()
  return plots.save(fig, path)
