"""benchmarks/async_rollout.py runs end to end in its smoke mode and ends with its JSON line.

Only the output's shape and the partial run's staleness bound are checked; timings never are."""

import json
import pathlib
import subprocess
import sys

import conftest
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles a tiny engine's prefill shapes for both modes
def test_async_rollout_benchmark_quick_ends_with_partial_over_sync():
  env = conftest.child_env()  # one device: the benchmark's engine runs on one
  cmd = [sys.executable, str(ROOT / "benchmarks" / "async_rollout.py"), "--quick"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["partial_over_sync"] > 0 and summary["sampling_partial_over_sync"] > 0
  assert summary["sync"]["staleness_max"] == 0
  assert 0 <= summary["partial"]["staleness_max"] <= summary["eta"] == 1
  assert summary["sync"]["timed_steps"] == summary["partial"]["timed_steps"] == 2
  assert "partial_over_sync" in out.splitlines()[-2] and "target >= 1.3" in out.splitlines()[-2]
