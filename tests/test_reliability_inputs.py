"""Bad configs, non-finite updates and crashing verifiers never corrupt or kill a run silently."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fipo_jax import models
from fipo_jax.rl import rollout
from fipo_jax.rl import train_step as ts

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device: the mesh case below relies on it
  return subprocess.run(
    [sys.executable, "-m", "fipo_jax.main", "--config", "configs/tiny_cpu.py:runlocal",
     "--workdir", str(tmp_path / "w"), *overrides],
    cwd=ROOT, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,field", [
  (("--config.rl.bogus=1",), "rl.bogus"),  # unknown key
  (("--config.rl.n=abc",), "config.rl.n"),  # wrong type
  (("--config.rl.ppo_mini_batch_size=3",), "rl.train_batch_size"),  # batches do not divide
  (("--config.mesh.data=3",), "mesh."),  # 3 devices asked, 1 present
  (("--config.rl.clip_ratio_low=0.5", "--config.rl.clip_ratio_high=0.1"), "rl.clip_ratio_low"),
  (("--config.model.hf_dir=/nonexistent/model",), "model.hf_dir"),
])
def test_bad_config_exits_2_with_one_line_before_compiling(tmp_path, overrides, field):
  res = _main(tmp_path, *overrides)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = [ln for ln in res.stderr.splitlines() if ln.startswith("config error:")]
  assert len(lines) == 1 and field in lines[0], res.stderr[-2000:]
  assert "Compiling" not in res.stderr + res.stdout


def _tiny():
  cfg = models.get_preset("qwen2.5-0.5b", param_dtype="float32", dtype="float32",
                          **common.tiny_model().to_dict())
  from flax import nnx  # noqa: PLC0415

  return nnx.split(models.init_model(cfg, seed=0))


def _batch(advantages: float, b: int = 4, p: int = 3, t: int = 4) -> ts.PolicyBatch:
  ids = (np.arange(b * (p + t)).reshape(b, p + t) % 50 + 3).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  return ts.PolicyBatch(
    input_ids=jnp.asarray(ids), attention_mask=jnp.ones((b, p + t), jnp.int32),
    positions=jnp.broadcast_to(jnp.arange(p + t, dtype=jnp.int32), (b, p + t)),
    response_mask=jnp.asarray(mask), old_log_probs=jnp.full((b, t), -4.0, jnp.float32),
    advantages=jnp.asarray(np.linspace(-1, 1, b, dtype=np.float32)[:, None] * mask * advantages))


@pytest.mark.parametrize("poison", [np.inf, np.nan])
def test_nonfinite_update_is_skipped_and_params_untouched(poison):
  graphdef, params = _tiny()
  tx = ts.make_optimizer(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
  step = jax.jit(lambda p, o, b: ts.train_step(graphdef, p, o, b, cfg=ts.UpdateConfig(), tx=tx))
  opt = tx.init(params)
  good_params, good_opt, m = step(params, opt, _batch(1.0))
  assert float(m["train/skipped_step"]) == 0.0
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, good_params))
  assert any(changed)  # a finite batch does update

  bad_params, bad_opt, m = step(good_params, good_opt, _batch(poison))
  assert float(m["train/skipped_step"]) == 1.0
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
  assert all(jax.tree.leaves(jax.tree.map(same, bad_params, good_params)))
  assert all(jax.tree.leaves(jax.tree.map(same, bad_opt, good_opt)))


def test_crashing_or_nan_verifier_scores_wrong_and_is_counted():
  cfg = rollout.RewardConfig(max_response_length=16, overlong_buffer_len=4)

  def verifier(text, gt):
    if "boom" in text:
      raise RecursionError("deep")
    if "nan" in text:
      return {"score": float("nan"), "acc": True}
    return {"score": 1.0, "acc": True}

  scores, acc, _, _, errors = rollout.score_responses(
    ["boom", "nan", "ok", "ok"], [1, 1, 1, 1], ["1", "1", "1", "x" * 5000], cfg, verifier)
  assert errors == 3  # crash, NaN score, over-long ground truth
  np.testing.assert_array_equal(scores, [-1.0, -1.0, 1.0, -1.0])
  np.testing.assert_array_equal(acc, [False, False, True, False])


def test_verifier_sees_only_the_bounded_tail():
  cfg = rollout.RewardConfig(max_response_length=16, overlong_buffer_len=4)
  seen = []
  rollout.score_responses(["x" * 10**6 + "Answer: 3"], [1], ["3"], cfg,
                          lambda t, g: seen.append(len(t)) or {"score": 1.0, "acc": True})
  assert seen == [cfg.max_response_chars]


def test_consecutive_bad_steps_stop_with_checkpoint_of_last_good_state(tmp_path, monkeypatch):
  from configs import tiny_cpu  # noqa: PLC0415
  from fipo_jax import checkpoints as ckpt_lib  # noqa: PLC0415
  from fipo_jax.rl import trainer  # noqa: PLC0415

  config = tiny_cpu.get_config("runlocal")
  config.sft.steps, config.eval_every, config.total_steps = 0, 0, 10
  config.checkpoint_every, config.max_consecutive_bad_steps = 100, 2
  # Step 1 is good, every later step has a non-finite update (params come back untouched).
  bad = iter([0, 1, 1, 1, 1])
  seen = {}

  def fake_step(rc, env, steps, params, opt_state, step):
    seen.setdefault("params", params)
    return {"train/nonfinite_updates": next(bad)}, params, opt_state

  monkeypatch.setattr(trainer, "rl_step", fake_step)
  with pytest.raises(trainer.TrainingDiverged, match="2 consecutive steps.*checkpointed at step 3"):
    trainer.run(config, str(tmp_path))
  mgr = ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints"))
  assert mgr.latest_step() == 3
  step, params = mgr.restore_params(params=seen["params"])
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      params, seen["params"])
  assert all(jax.tree.leaves(same))
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/skipped_steps"] for r in rows] == [0, 1, 2]
