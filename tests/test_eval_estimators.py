"""Eval estimators: pass@k against the closed form and brute force, cons@k, avg@k, lengths."""

import itertools
import json
import math

import numpy as np
import pytest

from fipo_jax import estimators
from fipo_jax.eval import cli


def _brute_force_pass_at_k(n, c, k):
  """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_closed_form_and_brute_force(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      got = estimators.pass_at_k(n, c, k)
      assert got == pytest.approx(estimators.pass_at_k_closed_form(n, c, k), abs=1e-12)
      assert got == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
  assert estimators.pass_at_k(32, 0, 32) == 0.0
  assert estimators.pass_at_k(32, 32, 1) == 1.0
  assert estimators.pass_at_k(32, 1, 32) == 1.0  # n - c < k
  assert estimators.pass_at_k(32, 5, 1) == pytest.approx(5 / 32, abs=1e-15)  # pass@1 = c/n
  # Large n: exact integer reference, where naive float binomials overflow.
  n, c, k = 2000, 7, 500
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert estimators.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
  with pytest.raises(OverflowError):
    float(math.comb(n, k))  # why the product form is needed
  for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
    with pytest.raises(ValueError, match="pass_at_k needs"):
      estimators.pass_at_k(*bad)


def test_mean_pass_and_avg():
  correct = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
  assert estimators.avg_at_k(correct) == pytest.approx(3 / 12)
  assert estimators.mean_pass_at_k(correct, 1) == pytest.approx(3 / 12)
  want = np.mean([1 - math.comb(3, 2) / math.comb(4, 2), 1 - math.comb(2, 2) / math.comb(4, 2),
                  0.0])
  assert estimators.mean_pass_at_k(correct, 2) == pytest.approx(want)
  with pytest.raises(ValueError, match=r"\[num_prompts, n\]"):
    estimators.avg_at_k([1, 0])


def test_cons_at_k_majority_vote():
  preds = [["5", "5", "7", "[INVALID]"],  # majority 5 (correct)
           ["3", "4", "4", "3"],  # tie 3/4 -> first seen (3), wrong
           ["[INVALID]", "[INVALID]", "[INVALID]", "9"],  # invalid samples do not vote
           ["[INVALID]"] * 4]  # no answer at all -> wrong
  correct = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
  assert estimators.cons_at_k(preds, correct) == pytest.approx(2 / 4)
  # k=2: prompt 1 votes 3 vs 4 tie -> '3' (wrong); prompt 2 has no valid vote.
  assert estimators.cons_at_k(preds, correct, k=2) == pytest.approx(1 / 4)
  # cons differs from avg: a 3-of-4 majority is right even though 1 sample is wrong.
  assert estimators.cons_at_k([["1", "1", "1", "2"]], [[1, 1, 1, 0]]) == 1.0
  assert estimators.majority_vote(["a", "b", "b", "a", "c"]) == "a"
  with pytest.raises(ValueError, match="shape"):
    estimators.cons_at_k([["1"]], [[1, 0]])


def test_length_stats_and_summary():
  lengths = [10, 20, 30, 40, 16]
  s = estimators.length_stats(lengths, max_length=40)
  assert s == {"mean": 23.2, "min": 10.0, "max": 40.0, "median": 20.0, "q25": 16.0,
               "q75": 30.0, "clip_ratio": 0.2}
  assert math.isnan(estimators.length_stats([], 8)["mean"])
  correct = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)
  preds = [["2", "3", "2", "3"], ["1", "1", "1", "1"]]
  out = estimators.summarize(correct, preds, [4] * 8, max_length=16)
  assert set(out) >= {"avg@4", "pass@1", "pass@2", "pass@4", "cons@4", "response_length/mean",
                      "response_length/clip_ratio", "num_prompts"}
  assert out["avg@4"] == 0.25 and out["pass@4"] == 0.5 and out["cons@4"] == 0.5
  assert estimators.default_ks(32) == [1, 2, 4, 8, 16, 32]
  assert estimators.default_ks(12) == [1, 2, 4, 8, 12]


def test_table_and_json(tmp_path):
  results = {"aime24": {"avg@32": 0.5625, "pass@32": 0.8333, "pass@4": 0.7, "cons@32": 0.73,
                        "num_prompts": 30.0, "response_length/mean": 10240.5},
             "aime25": {"avg@32": float("nan"), "num_prompts": 30.0}}
  table = cli.format_table(results)
  lines = table.splitlines()
  assert lines[0].split() == ["set", "num_prompts", "avg@32", "cons@32", "pass@4", "pass@32",
                              "response_length/mean"]
  assert lines[2].split() == ["aime24", "30", "0.5625", "0.7300", "0.7000", "0.8333",
                              "10240.5000"]
  assert lines[3].split() == ["aime25", "30", "nan", "-", "-", "-", "-"]
  flat = cli.format_table({"eval/pass@32": 0.5, "eval/avg@32": np.float32(0.25),
                           "eval/num_prompts": 30})
  assert [ln.split() for ln in flat.splitlines()[2:]] == [
    ["eval/avg@32", "0.2500"], ["eval/num_prompts", "30"], ["eval/pass@32", "0.5000"]]
  path = cli.write_json(str(tmp_path / "out" / "eval.json"),
                        {"results": results, "n": np.int64(32)})
  back = json.loads(open(path).read())
  assert back["results"]["aime25"]["avg@32"] is None and back["n"] == 32
