"""Test setup: an 8-device CPU mesh, set once before jax is imported.

Different device counts in different files silently break each other, so this
is the only place that sets XLA_FLAGS for the test suite.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "testdata"
# Golden files recorded from the official implementation (tests/testdata/golden/README.md);
# FIPO_GOLDEN_DIR points the tests at another copy, e.g. the full set with held-out cases.
GOLDEN_DIR = pathlib.Path(os.environ.get("FIPO_GOLDEN_DIR", TESTDATA / "golden"))
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  if not GOLDEN_DIR.exists():
    pytest.fail(f"golden files not found at {GOLDEN_DIR} (see FIPO_GOLDEN_DIR)")
  return GOLDEN_DIR


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
  return TESTDATA
