"""benchmarks/async_rollout.py runs end to end in its smoke mode and ends with its JSON line.

Only the output's shape, the partial run's staleness bound and the stage-B projection's
arithmetic are checked; timings never are."""

import json
import pathlib

import conftest
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles a tiny engine's prefill shapes for both modes, and stage B's
def test_async_rollout_benchmark_quick_ends_with_partial_over_sync(warm_server):
  # one device: the benchmark gives itself a second for stage B (--disaggregated)
  warm = warm_server.with_env(conftest.child_env())
  proc = warm.run(ROOT / "benchmarks" / "async_rollout.py", "--quick", "--disaggregated", cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["partial_over_sync"] > 0 and summary["sampling_partial_over_sync"] > 0
  assert summary["sync"]["staleness_max"] == 0
  assert 0 <= summary["partial"]["staleness_max"] <= summary["eta"] == 1
  assert summary["sync"]["timed_steps"] == summary["partial"]["timed_steps"] == 2
  assert any("partial_over_sync" in line and "target >= 1.3" in line for line in out.splitlines())
  b = summary["stage_b"]
  alt, ov = b["alternating"], b["overlapped"]
  assert alt["overlap_calls"] == 0 and ov["overlap_calls"] == b["overlap_calls"] >= 1
  assert b["overlap_calls"] == b["suggested_overlap_calls"]  # the measured count, by default
  train = lambda p: p["update"] + p["stage"]
  proj = b["projected_step_s"]
  assert proj["alternating"] == pytest.approx(alt["sample"] + train(alt) + alt["rest"])
  assert proj["overlapped"] == pytest.approx(
    max(train(ov), ov["overlap"]) + ov["sample"] + ov["rest"])
  for name, p in (("alternating", alt), ("overlapped", ov)):
    share = b["busy_share"][name]
    assert share["trainer"] == pytest.approx(train(p) / proj[name])
    assert 0 < share["sampler"] <= 1 and 0 < share["trainer"] <= 1
  assert summary["projected_overlapped_over_alternating"] == pytest.approx(
    proj["alternating"] / proj["overlapped"])
  assert "wall time proves nothing" in out.splitlines()[-2]
