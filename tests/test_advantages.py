"""GRPO outcome advantages (golden cases) and the dynamic-sampling group filter."""

import json

import numpy as np
import pytest

from fipo_jax import algo


def test_golden_grpo_advantages(golden_dir):
  meta = json.loads((golden_dir / "grpo_advantage_cases.json").read_text())
  arrays = np.load(golden_dir / "grpo_advantage_cases.npz")
  assert meta["cases"]
  for c in meta["cases"]:
    g = {
      n: arrays[f"{c['case_id']}__{n}"]
      for n in ("token_level_rewards", "response_mask", "index", "advantages")
    }
    scores = g["token_level_rewards"].sum(-1)  # the estimator's row sum
    adv = algo.grpo_outcome_advantages(
      scores, g["index"], epsilon=c["epsilon"], norm_by_std=c["norm_adv_by_std_in_grpo"]
    )
    assert adv.shape == scores.shape and adv.dtype == np.float32
    full = adv[:, None] * g["response_mask"]
    np.testing.assert_allclose(full, g["advantages"], rtol=1e-5, atol=1e-7, err_msg=c["case_id"])


def _numpy_reference(scores, ids, eps=1e-6, norm=True):
  out = np.zeros(len(scores))
  for i, gid in enumerate(ids):
    members = np.asarray([s for s, j in zip(scores, ids, strict=True) if j == gid], np.float64)
    mean, std = (0.0, 1.0) if len(members) == 1 else (members.mean(), members.std(ddof=1))
    out[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
  return out


@pytest.mark.parametrize("norm", [True, False])
def test_matches_numpy_reference_on_shuffled_groups(norm):
  rng = np.random.default_rng(0)
  ids = rng.permutation(np.repeat(np.arange(7), [1, 2, 3, 4, 5, 16, 1]))
  scores = rng.normal(size=ids.size).astype(np.float32)
  scores[ids == 4] = 1.0  # all-equal group -> exactly 0
  adv = algo.grpo_outcome_advantages(scores, ids, norm_by_std=norm)
  np.testing.assert_allclose(adv, _numpy_reference(scores, ids, norm=norm), rtol=1e-5, atol=1e-6)
  assert (adv[ids == 4] == 0).all()
  np.testing.assert_allclose(
    adv[ids == 0], scores[ids == 0] / (1 + 1e-6) if norm else scores[ids == 0], rtol=1e-6
  )


def test_string_group_ids():
  adv = algo.grpo_outcome_advantages([1.0, -1.0, 1.0], ["u1", "u1", "u2"])
  np.testing.assert_allclose(
    adv, [1 / (np.sqrt(2) + 1e-6), -1 / (np.sqrt(2) + 1e-6), 1 / (1 + 1e-6)], rtol=1e-6
  )


def test_filter_groups_keeps_mixed_and_singleton_groups():
  acc = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0], bool)
  ids = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
  keep = algo.filter_groups(acc, ids)
  # group 0 all-correct and group 1 all-wrong are dropped, 2 mixed kept, 3 dropped,
  # 4 singleton kept (verl: `std > 0 or len == 1`).
  np.testing.assert_array_equal(keep, [0, 0, 0, 0, 1, 1, 0, 0, 1])
  assert keep.dtype == bool


def test_filter_groups_float_metric_and_unsorted_ids():
  vals = np.array([0.5, 0.2, 0.5, 0.2, 0.3])
  ids = np.array(["b", "a", "b", "a", "c"])
  np.testing.assert_array_equal(algo.filter_groups(vals, ids), [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(algo.filter_groups([0.1, 0.2, 0.1], [1, 2, 1]), [0, 1, 0])
  assert algo.filter_groups(np.array([]), np.array([])).shape == (0,)
