"""benchmarks/old_log_probs.py runs end to end (--quick) and prints what its docstring promises.

Only the output's shape and arithmetic are checked; timings are never asserted.
"""

import json
import os

import conftest
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_old_log_probs_benchmark_reports_both_sources(warm_server):
  # One device (the conftest mesh is not needed here), forked from the warm server.
  res = warm_server.run(os.path.join(_ROOT, "benchmarks", "old_log_probs.py"), "--quick",
                        cwd=_ROOT, env=conftest.child_env())  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert r["trainer_s"] > 0 and r["sampler_s"] > 0 and r["gen_s"] > 0
  assert r["ratio"] == pytest.approx(r["sampler_s"] / r["trainer_s"])
  assert r["saving"] == pytest.approx(1 - r["ratio"])
  assert r["step_ratio"] == pytest.approx(
    (r["gen_s"] + r["sampler_s"]) / (r["gen_s"] + r["trainer_s"])
  )
  assert r["pass_share"] == pytest.approx(r["pass_s"] / (r["pass_s"] + r["updates_s"]))
  assert 0 < r["pass_s"] < r["trainer_s"] and r["updates_s"] <= r["sampler_s"]
  assert r["updates"] == 2 and r["tokens"] > 0
  assert "ratio" in out.splitlines()[-2] and "saving" in out.splitlines()[-2]
