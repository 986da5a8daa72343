"""Crash, preemption and partial-save recovery of `python -m fipo_jax.main`, with real processes.

One uninterrupted reference run (module fixture) is compared with runs that are killed (-9),
preempted (SIGTERM) or killed inside a checkpoint save and then restarted with the same command:
every step's metrics must equal the reference's to the last bit (timings excluded).

The runs use `tiny_cpu:runlocal` with group filtering off (most steps then update) and a
checkpoint every step. The persistent compilation cache shared by the suite's processes keeps the
restarts cheap on 2 cores, so do runs forked from one process that has already imported what the
trainer imports (tests/warm_python.py: each run is still its own process, killed or signalled as
a user's would be), and every run starts from tiny_cpu's stored supervised warm start
(tests/testdata/tiny_cpu_sft.npz as the reference's WORKDIR/sft cache, copied): the warm start
is deterministic and ahead of every fault, and the runs are RL steps only.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import conftest
import pytest
import warm_python

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
ARGS = ("--config", "configs/tiny_cpu.py:runlocal", f"--config.total_steps={TOTAL_STEPS}",
        "--config.checkpoint_every=1", "--config.keep_checkpoints=3",
        "--config.rl.filter_groups_enable=False")
MAIN = ("-m", "fipo_jax.main")
# The trainer, SIGKILLed as soon as the save of step 3 has started (a test-only entry point).
KILL_IN_SAVE_3 = (str(ROOT / "tests" / "kill_in_save.py"), "3")
VOLATILE = ("timing_s/", "perf/")  # wall-clock measurements differ between any two runs


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
  # One CPU device is plenty for these runs and compiles fastest.
  env = conftest.child_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _start(workdir: pathlib.Path, warm: warm_python.WithEnv, entry: tuple[str, ...] = MAIN,
           warm_start: pathlib.Path | None = None) -> warm_python.Run:
  """Starts a run in `workdir`, with `warm_start` (a WORKDIR/sft cache) copied there if given;
  its stdout and stderr go to one file."""
  if warm_start is not None:
    shutil.copytree(warm_start, workdir / "sft")
  return warm.start(*entry, *ARGS, "--workdir", workdir, cwd=ROOT, merge_stderr=True)


def _finish(proc: warm_python.Run) -> tuple[int, str]:
  proc.wait()
  return proc.returncode, proc.out.read_text()


def _run(workdir: pathlib.Path, warm: warm_python.WithEnv, entry: tuple[str, ...] = MAIN,
         warm_start: pathlib.Path | None = None) -> tuple[int, str]:
  return _finish(_start(workdir, warm, entry, warm_start))


def _finalised_steps(workdir: pathlib.Path) -> list[int]:
  """Steps whose checkpoint directory orbax has finalised (renamed from its tmp name)."""
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _wait_for_checkpoint(proc: warm_python.Run, workdir: pathlib.Path, step: int) -> None:
  while step not in _finalised_steps(workdir):
    if proc.poll() is not None:
      pytest.fail(f"run exited (rc={proc.returncode}) before checkpoint {step}: "
                  f"{_finish(proc)[1][-2000:]}")
    time.sleep(0.02)


def _metrics(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _assert_same_run(workdir: pathlib.Path, reference: list[dict]) -> None:
  got = _metrics(workdir)
  assert [r["step"] for r in got] == list(range(TOTAL_STEPS + 1))
  for want, have in zip(reference, got, strict=True):
    assert have == want, f"step {want['step']} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """The test run's persistent compilation cache (conftest.py), so these one-device tiny_cpu
  runs share compiled programs with the others of the suite (test_config_cli, test_inspect)."""
  return pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR")
                      or tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def warm(cache_dir, warm_server):
  """The server the runs are forked from (tests/warm_python.py)."""
  return warm_server.with_env(_env(cache_dir))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, cache_dir) -> pathlib.Path:
  """The uninterrupted run's workdir (metrics.jsonl, its warm start in sft/). A fresh
  interpreter, unlike the warm runs compared with it: another hash seed (string sets iterate in
  another order), so the comparisons also span processes that differ there."""
  workdir = tmp_path_factory.mktemp("reference")
  conftest.write_tiny_cpu_sft_cache(workdir)  # tiny_cpu's stored warm start: RL steps only
  proc = subprocess.run([sys.executable, *MAIN, *ARGS, "--workdir", workdir], cwd=ROOT,
                        env=_env(cache_dir), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def warm_start(reference_dir) -> pathlib.Path:
  """The reference run's warm start (WORKDIR/sft), which every other run starts from."""
  return reference_dir / "sft"


@pytest.fixture(scope="module")
def reference(reference_dir) -> list[dict]:
  rows = _metrics(reference_dir)
  assert [r["step"] for r in rows] == list(range(TOTAL_STEPS + 1))
  # The comparison is only meaningful if the steps really update the policy, before and after
  # the checkpoints the interrupted runs resume from (steps 2-3). A step whose groups all score
  # alike has zero advantages, hence a zero gradient, and that is part of the run, not a fault.
  updated = [r["step"] for r in rows[1:] if r["actor/grad_norm"] > 0]
  assert len(updated) >= TOTAL_STEPS // 2 and min(updated) <= 3 < max(updated), updated
  return rows


def test_kill9_after_second_checkpoint_resumes_bit_exact(tmp_path, warm, reference,
                                                         warm_start):
  proc = _start(tmp_path, warm, warm_start=warm_start)
  _wait_for_checkpoint(proc, tmp_path, 2)
  time.sleep(random.uniform(0.0, 0.6))
  assert proc.poll() is None, "run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  rc, _ = _finish(proc)
  assert rc == -signal.SIGKILL
  killed_at = max(r["step"] for r in _metrics(tmp_path))
  assert killed_at < TOTAL_STEPS

  rc, err = _run(tmp_path, warm)
  assert rc == 0, err[-3000:]
  assert "resumed from step" in err
  _assert_same_run(tmp_path, reference)


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, warm, reference, warm_start):
  proc = _start(tmp_path, warm, warm_start=warm_start)
  _wait_for_checkpoint(proc, tmp_path, 2)
  assert proc.poll() is None, "run finished before the signal; make it longer"
  proc.send_signal(signal.SIGTERM)
  rc, err = _finish(proc)
  assert rc == 0, err[-3000:]
  stopped_at = max(r["step"] for r in _metrics(tmp_path))
  assert stopped_at < TOTAL_STEPS, "the signal did not stop the run"
  assert f"stopping after step {stopped_at}" in err
  assert _finalised_steps(tmp_path)[-1] == stopped_at  # the checkpoint of the step it stopped at

  rc, err = _run(tmp_path, warm)
  assert rc == 0, err[-3000:]
  assert f"resumed from step {stopped_at}" in err
  _assert_same_run(tmp_path, reference)


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path, warm, reference,
                                                          warm_start):
  rc, log = _run(tmp_path, warm, KILL_IN_SAVE_3, warm_start)
  assert "Traceback" not in log, log[-3000:]
  assert rc == -signal.SIGKILL
  assert _finalised_steps(tmp_path)[-1] == 2  # step 3 was being written: never finalised
  assert max(r["step"] for r in _metrics(tmp_path)) == 3  # its metrics row was already logged

  rc, err = _run(tmp_path, warm)
  assert rc == 0, err[-3000:]
  assert "resumed from step 2" in err
  _assert_same_run(tmp_path, reference)
