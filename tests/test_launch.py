"""launch/tpu_vm.sh: parses, checks the workers' Python against requires-python, and its `run`
starts fipo_jax.main with FIPO_DISTRIBUTED=1 behind that check (DRY_RUN=1: no gcloud needed)."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  full = {**os.environ, "PROJECT": "proj", **(env or {})}
  return subprocess.run(
    ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, cwd=ROOT
  )


def _fake_python(tmp_path: pathlib.Path, version: str) -> str:
  """A `python3` on PATH that reports `version` (what an old TPU VM image has)."""
  bin_dir = tmp_path / f"py{version}"
  bin_dir.mkdir()
  exe = bin_dir / "python3"
  exe.write_text(f"#!/bin/sh\necho {version}\n")
  exe.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_script_parses():
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_minimum_is_read_from_pyproject():
  want = re.search(r'requires-python = ">=([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
  assert (
    f"python_check python3 {want}" in _run("run", env={"DRY_RUN": "1", "BUCKET": "gs://b"}).stdout
  )


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_old_python_is_refused_in_one_line(tmp_path, version):
  proc = _run("check-python", env={"PATH": _fake_python(tmp_path, version)})
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert f"'python3' is Python {version}; fipo_jax needs >= 3.11" in lines[0]


@pytest.mark.parametrize("version", ["3.11", "3.13"])
def test_new_enough_python_passes(tmp_path, version):
  proc = _run("check-python", env={"PATH": _fake_python(tmp_path, version)})
  assert proc.returncode == 0, proc.stderr
  assert "ok (>= 3.11)" in proc.stdout


def test_missing_python_is_one_line():
  proc = _run("check-python", env={"PYTHON": "python-does-not-exist"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    f"{proc.stderr.split(':')[0]}: no working 'python-does-not-exist'; fipo_jax needs Python "
    ">= 3.11 (set PYTHON)"
  ]


def test_run_checks_python_then_starts_distributed_on_every_worker():
  proc = _run(
    "run",
    "--config.total_steps=2",
    env={"DRY_RUN": "1", "BUCKET": "gs://b", "RUN_NAME": "r1", "PYTHON": "python3.11"},
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "--worker=all" in out
  check = out.index("python_check python3.11 3.11 || exit 2")
  start = out.index(
    "FIPO_DISTRIBUTED=1 python3.11 -m fipo_jax.main --config "
    "configs/fipo_qwen2_5_32b.py --workdir gs://b/runs/r1 --config.total_steps=2"
  )
  assert check < start


def _remote_command(printed: str) -> str:
  """The --command text of a printed (DRY_RUN) gcloud line, unquoted by bash itself."""
  show = (
    'gcloud() { for a; do [[ $a == --command=* ]] && printf %s "${a#--command=}"; done; true; }; '
  )
  return subprocess.run(
    ["bash", "-c", show + printed], capture_output=True, text=True, check=True
  ).stdout


def test_the_check_sent_to_workers_runs_there(tmp_path):
  printed = _run("run", env={"DRY_RUN": "1", "BUCKET": "gs://b"}).stdout.split("\nworkdir: ")[0]
  check = _remote_command(printed).split(" || exit 2")[0]  # what each worker runs first
  old = subprocess.run(
    ["bash", "-c", check],
    capture_output=True,
    text=True,
    env={**os.environ, "PATH": _fake_python(tmp_path, "3.10")},
  )
  assert old.returncode == 2 and "is Python 3.10; fipo_jax needs >= 3.11" in old.stderr
  ok = subprocess.run(
    ["bash", "-c", check],
    capture_output=True,
    text=True,
    env={**os.environ, "PATH": _fake_python(tmp_path, "3.12")},
  )
  assert ok.returncode == 0, ok.stderr


def test_stage_pulls_from_a_bucket_on_each_worker_or_scps():
  env = {"DRY_RUN": "1"}
  pulled = _run("stage", "gs://b/models/m", "/home/u/models", env=env).stdout
  assert "--worker=all" in pulled
  assert "gcloud storage cp -r gs://b/models/m /home/u/models" in pulled
  sent = _run("stage", "data.parquet", "/home/u/data", env=env).stdout
  assert "tpu-vm scp --recurse data.parquet fipo-v5p-128:/home/u/data" in sent
  assert _run("stage", "only-one-arg", env=env).returncode == 2
