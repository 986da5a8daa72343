"""fipo_jax.aot end to end: compile a tiny recipe for a 4-chip v5p slice in a subprocess.

The AOT tool needs libtpu (the `tpu` extra) and runs in its own process (forked from the warm
server, tests/warm_python.py) so that libtpu never touches this test process's CPU backend.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import conftest
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# libtpu comes with the `test` extra (jax[tpu]); skipped only where it could not be installed.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[test]')")


_CONFIG = "configs/fipo_qwen2_5_32b.py:runlocal"


def _run_aot(aot_warm, *args):
  """`python -m fipo_jax.aot` forked from the warm server in aot_env (conftest.aot_warm)."""
  proc = aot_warm.run("-m", "fipo_jax.aot", "--config", _CONFIG, *args, cwd=ROOT)
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  return proc, json.loads(lines[-1]) if lines else None


PHASES = ("train_step", "old_log_prob", "handover", "prefill", "insert", "decode")


@pytest.mark.slow
def test_aot_compiles_the_disaggregated_split_on_each_side(aot_warm):
  """rollout.mode='disaggregated' on v5p-8 (one host, 4 chips): the trainer's programs on 2 chips
  (fsdp=2), the sampler's on the other 2 (tensor=2), and the sampler's chips hold no train
  state (what setup.device_split gives the trainer)."""
  proc, out = _run_aot(aot_warm, "--topology", "v5p-8", "--config.model.dtype=bfloat16",
                       "--config.rollout.mode=disaggregated", "--config.rollout.sampler_devices=2",
                       "--steps=train_step,handover,decode")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert out["train_step"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert out["decode"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}
  assert out["handover"]["error"] is None and out["handover"]["param_dtype"] == "bfloat16"
  assert out["decode"]["resident_bytes_per_chip"] == {}  # no train params or moments there
  assert out["train_step"]["total_bytes_per_chip"] > 0


@pytest.mark.slow
def test_aot_tiny_recipe_fits_v5p_8_with_a_performance_model(aot_warm):
  proc, out = _run_aot(aot_warm, "--topology", "v5p-8", "--config.model.dtype=bfloat16")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert out["topology"] == "v5p-8" and out["chips"] == 4
  assert out["hbm_per_chip_bytes"] > 90 * 2**30
  assert out["libtpu_version"]
  for step in PHASES:
    s = out[step]
    assert s["error"] is None, (step, s["error"])
    assert 0 < s["total_bytes_per_chip"] < out["hbm_per_chip_bytes"]
    assert s["total_bytes_per_chip"] >= s["program_bytes_per_chip"]
    assert s["hbm_bytes"] > 0 and s["roofline_seconds"] > 0 and s["compile_seconds"] > 0
    assert s["collective_bytes"] >= 0 and s["kernel"]
  # The train state is resident while sampling: float32 params, both Adam moments (+ counters).
  res = out["decode"]["resident_bytes_per_chip"]
  assert 0 < 2 * res["train_params"] <= res["opt_state"] < 2 * res["train_params"] + 1024
  # Train in float32 masters on the train mesh (all FSDP); sample in bf16 on the trainer's own
  # sampler layout: tensor-parallel over the 2 KV heads, slots over the other 2 chips.
  assert out["train_step"]["param_dtype"] == "float32"
  assert out["train_step"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  for step in ("handover", "prefill", "insert", "decode"):
    assert out[step]["param_dtype"] == "bfloat16"
    assert out[step]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert out["train_step"]["flops"] > out["decode"]["flops"] > 0
  # Splash carries no cost estimate: aot states its FLOPs, so no train kernel goes uncounted.
  for step in ("train_step", "old_log_prob"):
    assert out[step]["kernels_without_flops"] == 0, step
  m = out["perf_model"]
  assert m["decode_weight_allgather_bytes"] == 0
  assert m["decode_tokens_per_s_per_chip"] > 0 and m["decode_bytes_over_ideal"] > 1
  assert 0 < m["train_mfu_bound"] <= 1
  assert set(m["rl_step_split"]) == {"generate", "old_log_prob", "update"}
  assert sum(m["rl_step_split"].values()) == pytest.approx(1.0)
  assert m["rl_step_seconds"] > 0
  assert out["fits"] is True


def test_aot_unknown_topology_fails_clearly():
  # A fresh interpreter: the fast tier need not start the warm server for this one run.
  proc = subprocess.run([sys.executable, "-m", "fipo_jax.aot", "--config", _CONFIG, "--topology",
                         "v9x-1", "--steps", "decode"], cwd=ROOT, env=conftest.aot_env(),
                        capture_output=True, text=True)  # fmt: skip
  assert proc.returncode != 0
  assert "unknown topology" in proc.stderr
