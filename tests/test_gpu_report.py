"""benchmarks/gpu_report.py --smoke runs end to end on CPU and ends with its JSON line, so the
GPU report cannot rot between the days a GPU is lent. Timings are never asserted."""

import json
import os
import sys

import pytest

from fipo_jax import config as config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

import conftest  # noqa: E402
import gpu_report  # noqa: E402


def test_the_gpu_runs_rl_step_config_validates():
  rc = config_lib.validate(gpu_report.rl_step_config(smoke=False), check_paths=False)
  assert rc.model.dtype == "bfloat16" and not rc.model.overrides and rc.total_steps == 1


@pytest.mark.slow
def test_gpu_report_smoke_ends_with_its_json(warm_server):
  warm = warm_server.with_env(conftest.child_env())  # one device is enough
  proc = warm.run(os.path.join(_ROOT, "benchmarks", "gpu_report.py"), "--smoke", cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  report = json.loads(out.strip().splitlines()[-1])
  assert report["platform"] == "cpu" and report["smoke"] is True
  train = report["train"]["qwen2.5-0.5b"]
  assert train["kernel"]["attention"] == "blockwise" and train["kernel"]["step_s"] > 0
  assert train["kernel"]["model_flops"] > 0 and train["real_tokens"] <= train["row_tokens"]
  dec = report["decode"]["qwen2.5-0.5b"]
  assert dec["tokens_per_s"] > 0 and dec["slot_utilisation"] > 0
  att = dec["attention"]
  assert (att["kernel"], att["fallback"]) == ("gather_per_head", "gather_grouped")
  # bf16 outputs of the same attention: on a CPU the two formulations agree exactly and the
  # Pallas interpreter is 2**-7 off (one bf16 step between 1 and 2); twice that is the bound.
  assert att["max_abs_diff"] <= 2 * 2**-7
  assert att["interpret_max_abs_diff"] <= 2 * 2**-7  # the GPU kernel in the Pallas interpreter
  split = report["rl_step"]["split"]
  assert set(split) == {"gen", "old_log_prob", "update_actor"}
  assert all(v > 0 for v in split.values())
  assert sum(split.values()) <= 1.0
  assert report["gpu_tests"] == {"skipped": "no GPU"}
