"""rl.reward_workers: a pool of JAX-free verifier processes scores like the trainer's process,
bounds each call on its own, and is refused below 0."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fipo_jax import config as config_lib
from fipo_jax import recipes
from fipo_jax.rl import rewards
from fipo_jax.rl.verifier_processes import IsolatedVerifier, VerifierPool

HERE = pathlib.Path(__file__).resolve().parent
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def _mixed_batch(n: int = 40):
  """n responses (right, wrong, no answer, over the size bounds) with lengths and truths."""
  texts, lengths, gts = [], [], []
  for i in range(n):
    gt, kind = str(i % 7), i % 5
    texts.append(
      [
        f"so the answer is $\\frac{{{gt}}}{{1}}$. Answer: {gt}",  # right
        f"Answer: {int(gt) + 1}\n\\boxed{{{int(gt) + 1}}}",  # wrong
        "I do not know.",  # no answer
        "x" * 6000 + f"\nAnswer: \\boxed{{{gt}}}",  # past max_response_chars
        f"Answer: {gt}",
      ][kind]
    )  # right, but its ground truth is past the bound
    gts.append(gt if kind != 4 else gt + " " * 2000)
    lengths.append(24 + i % 9)  # some inside the overlong buffer
  return texts, lengths, gts


def _cfg(reward_fn: str, workers: int) -> rewards.RewardConfig:
  return rewards.RewardConfig(
    max_response_length=32,
    overlong_buffer_len=8,
    reward_fn=reward_fn,
    max_seconds=60.0,
    reward_workers=workers,
  )


@pytest.mark.parametrize(
  "reward_fn",
  [
    "math_dapo",
    pytest.param(
      "math_verify", marks=pytest.mark.skipif(not HAS_MATH_VERIFY, reason="the [math_verify] extra")
    ),
  ],
)
def test_the_pool_scores_a_mixed_batch_like_the_serial_path(reward_fn):
  batch = _mixed_batch()
  serial = rewards.score_responses(*batch, _cfg(reward_fn, 0))
  pool_cfg = _cfg(reward_fn, 3)
  pooled = rewards.score_responses(*batch, pool_cfg)
  pool = rewards.verifier(pool_cfg).score_fn
  assert isinstance(pool, VerifierPool) and all(m.running for m in pool.members)
  assert pooled.preds == serial.preds and pooled.errors == serial.errors == 8
  for field in ("scores", "verifier_scores", "acc", "overlong"):
    np.testing.assert_array_equal(getattr(pooled, field), getattr(serial, field), err_msg=field)
  assert serial.acc.any() and not serial.acc.all() and serial.overlong.any()
  assert rewards.verifier(pool_cfg).score_fn is pool  # one pool per process and setting


@pytest.fixture
def hanging_pool(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
  pool = VerifierPool("hanging_verifier:score", workers=2, max_seconds=1.0)
  yield pool
  pool.close()


def test_a_hanging_or_dying_call_is_scored_wrong_alone_and_its_child_replaced(hanging_pool):
  texts = [f"Answer: {i}" for i in range(12)]
  texts[3], texts[8] = "HANG", "DIE"
  cfg = _cfg("math_dapo", 0)
  s = rewards.score_responses(texts, [1] * 12, [str(i) for i in range(12)], cfg, hanging_pool)
  assert s.errors == 2 and s.preds[3] == s.preds[8] == "[ERROR]"
  assert s.acc.tolist() == [i not in (3, 8) for i in range(12)]
  assert s.verifier_scores.tolist() == [-1.0 if i in (3, 8) else 1.0 for i in range(12)]
  assert hanging_pool("Answer: 5", "5")["acc"] is True  # new children took over


def test_the_pool_has_several_calls_in_flight(hanging_pool, tmp_path):
  """Two MEET calls return only when both children are in them at once (else: past the bound)."""
  hanging_pool.members[0].max_seconds = hanging_pool.members[1].max_seconds = 60.0
  texts = ["Answer: 0", f"MEET:{tmp_path}:2", "Answer: 2", f"MEET:{tmp_path}:2", "Answer: 4"]
  s = rewards.score_responses(
    texts, [1] * 5, ["0", "x", "2", "x", "4"], _cfg("math_dapo", 0), hanging_pool
  )
  assert s.errors == 0 and s.preds == ["0", "met", "2", "met", "4"]
  assert len(list(tmp_path.iterdir())) == 2  # two children met


def _no_process(*args, **kwargs):
  raise OSError(11, "Resource temporarily unavailable")  # fork refused: too many processes


@pytest.mark.parametrize("how", ["no ready line", "no process"])
def test_a_pool_whose_workers_cannot_start_scores_every_response_wrong(how, monkeypatch):
  if how == "no process":
    monkeypatch.setattr(subprocess, "Popen", _no_process)
  pool = VerifierPool("no_such_module:score", workers=2, max_seconds=10.0)
  s = rewards.score_responses(["Answer: 1"] * 3, [1] * 3, ["1"] * 3, _cfg("math_dapo", 0), pool)
  assert s.errors == 3 and s.preds == ["[ERROR]"] * 3 and not any(m.running for m in pool.members)


@pytest.mark.parametrize(
  "name",
  [
    "math_dapo",
    pytest.param(
      "math_verify", marks=pytest.mark.skipif(not HAS_MATH_VERIFY, reason="the [math_verify] extra")
    ),
  ],
)
def test_the_worker_imports_no_jax(name):
  v = IsolatedVerifier(name, max_seconds=60.0)
  try:
    assert v("$\\boxed{2}$\nAnswer: 2", "2")["acc"] is True
    assert v.ready == {"ready": True, "heavy_modules": []}
  finally:
    v.close()


def test_negative_reward_workers_are_refused_and_a_count_reaches_the_reward_config():
  c = recipes.base()
  c.rl.reward_workers = -1
  with pytest.raises(
    config_lib.ConfigError,
    match=r"^rl.reward_workers: must be >= 0 \(verifier processes; 0 scores in "
    r"the trainer's process\), got -1$",
  ):
    config_lib.validate(c, check_paths=False)
  c.rl.reward_workers = 2
  rc = config_lib.validate(c, check_paths=False)
  assert rewards.RewardConfig.from_section(rc.rl).reward_workers == 2


def test_the_benchmark_compares_serial_and_pool_scoring():
  res = subprocess.run(
    [sys.executable, str(HERE.parent / "benchmarks/reward_pool.py"), "--n", "24", "--repeats", "1"],
    capture_output=True,
    text=True,
    check=True,
  )
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["reward_fn"] == "math_dapo" and out["n"] == 24 and out["workers"] == 2
  assert out["serial_s"] > 0 and out["pool_s"] > 0 and out["errors"] == 0
