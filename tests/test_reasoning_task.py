"""The parity task with a chain of thought (configs/reasoning_cpu.py) and the runs that cannot
learn: a warm start above its loss threshold, no mixed group at the step-0 eval or in RL."""

import json
import pathlib
import re
import subprocess
import sys

import conftest
import jax
import pytest

from fipo_jax import config as config_lib
from fipo_jax.data import synthetic
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.rl import rewards, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(testdata):
  return tokenizer_lib.load_tokenizer(str(testdata / "tiny_tokenizer"))


def test_parity_rows_chain_and_direct_answers_are_verified(tok):
  rows = synthetic.make_rows(50, seed=3, min_digits=14, max_digits=14, kind="parity")
  assert {r["data_source"] for r in rows} == {synthetic.DATA_SOURCE}
  direct = synthetic.sft_examples(tok, rows, apply_chat_template=False)
  chain = synthetic.sft_examples(tok, rows, apply_chat_template=False, chain=True)
  for row, d, c in zip(rows, direct, chain, strict=True):
    question, truth = row["prompt"][0]["content"], row["reward_model"]["ground_truth"]
    bits = synthetic.parity_bits(question)
    assert question == f"Q: parity {bits}=" and truth == str(bits.count("1") % 2)
    text = tok.decode(c["response_ids"], skip_special_tokens=True)
    running = "".join(str(2 * int(b) + bits[: i + 1].count("1") % 2) for i, b in enumerate(bits))
    for ex, want in ((d, f"Answer: {truth}"), (c, f"{running} Answer: {truth}")):
      assert ex["response_ids"][-1] == tok.eos_token_id
      response = tok.decode(ex["response_ids"], skip_special_tokens=True)
      assert response == want and rewards.math_dapo_score(response, truth)["acc"]
    assert not rewards.math_dapo_score(text[:-1] + str(1 - int(truth)), truth)["acc"]
    # Length buys accuracy: the chain is more than twice the direct answer.
    assert len(c["response_ids"]) > 2 * len(d["response_ids"])
  assert synthetic.chain_response("Q: copy 1234=") is None
  assert synthetic.chain_response("Q: parity 1011=") == "3123 Answer: 1"


def test_reasoning_recipe_validates_and_updates_four_times_per_batch():
  from configs import reasoning_cpu

  rc = config_lib.validate(reasoning_cpu.get_config())
  assert rc.rl.loss_mode == "fipo" and rc.data.synthetic.kind == "parity"
  assert rc.rl.train_batch_size // rc.rl.ppo_mini_batch_size >= 4
  assert rc.sft.loss_threshold > 0 and rc.sft.warmup_steps > 0 and 0 < rc.sft.chain_fraction < 1
  assert rc.rl.max_empty_steps >= 1
  bits = rc.data.synthetic.max_digits
  assert rc.rl.max_response_length >= bits + 11  # the chain with EOS fits
  for key, bad in (("chain_fraction", 1.5), ("loss_threshold", -1.0), ("warmup_steps", -1)):
    c = reasoning_cpu.get_config()
    c.sft[key] = bad
    with pytest.raises(config_lib.ConfigError, match=f"sft.{key}"):
      config_lib.validate(c)


def test_step0_eval_without_a_mixed_group_stops_the_run():
  from configs import reasoning_cpu

  rc = config_lib.validate(reasoning_cpu.get_config())
  n, g = rc.eval.n, rc.rl.n
  trainer._check_mixed_eval(rc, {"eval/acc_mean": 0.5, f"eval/pass@{n}": 0.75})  # mixed: fine
  for acc, passed in ((0.0, 0.0), (1.0, 1.0), (0.25, 0.25)):  # every prompt all or nothing
    with pytest.raises(trainer.CannotLearn, match="no prompt with mixed accuracy"):
      trainer._check_mixed_eval(rc, {"eval/acc_mean": acc, f"eval/pass@{n}": passed})
    # The probe at the rollout settings (rl.n samples) decides: mixed there, the run goes on ...
    probed = []
    mixed = lambda seen=probed: seen.append(1) or {"eval/acc_mean": 0.4, f"eval/pass@{g}": 0.6}
    trainer._check_mixed_eval(rc, {"eval/acc_mean": acc, f"eval/pass@{n}": passed}, probe=mixed)
    assert probed == [1]
    # ... all or nothing there too, it stops.
    flat = lambda: {"eval/acc_mean": 0.5, f"eval/pass@{g}": 0.5}
    with pytest.raises(trainer.CannotLearn, match="nor has sampling at the rollout's settings"):
      trainer._check_mixed_eval(rc, {"eval/acc_mean": acc, f"eval/pass@{n}": passed}, probe=flat)
  never = lambda: pytest.fail("a mixed eval needs no probe")
  trainer._check_mixed_eval(rc, {"eval/acc_mean": 0.5, f"eval/pass@{n}": 0.75}, probe=never)


@pytest.fixture(scope="module")
def warm(warm_server):
  """The trainer runs fork from one process that has imported what they import: each skips ~10
  CPU-s of imports (tests/warm_python.py)."""
  return warm_server.with_env(conftest.child_env())


def _main(warm, *args: str) -> subprocess.CompletedProcess:
  return warm.run("-m", "fipo_jax.main", *args, cwd=ROOT)


def _readme_command_1() -> list[str]:
  """README command 1's fipo_jax.main argv (after `pip install -e . &&`)."""
  lines = [
    ln
    for ln in (ROOT / "README.md").read_text().splitlines()
    if ln.startswith("pip install -e . && python -m fipo_jax.main")
  ]
  assert len(lines) == 1, lines
  return lines[0].split("python -m fipo_jax.main ", 1)[1].split()


@pytest.mark.slow
def test_readme_command_with_a_cut_warm_start_exits_2_in_one_line(tmp_path, warm):
  argv = _readme_command_1()
  assert argv[:2] == ["--config", "configs/reasoning_cpu.py"]
  argv[argv.index("--workdir") + 1] = str(tmp_path / "w")
  res = _main(warm, *argv, "--config.sft.steps=3")
  assert res.returncode == 2, res.stderr[-3000:]
  # The progress bars (carriage returns) aside, stderr is one line.
  lines = [ln for ln in re.split(r"[\r\n]", res.stderr)
           if ln.strip() and not ln.startswith("warm start (SFT")]  # fmt: skip
  assert len(lines) == 1 and lines[0].startswith("cannot learn: the warm start ended"), lines
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "w" / "sft").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_no_mixed_group_stops_with_a_checkpoint(tmp_path, warm):
  """An untrained model finds no mixed group: at the step-0 eval, and (eval off) in step 1."""
  common = ("--config", "configs/tiny_cpu.py:runlocal", "--config.sft.steps=0")
  res = _main(warm, *common, "--workdir", str(tmp_path / "a"))
  assert res.returncode == 2, res.stderr[-3000:]
  assert res.stderr.strip().splitlines()[-1].startswith("cannot learn: the step-0 eval has no")
  assert not (tmp_path / "a" / "checkpoints").exists() or not any(
    (tmp_path / "a" / "checkpoints").iterdir()
  )
  res = _main(
    warm, *common, "--workdir", str(tmp_path / "b"), "--config.eval_every=0",
    "--config.total_steps=5"
  )
  assert res.returncode == 2, res.stderr[-3000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("cannot learn: 1 RL step(s) in a row found no group of mixed"), last
  assert "Traceback" not in res.stderr
  assert (tmp_path / "b" / "checkpoints" / "1").is_dir()  # the state is kept
  rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1] and rows[0]["train/empty_steps"] == 1


def _run_with_empty_steps(tmp_path, monkeypatch, acc: float, max_empty_steps: int):
  """tiny_cpu:runlocal (no warm start, eval off) whose every RL step finds no mixed group, with
  `acc` the share of right sampled responses."""
  from configs import tiny_cpu

  config = tiny_cpu.get_config("runlocal")
  config.sft.steps, config.eval_every, config.checkpoint_every = 0, 0, 0
  config.total_steps, config.rl.max_empty_steps = 5, max_empty_steps
  monkeypatch.setattr(
    trainer,
    "rl_step",
    lambda rc, env, steps, state: (
      state.replace(step=state.step + 1),
      {"train/nonfinite_updates": 0, "train/empty_steps": 1, "train/acc_mean": acc},
    ),
  )
  return lambda: trainer.run(config, str(tmp_path), devices=jax.devices()[:1])


@pytest.mark.slow
def test_empty_steps_stop_a_stuck_run_not_a_solved_one(tmp_path, monkeypatch):
  run = _run_with_empty_steps(tmp_path / "stuck", monkeypatch, acc=0.0, max_empty_steps=2)
  with pytest.raises(trainer.CannotLearn, match="2 RL step"):
    run()
  rows = [json.loads(x) for x in (tmp_path / "stuck" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]  # stopped at the second empty step ...
  assert (tmp_path / "stuck" / "checkpoints" / "2").is_dir()  # ... with its state kept
  # Every group all right (a solved batch): skipped, but the run goes on to its end.
  _run_with_empty_steps(tmp_path / "solved", monkeypatch, acc=1.0, max_empty_steps=2)()
  rows = [json.loads(x) for x in (tmp_path / "solved" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_seed_benchmark_refuses_an_argument_it_cannot_pass_on():
  cmd = [sys.executable, str(ROOT / "benchmarks" / "reasoning_seeds.py"), "--total_steps=3"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "only --config.* overrides" in out.stderr, out.stderr


@pytest.mark.slow
def test_seed_benchmark_smoke_reports_every_seed(tmp_path):
  """The benchmark's pipeline on one seed (the loop over seeds is a thread pool of identical
  runs; each run is the main job's CLI): a --config.* override reaches the run (here: partial
  rollouts, the stage-A check), and the table and the JSON line report it."""
  env = conftest.child_env()  # its warm start is 10 steps: it compiles more than it computes
  cmd = [sys.executable, str(ROOT / "benchmarks" / "reasoning_seeds.py"), "--smoke",
         "--seeds", "3", "--workdir", str(tmp_path), "--config.rollout.mode=partial"]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  run_cfg = json.loads((tmp_path / "seed_3" / "config.json").read_text())
  assert run_cfg["seed"] == 3 and run_cfg["rollout"]["mode"] == "partial", run_cfg
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["smoke"] and [r["seed"] for r in summary["seeds"]] == [3]
  for r in summary["seeds"]:
    assert r["exit"] == 0 and (r["start_step"], r["end_step"]) == (0, 2), r
    for key in ("start_acc", "end_acc", "start_len", "end_len", "wall_s", "cpu_s"):
      assert r[key] >= 0, (key, r)
    assert isinstance(r["learns"], bool)
  assert summary["all_learn"] == all(r["learns"] for r in summary["seeds"])
  rows = [ln.split() for ln in out.stdout.splitlines()[1:-1]]
  assert [row[0] for row in rows] == ["3"]  # the per-seed table
