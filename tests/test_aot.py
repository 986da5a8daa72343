"""fipo_jax.aot end to end: compile a tiny recipe for a 4-chip v5p slice in a subprocess.

The AOT tool needs libtpu (the `tpu` extra) and runs in its own process so that libtpu never
touches this test process's CPU backend.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[tpu]')")


def _run_aot(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run(
    [sys.executable, "-m", "fipo_jax.aot", "--config", "configs/fipo_qwen2_5_32b.py:runlocal",
     *args], cwd=ROOT, env=env, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  return proc, json.loads(lines[-1]) if lines else None


@pytest.mark.slow
def test_aot_tiny_recipe_fits_v5p_8():
  proc, out = _run_aot("--topology", "v5p-8")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert out["topology"] == "v5p-8" and out["chips"] == 4
  assert out["hbm_per_chip_bytes"] > 90 * 2**30
  assert out["libtpu_version"]
  for step in ("train_step", "prefill", "decode"):
    s = out[step]
    assert s["error"] is None
    assert 0 < s["total_bytes_per_chip"] < out["hbm_per_chip_bytes"]
    assert s["flops"] > 0 and s["compile_seconds"] > 0
  # The train step does forward + backward: more FLOPs per call than one decode step.
  assert out["train_step"]["flops"] > out["decode"]["flops"]
  assert out["fits"] is True


def test_aot_unknown_topology_fails_clearly():
  proc, _ = _run_aot("--topology", "v9x-1", "--steps", "decode")
  assert proc.returncode != 0
  assert "unknown topology" in proc.stderr
