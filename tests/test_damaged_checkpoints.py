"""A resume, eval, generate or export past a checkpoint damaged after its save, through the CLI.

One uninterrupted tiny_cpu run of 4 RL steps (module fixture, checkpoints at steps 2, 3, 4) is
copied per case; the copy's newest checkpoints are damaged as a disk fault or a half-finished
copy would leave them (a truncated data file, a missing one, empty metadata, a missing item
directory), and the same command is run again. It must warn in one line per damaged step
naming it and the reason, move each aside, resume from the newest step that restores, count the
skips in `train/checkpoints_skipped`, and redo the later steps exactly as the uninterrupted run
did. With every kept step damaged it must stop with one line and exit 2 before any training.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import conftest
import pytest
import warm_python

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ("--config", "configs/tiny_cpu.py", "--config.total_steps=4", "--config.checkpoint_every=1",
        "--config.keep_checkpoints=3", "--config.eval_every=0",
        "--config.rl.filter_groups_enable=False",  # every step updates (a real comparison)
        # tiny_cpu:runlocal's sizes (its SFT comes from the stored warm start instead):
        "--config.data.synthetic.num_train=128", "--config.data.synthetic.num_val=8",
        "--config.rl.n=4", "--config.rl.train_batch_size=4", "--config.rl.gen_batch_size=8",
        "--config.rl.ppo_mini_batch_size=2", "--config.rl.ppo_micro_batch_size_per_device=8")
VOLATILE = ("timing_s/", "perf/")  # wall-clock measurements differ between any two runs
SKIPPED = "train/checkpoints_skipped"


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
  # One CPU device: bit-exact. XLA's default level: measured quicker here (tests/conftest.py).
  env = conftest.child_env(flags=conftest.WARM_START_XLA_FLAGS,
                           JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _cli(warm: warm_python.WithEnv, *args: str) -> subprocess.CompletedProcess:
  """`python *args`, forked from the module's warm server (tests/warm_python.py)."""
  return warm.run(*args, cwd=ROOT)


def _train(workdir: pathlib.Path, warm: warm_python.WithEnv) -> subprocess.CompletedProcess:
  return _cli(warm, "-m", "fipo_jax.main", *ARGS, "--workdir", str(workdir))


def _metrics(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _steps(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _error_lines(stderr: str) -> list[str]:
  """stderr without absl/orbax/jax log lines and warnings: what a user is told to act on."""
  return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("I", "W", "E"))
          and "Warning" not in ln]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """The test run's persistent compilation cache (conftest.py), so these one-device tiny_cpu
  runs share compiled programs with the others of the suite (test_config_cli, test_inspect)."""
  return pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR")
                      or tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def warm(cache_dir, warm_server):
  """The runs (trainer, eval, generate, export) fork from one process that has imported what
  they import: each skips ~10 CPU-s of imports (tests/warm_python.py)."""
  return warm_server.with_env(_env(cache_dir))


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir) -> pathlib.Path:
  """The uninterrupted run: metrics of steps 1-4, checkpoints 2, 3 and 4. A fresh interpreter,
  unlike the warm runs compared with it: another hash seed (string sets iterate in another
  order), so the comparisons also span processes that differ there."""
  workdir = tmp_path_factory.mktemp("base")
  conftest.write_tiny_cpu_sft_cache(workdir)
  proc = subprocess.run([sys.executable, "-m", "fipo_jax.main", *ARGS, "--workdir", workdir],
                        cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(SKIPPED not in r for r in rows)
  # Step 3's checkpoint holds updated params (from the warm start, steps 3-4's groups are all
  # solved: no update there, but their rollouts and log-probs still depend on those params).
  assert rows[0]["actor/grad_norm"] > 0 and rows[1]["actor/grad_norm"] > 0
  assert _steps(workdir) == ["2", "3", "4"]
  return workdir


def _copy(base: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(base, dst)
  return dst


def _largest_file(d: pathlib.Path) -> pathlib.Path:
  return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_data_file(step: pathlib.Path) -> None:
  f = _largest_file(step / "params")  # the weights' ocdbt data file
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_data_file(step: pathlib.Path) -> None:
  _largest_file(step / "opt_state").unlink()


def _empty_metadata(step: pathlib.Path) -> None:
  (step / "params" / "_METADATA").write_bytes(b"")


def _delete_subtree(step: pathlib.Path) -> None:
  shutil.rmtree(step / "opt_state")


def _warnings(stderr: str) -> dict[int, str]:
  """{step: reason} of the one-line 'checkpoint step k in DIR cannot be restored: why' warnings."""
  found = {}
  for line in stderr.splitlines():
    if (m := re.search(r"checkpoint step (\d+) in \S+ cannot be restored: (.+)$", line)):
      assert int(m.group(1)) not in found, f"step {m.group(1)} warned twice"
      found[int(m.group(1))] = m.group(2).strip()
  return found


def _assert_redone(workdir: pathlib.Path, base: pathlib.Path) -> list[int | None]:
  """metrics.jsonl holds steps 1-4 as the uninterrupted run logged them, but for the skip count;
  returns each step's `train/checkpoints_skipped` (None: not logged)."""
  want, got = _metrics(base), _metrics(workdir)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  counts = [g.pop(SKIPPED, None) for g in got]
  for w, g in zip(want, got, strict=True):
    assert g == w, f"step {w['step']} differs from the uninterrupted run"
  return counts


def test_resume_falls_back_past_damaged_checkpoints(tmp_path, warm, base):
  workdir = _copy(base, tmp_path / "run")
  ckpts = workdir / "checkpoints"
  _truncate_data_file(ckpts / "4")
  _delete_subtree(ckpts / "3")

  proc = _train(workdir, warm)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  warned = _warnings(proc.stderr)
  assert set(warned) == {3, 4} and all(warned.values()), proc.stderr[-3000:]  # reasons given
  assert "resumed from step 2" in proc.stderr
  assert _steps(workdir) == ["2", "3", "3.unreadable", "4", "4.unreadable"]  # moved, redone
  assert not (ckpts / "3.unreadable" / "opt_state").exists()  # the damaged one, as it was
  assert _assert_redone(workdir, base) == [None, None, 2, 2]  # from the first step after it

  # Again in the same workdir: the count carried by step 3's checkpoint grows across resumes.
  _empty_metadata(ckpts / "4")
  proc = _train(workdir, warm)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert set(_warnings(proc.stderr)) == {4}
  assert "resumed from step 3" in proc.stderr
  assert _steps(workdir) == ["2", "3", "3.unreadable", "4", "4.unreadable", "4.unreadable.2"]
  assert _assert_redone(workdir, base) == [None, None, 2, 3]


def test_no_restorable_checkpoint_stops_with_exit_2(tmp_path, warm, base):
  workdir = _copy(base, tmp_path / "run")
  _delete_data_file(workdir / "checkpoints" / "2")
  _empty_metadata(workdir / "checkpoints" / "3")
  _truncate_data_file(workdir / "checkpoints" / "4")
  before = (workdir / "metrics.jsonl").read_text()

  proc = _train(workdir, warm)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"setup error: no checkpoint in {workdir / 'checkpoints'} can be "
                             "restored (step 4: ")
  assert "; step 3: " in lines[0] and "; step 2: " in lines[0]
  assert _steps(workdir) == ["2", "3", "4"]  # nothing moved
  assert (workdir / "metrics.jsonl").read_text() == before  # nothing trained, nothing logged


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, base) -> pathlib.Path:
  """A workdir whose latest checkpoint (step 4) has a truncated weights file."""
  workdir = _copy(base, tmp_path_factory.mktemp("damaged") / "run")
  _truncate_data_file(workdir / "checkpoints" / "4")
  return workdir


def _prompts(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"prompt": "Q: copy 4831="}) + "\n")
  return path


def _assert_one_line_naming_step_4(proc: subprocess.CompletedProcess, tool: str) -> None:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = _error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"{tool}: checkpoint step 4 in ")
  assert "cannot be read" in lines[0] and "--step K (kept: 2, 3)" in lines[0]


def test_eval_generate_export_name_the_damaged_step_and_take_another(tmp_path, warm,
                                                                    damaged):
  val = damaged / "data" / "synthetic_val.jsonl"
  assert val.is_file()
  runs = {
    "eval": ("-m", "fipo_jax.eval", "--checkpoint", str(damaged), "--data", str(val), "--n=1",
             "--max_new_tokens=4", "--max_prompts=1"),
    "generate": ("-m", "fipo_jax.generate", "--checkpoint", str(damaged), "--prompts_file",
                 str(_prompts(tmp_path)), "--output", str(tmp_path / "out.jsonl"), "--n=1",
                 "--max_new_tokens=4", "--no_progress"),
    "export": ("-m", "fipo_jax.export", "--checkpoint", str(damaged), "--out",
               str(tmp_path / "hf")),
  }
  for tool, args in runs.items():
    _assert_one_line_naming_step_4(_cli(warm, *args), tool)
  assert _steps(damaged) == ["2", "3", "4"]  # readers move nothing
  for tool in ("generate", "export"):  # the way out the message names (eval's --step is the
    proc = _cli(warm, *runs[tool], "--step=3")  # same load_policy argument)
    assert proc.returncode == 0, f"{tool}: {proc.stderr[-3000:]}"
  assert (tmp_path / "out.jsonl").read_text().count("\n") == 1
  assert (tmp_path / "hf" / "config.json").is_file()
