"""Rewards: math_dapo_score and overlong_penalty (golden cases exactly, regex equivalence, hostile
text), and the verifier of rl.reward_fn (math_dapo, math_verify) as the trainer scores with it."""

import json
import math
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from fipo_jax import algo
from fipo_jax.algo import rewards as scores
from fipo_jax.rl import rewards


def _regex_normalize(answer: str) -> str:
  """The official normaliser's regex steps, verbatim semantics (quadratic; small inputs only)."""
  answer = answer.split("=")[-1]
  for before, after in scores._SUBSTITUTIONS:
    answer = answer.replace(before, after)
  for expr in scores._REMOVED_EXPRESSIONS:
    answer = answer.replace(expr, "")
  answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
  answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
  answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
  answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
  answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
  answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
  answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
  answer = answer.replace("$", "")
  if answer.replace(",", "").isdigit():
    answer = answer.replace(",", "")
  return answer.strip()


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_golden_reward_cases_exact(golden_dir):
  cases = _jsonl(golden_dir / "math_dapo_reward_cases.jsonl")
  assert cases
  for c in cases:
    got = algo.math_dapo_score(c["response"], c["ground_truth"])
    want = {"score": c["score"], "acc": c["acc"], "pred": c["pred"]}
    assert got == want, (c["case_id"], c["note"])
    assert type(got["score"]) is float and type(got["acc"]) is bool


def test_golden_overlong_penalties_exact(golden_dir):
  cases = _jsonl(golden_dir / "overlong_penalty_cases.jsonl")
  assert cases
  for c in cases:
    got = algo.overlong_penalty(
      c["response_length"],
      c["max_resp_len"],
      c["overlong_buffer_len"],
      c["overlong_penalty_factor"],
    )
    want = c["overlong_penalty"]
    assert got == want and math.copysign(1, got) == math.copysign(1, want), c["case_id"]
    assert (got < 0) == c["overlong_flag"]


def test_overlong_penalty_shape():
  assert algo.overlong_penalty(16384, 20480, 4096, 1.0) == 0.0
  assert algo.overlong_penalty(20480, 20480, 4096, 1.0) == -1.0
  assert algo.overlong_penalty(18432, 20480, 4096, 1.0) == -0.5
  assert algo.overlong_penalty(0, 20480, 4096, 1.0) == 0.0
  with pytest.raises(ValueError):
    algo.overlong_penalty(1, 10, 0, 1.0)


_TOKENS = [
  "$",
  "\\text{",
  "\\textbf{",
  "\\overline{",
  "\\boxed{",
  "}",
  "{",
  "\n",
  "a ",
  "an ",
  " ",
  "=",
  ",",
  "frac",
  "sqrt",
  "1",
  "23",
  "x",
  "\\",
  ".",
  "\\!",
  "{,}",
  "^\\circ",
  "é",
  "٣",
]


@hypothesis.settings(max_examples=400, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.sampled_from(_TOKENS), max_size=30).map("".join))
def test_linear_normaliser_equals_regex_form(text):
  assert scores.normalize_final_answer(text) == _regex_normalize(text)


@pytest.mark.parametrize(
  "ground_truth",
  [
    "1" * 1_000_000,
    "\\text{" * 200_000,
    "\\boxed{" * 150_000,
    "a$" * 500_000,
    ("x" * 1000 + "\n") * 1000,
    "{" * 1_000_000,
    "\\frac" * 200_000,
  ],
  ids=["digits", "text", "boxed", "dollars", "lines", "braces", "frac"],
)
def test_huge_ground_truth_is_scored(ground_truth):
  # The official regex normaliser is quadratic on these (minutes at 1M chars); this must finish.
  out = algo.math_dapo_score("Answer: 1", ground_truth)
  assert out["score"] == -1.0 and out["acc"] is False and out["pred"] == "1"


@pytest.mark.parametrize(
  "response",
  [
    "Answer: " + "{" * 10_000 + "}" * 10_000,
    "Answer: " + "\\boxed{" * 5_000,
    "x" * 10_000 + "Answer: 42",
    "Answer: ４２ 😀 \u202e \ud800",
    "\x00" * 20_000,
    "Answer:" * 5_000,
  ],
)
def test_hostile_responses_do_not_crash(response):
  out = algo.math_dapo_score(response, "42")
  assert set(out) == {"score", "acc", "pred"} and out["score"] in (1.0, -1.0)
  assert isinstance(out["pred"], str)


@pytest.mark.parametrize(
  "response, ground_truth",
  [(None, "1"), (b"Answer: 1", "1"), ("Answer: 1", 1), ("Answer: 1", None)],
)
def test_non_string_inputs_are_wrong_answers(response, ground_truth):
  assert algo.math_dapo_score(response, ground_truth) == {
    "score": -1.0,
    "acc": False,
    "pred": "[INVALID]",
  }


def test_long_response_uses_last_300_chars():
  assert algo.math_dapo_score("Answer: 7\n" + "x" * 400, "7")["pred"] == "[INVALID]"
  assert algo.math_dapo_score("x" * 10_000 + "\nAnswer: 7", "7")["acc"] is True


# --- rl.reward_fn: the verifier the trainer scores with --------------------------------------


class _TextTokenizer:
  """batch_decode of [i] -> TEXTS[i]: the trainer's decode step, without a vocabulary."""

  def __init__(self, texts):
    self.texts = texts

  def batch_decode(self, ids, skip_special_tokens):
    assert skip_special_tokens  # as verl's DAPO reward manager decodes
    return [self.texts[int(x[0])] for x in ids]


def _score_like_the_trainer(reward_fn: str, responses: list[str], ground_truth: str):
  """rl.reward_fn -> validated config -> the Env's RewardConfig -> scoring.make_rollouts."""
  from fipo_jax import config as config_lib  # noqa: PLC0415
  from fipo_jax import recipes  # noqa: PLC0415
  from fipo_jax.rl import scoring  # noqa: PLC0415
  from fipo_jax.sampling.batching import Sample  # noqa: PLC0415

  c = recipes.base()
  c.rl.reward_fn = reward_fn
  rc = config_lib.validate(c, check_paths=False)
  cfg = rewards.RewardConfig.from_section(rc.rl)
  assert cfg.reward_fn == reward_fn
  samples = [Sample(prompt_index=0, sample_index=i, prompt_ids=np.zeros(1, np.int32),
                    response_ids=np.array([i], np.int32), response_logprobs=np.zeros(1, np.float32),
                    finish_reason="stop", length=1) for i in range(len(responses))]
  return scoring.make_rollouts(_TextTokenizer(responses), cfg, [{"ground_truth": ground_truth}],
                               samples)


def test_math_verify_scores_latex_against_a_decimal_ground_truth():
  r = _score_like_the_trainer(
    "math_verify", ["so the answer is $\\frac{1}{2}$", "the answer is $\\frac{1}{3}$",
                    "\\boxed{\\frac{2}{4}}", "no answer at all"], "0.5")
  assert r.acc.tolist() == [True, False, True, False]
  # verl's math_verify scale: 1.0 right, 0.0 wrong (no overlong penalty at length 1).
  assert r.verifier_scores.tolist() == [1.0, 0.0, 1.0, 0.0] == r.scores.tolist()
  assert r.preds[0] == "1/2" and r.reward_errors == 0


def test_math_dapo_is_the_default_and_does_not_read_latex_symbolically():
  r = _score_like_the_trainer("math_dapo", ["Answer: \\frac{1}{2}", "Answer: 0.5"], "0.5")
  assert r.acc.tolist() == [False, True] and r.verifier_scores.tolist() == [-1.0, 1.0]


def test_math_verify_past_its_time_bound_is_killed_counted_and_replaced():
  cfg = rewards.RewardConfig(max_response_length=8, overlong_buffer_enable=False,
                             reward_fn="math_verify", max_seconds=1e-4)
  v = rewards.IsolatedVerifier("math_verify", cfg.max_seconds)
  slow = "\\boxed{" + "+".join(f"\\frac{{{i}}}{{{i + 1}}}" for i in range(1, 40)) + "}"
  s = rewards.score_responses([slow], [1], ["1"], cfg, v)  # sympy needs far more than 0.1 ms
  assert s.errors == 1 and not s.acc.any() and s.preds == ["[ERROR]"]
  assert v._proc is None  # the child mid-call was killed, never reused
  v.max_seconds = 30.0  # the next call starts a new child
  assert v("\\boxed{1}", "1")["acc"] is True
  v.close()


def test_an_unknown_worker_fails_to_start_with_its_reason():
  with pytest.raises(RuntimeError, match="did not start: usage"):
    rewards.IsolatedVerifier("nope", 10.0)("1", "1")


def test_math_verify_without_its_package_is_refused_at_validation(monkeypatch):
  import importlib.util  # noqa: PLC0415

  from fipo_jax import config as config_lib  # noqa: PLC0415
  from fipo_jax import recipes  # noqa: PLC0415

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "math_verify" else real(name, *a))
  c = recipes.base()
  c.rl.reward_fn = "math_verify"
  with pytest.raises(config_lib.ConfigError, match=r"rl.reward_fn: .*fipo_jax\[math_verify\]"):
    config_lib.validate(c, check_paths=False)
  c.rl.reward_fn = "math_verfy"
  with pytest.raises(config_lib.ConfigError, match="rl.reward_fn"):
    config_lib.validate(c, check_paths=False)
