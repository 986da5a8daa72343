"""benchmarks/packing.py runs end to end at a tiny size and prints what its docstring promises.

Only the output's shape and the layout arithmetic are checked; timings are never asserted.
"""

import json
import os

import conftest
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_packing_benchmark_runs_and_reports_each_case(warm_server):
  warm = warm_server.with_env(conftest.child_env())  # one device; not the conftest mesh
  cmd = [
    os.path.join(_ROOT, "benchmarks", "packing.py"),
    *("--layers", "1", "--hidden", "32", "--heads", "2", "--kv_heads", "1", "--mlp", "48"),
    *("--vocab", "64", "--prompt", "16", "--response", "112", "--batch", "6", "--block", "32"),
    *("--repeats", "1", "--means", "0.3", "0.5"),
  ]
  proc = warm.run(*cmd, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  cases = json.loads(out.strip().splitlines()[-1])["cases"]
  assert [c["mean"] for c in cases] == [0.3, 0.5]
  for c in cases:
    assert 0 < c["useful_padded"] < c["useful_packed"] <= 1
    # ideal speedup = padded tokens / packed tokens = the ratio of the useful fractions
    assert c["ideal_speedup"] == pytest.approx(c["useful_packed"] / c["useful_padded"])
    assert c["ideal_speedup"] > 1 and c["speedup"] > 0
  # A longer mean response leaves less padding to remove.
  assert cases[0]["useful_padded"] < cases[1]["useful_padded"]
  assert out.count("of ideal)") == 2
