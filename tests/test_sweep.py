"""python -m fipo_jax.sweep: seeds x grid cells, mean and 95% t-interval, plots with bands.

The reading half runs on metrics.jsonl/config.json files written here in the trainer's schema
(2 losses x 2 seeds; the README's sweep command finds them as finished runs and trains nothing);
the running half trains one real tiny_cpu:runlocal run (slow).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shlex
import subprocess

import conftest
import numpy as np
import pytest

from fipo_jax import compare, sweep, sweep_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Held-out accuracy and length per eval step (0, 5, 10) of each (loss, seed).
EVALS = {
  ("fipo", 0): ([0.5, 0.8, 0.9], [10.0, 20.0, 30.0]),
  ("fipo", 1): ([0.4, 0.7, 0.95], [12.0, 18.0, 36.0]),
  ("dapo", 0): ([0.5, 0.6, 0.7], [10.0, 11.0, 12.0]),
  ("dapo", 1): ([0.45, 0.9, 0.8], [11.0, 10.0, 13.0]),
}


def _write_run(workdir: pathlib.Path, loss: str, seed: int, *, done: bool = False) -> str:
  acc, lens = EVALS[(loss, seed)]
  rows = []
  for s in range(11):
    row = {"step": s}
    if s % 5 == 0:
      row.update({"eval/acc_mean": acc[s // 5], "eval/response_length/mean": lens[s // 5]})
    if s > 0:
      row.update({"train/acc_mean": 0.3 + 0.01 * s + seed * 0.02, "response_length/mean": 9.0 + s})
    rows.append(row)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (workdir / "config.json").write_text(json.dumps({"seed": seed, "rl": {"loss_mode": loss}}))
  if done:
    (workdir / sweep.DONE).write_text("0\n")
  return str(workdir)


def _readme_sweep_commands() -> list[list[str]]:
  text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
  lines = [
    ln.strip() for ln in text.splitlines() if ln.strip().startswith("python -m fipo_jax.sweep ")
  ]
  return [shlex.split(ln)[3:] for ln in lines]


def _local(argv: list[str], tmp_path: pathlib.Path) -> list[str]:
  return [str(tmp_path / a[len("/tmp/") :]) if a.startswith("/tmp/") else a for a in argv]


def _run(warm_server, argv: list[str]) -> subprocess.CompletedProcess:
  """`python -m fipo_jax.sweep ARGV`, forked from the warm server (tests/warm_python.py); the
  runs it starts are fresh interpreters, as in a user's sweep."""
  env = conftest.child_env(flags=conftest.WARM_START_XLA_FLAGS)  # one CPU device, as on a laptop
  return warm_server.run("-m", "fipo_jax.sweep", *argv, cwd=ROOT, env=env)


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
  """sweep.main in this process (the CLI's code path without a second jax import)."""
  code = 0
  try:
    sweep.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _png(path: pathlib.Path) -> np.ndarray:
  import matplotlib.image  # noqa: PLC0415

  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.int32)


def _pixels(img: np.ndarray, rgb) -> int:
  return int((np.abs(img - np.asarray(rgb)).max(axis=-1) <= 6).sum())


def test_t_quantiles_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  for df in (1, 2, 3, 9, 30, 31, 60, 200):
    assert sweep_stats.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)
  m, h, n = sweep_stats.mean_ci([0.9, 0.95, 0.8])
  lo, hi = stats.t.interval(
    0.95, 2, loc=np.mean([0.9, 0.95, 0.8]), scale=stats.sem([0.9, 0.95, 0.8])
  )
  assert n == 3 and m - h == pytest.approx(lo, abs=1e-3) and m + h == pytest.approx(hi, abs=1e-3)
  assert math.isnan(sweep_stats.mean_ci([0.5])[1]) and sweep_stats.mean_ci([None])[2] == 0


def _readme_grid_commands() -> list[list[str]]:
  return [a for a in _readme_sweep_commands() if "--grid" in a]


def test_readme_has_the_loss_and_decay_sweeps():
  grids = [a[a.index("--grid") + 1] for a in _readme_grid_commands()]
  assert any(g.startswith("rl.loss_mode=fipo,dapo") for g in grids)
  assert any(g.startswith("rl.decay_rate=8,32,128") for g in grids)


@pytest.mark.parametrize("index", range(len(_readme_grid_commands())))
def test_readme_sweep_command_reads_finished_runs_into_a_table_and_bands(tmp_path, capsys, index):
  argv = _local(_readme_grid_commands()[index], tmp_path)
  out = pathlib.Path(argv[argv.index("--out") + 1])
  ((key, values),) = sweep.parse_assignments([argv[argv.index("--grid") + 1]], many=True)
  seeds = [int(s) for s in argv[argv.index("--seeds") + 1].split(",")]
  assert len(seeds) >= 3 and len(values) >= 2
  for name, pairs in sweep.cells_of([(key, values)]):
    kind = "fipo" if name == f"{key}={values[0]}" else "dapo"  # the first cell: FIPO's numbers
    for i, seed in enumerate(seeds):  # seeds past the 2 known runs: copies of seed 1's numbers
      workdir = out / "runs" / f"{sweep._slug(pairs)}_seed{seed}"  # noqa: SLF001
      _write_run(workdir, kind, min(i, 1), done=True)
  code, stdout, stderr = _main(argv, capsys)
  assert code == 0, stderr[-2000:]
  assert "sweep: running" not in stdout  # every run was already finished
  table = (out / "table.md").read_text()
  assert table.strip() in stdout
  fipo_row = next(ln for ln in table.splitlines() if ln.startswith(f"| {key}={values[0]} |"))
  finals = [0.9, 0.95] + [0.95] * (len(seeds) - 2)
  m, h, _ = sweep_stats.mean_ci(finals)
  assert f"{m:.3f} ± {h:.3f}" in fipo_row
  growth = [3.0, 3.0] + [3.0] * (len(seeds) - 2)
  assert "3.00" in fipo_row and sweep_stats.mean_ci(growth)[1] == 0.0
  grid = {key: values}
  assert json.loads((out / "sweep.json").read_text())["grid"] == grid
  img = _png(out / "heldout_acc.png")
  c0 = np.asarray([0x1F, 0x77, 0xB4])
  band0 = np.round(255 - 0.2 * (255 - c0)).astype(int)  # alpha 0.2 of C0 over white
  assert _pixels(img, c0) > 50 and _pixels(img, band0) > 200, "no mean line or no band"


def test_read_groups_runs_by_config_values(tmp_path):
  dirs = [
    _write_run(tmp_path / f"{loss}{seed}", loss, seed)
    for loss in ("fipo", "dapo")
    for seed in (0, 1)
  ]
  cells = sweep.read_cells(dirs, ["rl.loss_mode"])
  assert list(cells) == ["rl.loss_mode=fipo", "rl.loss_mode=dapo"]
  assert [len(v) for v in cells.values()] == [2, 2]
  rows = sweep_stats.cell_rows(cells, threshold=0.85)
  dapo = rows[1]
  assert dapo["reached"] == 1 and dapo["steps_to"][:1] == (5.0,)  # seed 1 reaches 0.9 at step 5
  assert dapo["best"][0] == pytest.approx((0.7 + 0.9) / 2)
  assert rows[0]["steps_to"][0] == pytest.approx(10.0) and rows[0]["reached"] == 2
  s = sweep_stats.run_summary(compare.load_run(dirs[0]), 0.85)
  assert s["growth"] == pytest.approx(3.0) and s["final"] == 0.9


def test_readme_read_command(tmp_path, capsys):
  argv = next(a for a in _readme_sweep_commands() if "--read" in a)
  argv = _local(argv, tmp_path)
  reads = argv[argv.index("--read") + 1 : argv.index("--by")]
  for i, w in enumerate(reads):
    _write_run(pathlib.Path(w), "fipo" if "fipo" in w else "dapo", i % 2)
  code, stdout, stderr = _main(argv, capsys)
  assert code == 0, stderr
  assert "rl.loss_mode=fipo" in stdout and "rl.loss_mode=dapo" in stdout


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--config", "c.py", "--grid", "rl.nope=1"], "'rl.nope' is not a config key"),
    (["--config", "c.py", "--grid", "seed=1,2"], "swept by --seeds"),
    (["--grid", "rl.loss_mode=fipo"], "give --config and --grid"),
    (["--config", "c.py", "--grid", "rl.loss_mode"], "expected KEY=VALUE"),
    (["--config", "c.py", "--grid", "rl.n=2", "--seeds", "0,x"], "comma-separated integers"),
  ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    sweep.main([*argv, "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_runs_a_real_grid_and_resumes(tmp_path, warm_server):
  out = tmp_path / "sw"
  argv = [
    "--config",
    "configs/tiny_cpu.py:runlocal",
    "--grid",
    "rl.loss_mode=fipo",
    "--seeds",
    "3",
    "--set",
    "total_steps=1",
    # A short warm start, not a base model: the grid's plumbing is the point, not its scores (no
    # warm-start threshold, no group filtering, no stop on steps without a mixed group).
    "--set",
    "sft.steps=20",
    "--set",
    "sft.loss_threshold=0",
    "--set",
    "rl.filter_groups_enable=false",
    "--set",
    "rl.max_empty_steps=0",
    "--out",
    str(out),
    "--threshold",
    "0.0",
  ]
  proc = _run(warm_server, argv)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = out / "runs" / "loss_mode-fipo_seed3"
  cfg = json.loads((run / "config.json").read_text())
  assert cfg["seed"] == 3 and cfg["total_steps"] == 1 and (run / sweep.DONE).exists()
  assert "| rl.loss_mode=fipo | 1 |" in proc.stdout and "(1/1)" in proc.stdout
  again = _run(warm_server, argv)  # finished: read, not trained again
  assert again.returncode == 0 and "sweep: running" not in again.stdout


def test_grid_runs_seed_by_seed_shares_the_warm_start_and_reports_failures(
  tmp_path, capsys, monkeypatch
):
  calls = []

  def fake_run(config, workdir, seed, overrides):
    calls.append((seed, dict(overrides)["rl.loss_mode"], pathlib.Path(workdir, "sft").exists()))
    if dict(overrides)["rl.loss_mode"] == "dapo" and seed == 1:
      return "exit 2: the warm start missed its loss threshold"
    loss = dict(overrides)["rl.loss_mode"]
    _write_run(pathlib.Path(workdir), loss, seed)
    (pathlib.Path(workdir) / "sft").mkdir(exist_ok=True)  # what the trainer caches
    return ""

  monkeypatch.setattr(sweep, "_run_one", fake_run)
  out = tmp_path / "o"
  argv = [
    "--config",
    "c.py",
    "--grid",
    "rl.loss_mode=fipo,dapo",
    "--seeds",
    "0,1",
    "--set",
    "total_steps=10",
    "--out",
    str(out),
    "--share_warm_start",
  ]
  code, stdout, stderr = _main(argv, capsys)
  assert calls == [(0, "fipo", False), (0, "dapo", True), (1, "fipo", False), (1, "dapo", True)]
  assert code == 1 and "1 run(s) failed" in stderr and "missed its loss threshold" in stderr
  assert "| rl.loss_mode=dapo | 1 |" in stdout and "| rl.loss_mode=fipo | 2 |" in stdout
  manifest = json.loads((out / "sweep.json").read_text())
  assert manifest["set"] == {"total_steps": "10"} and len(manifest["runs"]) == 4
  bad = ["--config", "c.py", "--grid", "sft.steps=1,2", "--out", str(out), "--share_warm_start"]
  code, _, stderr = _main(bad, capsys)
  assert code == 2 and "rl.* keys only" in stderr
