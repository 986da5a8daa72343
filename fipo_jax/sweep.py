"""python -m fipo_jax.sweep: a grid of config values x seeds, mean and 95% CI over the seeds.

Run a grid (each run a `python -m fipo_jax.main` subprocess, one after another; a finished run
is not run again, so an interrupted sweep resumes):

  python -m fipo_jax.sweep --config configs/tiny_cpu.py --grid rl.loss_mode=fipo,dapo \\
      --seeds 0,1,2 --out /tmp/sweep_loss [--set total_steps=20 --set sft.steps=300] \\
      [--threshold 0.85]

`--grid KEY=V1,V2,...` (repeatable: the cells are the product) takes any config key, e.g.
rl.loss_mode, rl.decay_rate, rl.clip_ratio_high; `--set KEY=V` applies to every run. Runs live
in OUT/runs/<cell>_seed<s>, listed in OUT/sweep.json; seed by seed, so that a cut-short sweep
has whole seeds. With --share_warm_start (a grid of rl.* keys only) a seed's later cells start
from its first cell's warm start (WORKDIR/sft). Or read finished runs, grouped into cells by the
values of `--by` keys in their config.json:

  python -m fipo_jax.sweep --read W1 W2 W3 W4 --by rl.loss_mode --out /tmp/sweep_loss

Both write to OUT: heldout_acc.png, heldout_length.png, train_acc.png, response_length.png (a
mean line per cell, the 95% t band over seeds shaded), table.md (printed too: per cell final and
best eval/acc_mean, steps to --threshold, eval length first -> last and its growth, each mean ±
95% CI) and summary.json (every run's numbers). A bad argument: one line, exit code 2; a run
that fails is left out of the statistics, named on stderr, and the exit code is 1.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from fipo_jax import cli, compare, paths, sweep_stats
from fipo_jax import config as config_lib

DONE = "sweep_done"  # written into a run's workdir when its trainer exits 0


class SweepError(ValueError):
  """A bad grid or an unreadable run: one line for the user."""


def _check_key(key: str) -> None:
  node: Any = config_lib.schema()
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      raise SweepError(f"{key!r} is not a config key")
    node = node[part]
  if key == "seed":
    raise SweepError("'seed' is swept by --seeds, not --grid")


def parse_assignments(items: Sequence[str], *, many: bool) -> list[tuple[str, list[str]]]:
  """['rl.loss_mode=fipo,dapo'] -> [('rl.loss_mode', ['fipo', 'dapo'])] (one value unless many)."""
  out = []
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise SweepError(f"{item!r}: expected KEY=VALUE{',VALUE...' if many else ''}")
    _check_key(key)
    values = [v.strip() for v in value.split(",")] if many else [value]
    if any(not v for v in values):
      raise SweepError(f"{item!r}: an empty value")
    out.append((key, values))
  return out


def cells_of(grid: Sequence[tuple[str, list[str]]]) -> list[tuple[str, list[tuple[str, str]]]]:
  """The product of the grid: [(cell name 'k1=v1, k2=v2', [(k1, v1), (k2, v2)])]."""
  keys = [k for k, _ in grid]
  out = []
  for combo in itertools.product(*[vs for _, vs in grid]):
    pairs = list(zip(keys, combo, strict=True))
    out.append((", ".join(f"{k}={v}" for k, v in pairs), pairs))
  return out


def _slug(pairs: Sequence[tuple[str, str]]) -> str:
  text = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in pairs)
  return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _run_one(config: str, workdir: str, seed: int, overrides: Sequence[tuple[str, str]]) -> str:
  """Trains one run; '' when it exited 0, else its last stderr line."""
  if paths.isfile(paths.join(workdir, DONE)):
    return ""
  cmd = [
    sys.executable,
    "-m",
    "fipo_jax.main",
    "--config",
    config,
    "--workdir",
    workdir,
    f"--config.seed={seed}",
    *[f"--config.{k}={v}" for k, v in overrides],
  ]
  print(f"sweep: running {' '.join(cmd[2:])}", flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  paths.write_text(paths.join(workdir, "sweep.log"), proc.stdout + proc.stderr)
  if proc.returncode == 0:
    paths.write_text(paths.join(workdir, DONE), "0\n")
    return ""
  tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  return f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"


def _share_warm_start(workdir: str, earlier: Sequence[str]) -> None:
  """Copies the supervised warm start (WORKDIR/sft) of an earlier run of the same seed into
  `workdir`, which the trainer then reuses (local paths only)."""
  src = next((paths.join(w, "sft") for w in earlier if paths.isdir(paths.join(w, "sft"))), None)
  dst = paths.join(workdir, "sft")
  if src and not paths.exists(dst) and not paths.is_remote(dst):
    shutil.copytree(src, dst)


def run_grid(
  config: str, grid, seeds: Sequence[int], out: str, sets, *, share_sft: bool = False
) -> tuple[dict, list[str]]:
  """Runs every cell x seed not yet done; returns ({cell: [workdirs that finished]}, failures).
  share_sft: a seed's later cells reuse its first cell's warm start (valid when the grid
  changes nothing the warm start reads: rl.* keys only)."""
  fixed = [(k, vs[0]) for k, vs in sets]
  grid_cells = cells_of(grid)
  cells: dict[str, list[str]] = {name: [] for name, _ in grid_cells}
  failures, manifest = [], []
  for seed in seeds:  # seed by seed: a sweep cut short has every cell of its first seeds
    earlier: list[str] = []
    for name, pairs in grid_cells:
      workdir = paths.join(out, "runs", f"{_slug(pairs)}_seed{seed}")
      if share_sft:
        _share_warm_start(workdir, earlier)
      earlier.append(workdir)
      err = _run_one(config, workdir, seed, fixed + pairs)
      manifest.append({"cell": name, "seed": seed, "workdir": workdir, "error": err})
      if err:
        failures.append(f"{name} seed {seed} ({workdir}): {err}")
      else:
        cells[name].append(workdir)
  paths.write_text(
    paths.join(out, "sweep.json"),
    json.dumps(
      {
        "config": config,
        "grid": dict(grid),
        "seeds": list(seeds),
        "set": dict(fixed),
        "runs": manifest,
      },
      indent=1,
    ),
  )
  return cells, failures


def _value(config: dict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      node = config_lib.schema()
      for p in key.split("."):
        node = node[p]
      return node
    node = node[part]
  return node


def read_cells(workdirs: Sequence[str], by: Sequence[str]) -> dict[str, list[compare.Run]]:
  """Finished runs grouped by their config.json values of the `by` keys, in order of first
  appearance."""
  cells: dict[str, list[compare.Run]] = {}
  for w in workdirs:
    run = compare.load_run(w)
    name = ", ".join(f"{k}={_value(run.config, k)}" for k in by)
    cells.setdefault(name, []).append(run)
  return cells


def aggregate(cells: dict[str, list[compare.Run]], out: str, threshold: float) -> tuple[list, str]:
  """Writes the figures, table.md and summary.json to `out`; returns (the PNGs, the table)."""
  cells = {k: v for k, v in cells.items() if v}
  if not cells:
    raise SweepError("no finished run to aggregate")
  paths.makedirs(out)
  files = sweep_stats.write_figures(cells, out)
  text = sweep_stats.table(cells, threshold)
  paths.write_text(paths.join(out, "table.md"), text + "\n")
  rows = sweep_stats.cell_rows(cells, threshold)
  for r, runs in zip(rows, cells.values(), strict=True):
    r["workdirs"] = [run.workdir for run in runs]
  paths.write_text(paths.join(out, "summary.json"), json.dumps(rows, indent=1))
  return files, text


def _seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError as e:
    raise SweepError(f"--seeds {text!r}: expected comma-separated integers") from e
  if len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds {text!r}: a seed twice")
  return seeds


def _main(a) -> tuple[list[str], str, list[str]]:
  if a.read:
    if a.config or a.grid:
      raise SweepError("--read takes no --config or --grid (it groups runs with --by)")
    by = [k.strip() for k in (a.by or "rl.loss_mode").split(",")]
    for k in by:
      _check_key(k)
    cells, failures = read_cells(a.read, by), []
  else:
    if not a.config or not a.grid:
      raise SweepError("give --config and --grid (or --read WORKDIRS)")
    grid = parse_assignments(a.grid, many=True)
    sets = parse_assignments(a.set, many=False)
    names, seeds = [k for k, _ in grid + sets], _seeds(a.seeds)
    if len(set(names)) != len(names):
      raise SweepError("a key given twice in --grid/--set")
    if a.share_warm_start and any(not k.startswith("rl.") for k, _ in grid):
      raise SweepError(
        "--share_warm_start needs a grid of rl.* keys only (the warm start reads the others)"
      )
    done, failures = run_grid(a.config, grid, seeds, a.out, sets, share_sft=a.share_warm_start)
    cells = {name: [compare.load_run(w) for w in ws] for name, ws in done.items()}
  files, text = aggregate(cells, a.out, a.threshold)
  return files, text, failures


def main(argv: Sequence[str] | None = None) -> None:
  p = cli.Parser("sweep", description=__doc__.splitlines()[0])
  p.add_argument("--config", help="recipe file (with :arg) for the runs")
  p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2 (repeatable)")
  p.add_argument("--set", action="append", default=[], help="KEY=V for every run (repeatable)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (config.seed)")
  p.add_argument("--read", nargs="+", help="finished workdirs to aggregate instead of running")
  p.add_argument("--by", help="with --read: comma-separated config keys that name a cell")
  p.add_argument("--out", required=True, help="directory for runs, PNGs and tables")
  p.add_argument("--threshold", type=float, default=0.85, help="eval/acc_mean to reach")
  p.add_argument(
    "--share_warm_start",
    action="store_true",
    help="a seed's runs reuse its first run's warm start (rl.* grids only)",
  )
  a = p.parse_args(argv)
  try:
    files, text, failures = _main(a)
  except (SweepError, compare.CompareError, OSError, json.JSONDecodeError) as e:
    p.fail(e)
  print(text)
  print(f"figures in {a.out}: {', '.join(f.rstrip('/').rsplit('/', 1)[-1] for f in files)}")
  if failures:
    sys.stderr.write(f"sweep: {len(failures)} run(s) failed, left out: {'; '.join(failures)}\n")
    sys.exit(1)


if __name__ == "__main__":
  main()
