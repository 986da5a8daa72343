"""Bad configs, bad data, non-finite updates and crashing verifiers never corrupt or kill a run
silently."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import padded_layout
import pytest

from fipo_jax import config as config_lib
from fipo_jax import models, recipes
from fipo_jax.rl import optimizer, rewards, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def warm(warm_server):
  """The CLI runs fork from one process that has imported what they import: each skips ~10
  CPU-s of imports (tests/warm_python.py). JAX_LOG_COMPILES: a compile would show in stderr."""
  # One device: the mesh case below relies on it.
  return warm_server.with_env(conftest.child_env(JAX_LOG_COMPILES="1"))


def _main(warm, tmp_path, *overrides: str) -> subprocess.CompletedProcess:
  return warm.run("-m", "fipo_jax.main", "--config", "configs/tiny_cpu.py:runlocal",
                  "--workdir", tmp_path / "w", *overrides, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,field", [
  (("--config.rl.bogus=1",), "rl.bogus"),  # unknown key
  (("--config.rl.n=abc",), "config.rl.n"),  # wrong type
  (("--config.rl.ppo_mini_batch_size=3",), "rl.train_batch_size"),  # batches do not divide
  (("--config.mesh.data=3",), "mesh."),  # 3 devices asked, 1 present
  (("--config.rl.clip_ratio_low=0.5", "--config.rl.clip_ratio_high=0.1"), "rl.clip_ratio_low"),
  (("--config.model.hf_dir=/nonexistent/model",), "model.hf_dir"),
])
def test_bad_config_exits_2_with_one_line_before_compiling(tmp_path, overrides, field, warm):
  res = _main(warm, tmp_path, *overrides)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = [ln for ln in res.stderr.splitlines() if ln.startswith("config error:")]
  assert len(lines) == 1 and field in lines[0], res.stderr[-2000:]
  assert "Compiling" not in res.stderr + res.stdout


def _write_rows(path: pathlib.Path, *, lengths=(4,) * 6, drop: str | None = None) -> str:
  """verl rows 'Q: copy <digits>=' (lengths: digits per row), without column `drop` if given."""
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415

  from fipo_jax.data import verl  # noqa: PLC0415

  rows = [verl.make_row(f"Q: copy {'7' * k}=", "7" * k, data_source="math_dapo", index=i,
                        split="train") for i, k in enumerate(lengths)]
  table = pa.Table.from_pylist(rows)
  pq.write_table(table.drop_columns([drop]) if drop else table, path)
  return str(path)


def _recipe(tmp_path: pathlib.Path, train: str, val: str) -> str:
  """A recipe file: tiny_cpu:runlocal on verl files with the character tokenizer."""
  path = tmp_path / "recipe.py"
  path.write_text(
    "from configs import tiny_cpu\n\n\ndef get_config(arg=None):\n"
    "  c = tiny_cpu.get_config('runlocal')\n"
    "  c.data.task = 'verl'\n"
    f"  c.model.tokenizer_dir = {str(ROOT / 'tests/testdata/tiny_tokenizer')!r}\n"
    f"  c.data.train_files = [{train!r}]\n"
    f"  c.data.val_files = [{val!r}]\n"
    "  return c\n")
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
  ("empty_train", r"setup error: DataError: no rows in \S*empty.parquet"),
  ("train_without_reward", r"setup error: DataError: \S*bad.parquet has no column 'reward_model'"),
  ("val_without_reward", r"setup error: DataError: \S*bad.parquet has no column 'reward_model'"),
  ("too_long_with_error", r"setup error: PromptTooLongError: row 5 of \S*long.parquet .*prompt "
                          r"of 49 tokens > data.max_prompt_length=16 \(data.truncation='error'\)"),
])
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, case, message, warm):
  good = _write_rows(tmp_path / "good.parquet")
  train, val, extra = good, good, []
  if case == "empty_train":
    train = _write_rows(tmp_path / "empty.parquet", lengths=())
  elif case == "train_without_reward":
    train = _write_rows(tmp_path / "bad.parquet", drop="reward_model")
  elif case == "val_without_reward":
    val = _write_rows(tmp_path / "bad.parquet", drop="reward_model")
  else:  # the last row is too long: refused at setup, not when the iterator meets it
    train = _write_rows(tmp_path / "long.parquet", lengths=(4,) * 5 + (40,))
    extra = ["--config.data.truncation=error", "--config.data.max_prompt_length=16"]
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  res = warm.run("-m", "fipo_jax.main", "--config", _recipe(tmp_path, train, val),
                 "--workdir", workdir, *extra, cwd=ROOT)
  lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
  assert re.match(message, lines[0]), lines[0]
  assert "Traceback" not in res.stderr and "Compiling" not in res.stderr + res.stdout
  assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def _tiny():
  cfg = models.get_preset("qwen2.5-0.5b", param_dtype="float32", dtype="float32",
                          **recipes.tiny_model().to_dict())
  from flax import nnx  # noqa: PLC0415

  return nnx.split(models.init_model(cfg, seed=0))


def _batch(advantages: float, b: int = 4, p: int = 3, t: int = 4) -> steps.Batch:
  ids = (np.arange(b * (p + t)).reshape(b, p + t) % 50 + 3).astype(np.int32)
  return padded_layout.batch(
    list(ids[:, :p]), list(ids[:, p:]), np.linspace(-1, 1, b, dtype=np.float32) * advantages,
    p=p, t=t, old_log_probs=np.full((b, t), -4.0, np.float32))


@pytest.mark.parametrize("poison", [np.inf, np.nan])
@pytest.mark.slow
def test_nonfinite_update_is_skipped_and_params_untouched(poison):
  graphdef, params = _tiny()
  tx, _ = optimizer.make_optimizer(
    config_lib.OptimSection(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
    total_updates=1)
  cfg = steps.UpdateConfig()
  step = jax.jit(lambda p, o, b: steps.train_step(graphdef, p, o, b, cfg=cfg, tx=tx))
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
  cfg = rewards.RewardConfig(max_response_length=16, overlong_buffer_len=4)

  def verifier(text, gt):
    if "boom" in text:
      raise RecursionError("deep")
    if "nan" in text:
      return {"score": float("nan"), "acc": True}
    return {"score": 1.0, "acc": True}

  s = rewards.score_responses(
    ["boom", "nan", "ok", "ok"], [1, 1, 1, 1], ["1", "1", "1", "x" * 5000], cfg, verifier)
  assert s.errors == 3  # crash, NaN score, over-long ground truth
  np.testing.assert_array_equal(s.scores, [-1.0, -1.0, 1.0, -1.0])
  np.testing.assert_array_equal(s.acc, [False, False, True, False])


def test_verifier_sees_only_the_bounded_tail():
  cfg = rewards.RewardConfig(max_response_length=16, overlong_buffer_len=4)
  seen = []
  rewards.score_responses(["x" * 10**6 + "Answer: 3"], [1], ["3"], cfg,
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

  def fake_step(rc, env, steps, state):
    seen.setdefault("params", state.params)
    return state.replace(step=state.step + 1), {"train/nonfinite_updates": next(bad)}

  monkeypatch.setattr(trainer, "rl_step", fake_step)
  with pytest.raises(trainer.TrainingDiverged, match="2 consecutive steps.*checkpointed at step 3"):
    trainer.run(config, str(tmp_path), devices=jax.devices()[:1])
  mgr = ckpt_lib.CheckpointManager(str(tmp_path / "checkpoints"))
  assert mgr.latest_step() == 3
  step, params = mgr.restore_params(params=seen["params"])
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      params, seen["params"])
  assert all(jax.tree.leaves(same))
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/skipped_steps"] for r in rows] == [0, 1, 2]


def test_truncation_counters_reach_metrics_jsonl(tmp_path, monkeypatch, caplog):
  from configs import tiny_cpu  # noqa: PLC0415
  from fipo_jax.rl import trainer  # noqa: PLC0415

  config = tiny_cpu.get_config("runlocal")
  config.data.task, config.model.tokenizer_dir = "verl", str(ROOT / "tests/testdata/tiny_tokenizer")
  config.data.train_files = [_write_rows(tmp_path / "train.parquet", lengths=(4, 30, 4, 30))]
  config.data.val_files = []
  config.data.max_prompt_length = 16
  config.sft.steps, config.eval_every, config.total_steps, config.checkpoint_every = 0, 0, 2, 0

  def fake_step(rc, env, steps, state):
    batch = env.train_data.next_batch(4)  # one epoch: both long prompts
    assert all(len(ex["prompt_ids"]) <= 16 for ex in batch)
    return state.replace(step=state.step + 1), {"train/nonfinite_updates": 0}

  monkeypatch.setattr(trainer, "rl_step", fake_step)
  with caplog.at_level("WARNING", logger="fipo_jax.data.pipeline"):
    trainer.run(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [r["data/truncated_prompts"] for r in rows] == [2, 4]
  assert [r["data/dropped_prompts"] for r in rows] == [0, 0]
  assert sum("prompt of 39 tokens > data.max_prompt_length=16" in r.getMessage()
             for r in caplog.records) == 1
