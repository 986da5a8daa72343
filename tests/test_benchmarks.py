"""The loss and sampling benchmarks run end to end at tiny sizes and print what they promise.

Only the output's shape and the correctness column are checked: timings are never asserted.
"""

import json
import os
import re
import subprocess
import sys

import conftest
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_future_kl_benchmark_runs_and_profiles():
  env = conftest.child_env()  # one device; the conftest mesh is not needed here
  cmd = [
    sys.executable,
    os.path.join(_ROOT, "benchmarks", "future_kl.py"),
    *("--lengths", "300", "--batch", "2", "--repeats", "2", "--rounds", "1"),
    *("--official-repeats", "1", "--profile"),
  ]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  (row,) = [line for line in out.splitlines() if line.split()[:1] == ["300"]]
  fields = row.split()
  ratios = [float(x) for x in fields[1:12]]
  assert all(r > 0 for r in ratios), row
  # our future_kl agrees with the official algorithm (float32 rounding)
  err = float(re.search(r"max \|ours - official\| ([0-9.e+-]+)", row).group(1))
  assert err < 1e-4, row
  for name in ("fipo", "dapo"):
    header = re.search(rf"{name} loss\+grad at T=300: (\d+) us in (\d+) kernels", out)
    assert header and int(header.group(2)) >= 2, out
  # FIPO's extra kernels (the chunk matmul, the influence weights) show up in its profile
  fipo_part = out.split("fipo loss+grad")[1].split("dapo loss+grad")[0]
  dapo_part = out.split("dapo loss+grad")[1]
  assert fipo_part.count(" us  ") > dapo_part.count(" us  "), out


@pytest.mark.slow
def test_sampling_benchmark_quick_ends_with_the_issue_17_json():
  env = conftest.child_env()
  cmd = [sys.executable, os.path.join(_ROOT, "benchmarks", "sampling.py"), "--quick"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  summary = json.loads(out.strip().splitlines()[-1])
  assert set(summary) >= {"prefill_per_prompt", "decode_fill_ratio", "decode_roofline",
                          "long_tail_speedup", "device_busy"}  # fmt: skip
  # Counts, not timings: the new driver prefills each prompt once, the reference n = 16 times.
  pf = summary["prefill_per_prompt"]
  assert (pf["rows"], pf["tokens"], pf["reference_rows"], pf["reference_tokens"]) == (1, 1, 16, 16)
  for key in ("decode_fill_ratio", "decode_roofline", "long_tail_speedup", "device_busy"):
    assert summary[key] > 0, (key, summary)
  for key in ("prefill_per_prompt:", "decode_fill_ratio:", "long_tail_speedup:", "device_busy:"):
    assert key in out and "target" in out.split(key)[1].splitlines()[0], key
