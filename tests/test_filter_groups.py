"""rl.filter_groups_metric: which groups DAPO dynamic sampling keeps under acc, score, seq_reward
and seq_final_reward, against a numpy transcription of verl's recipe/dapo filter."""

from collections import defaultdict

import numpy as np
import pytest

from fipo_jax.rl import rewards, rollout, scoring


def _rollouts(group_ids, acc, verifier_scores, penalties) -> scoring.Rollouts:
  r = len(group_ids)
  verifier_scores = np.asarray(verifier_scores, np.float32)
  return scoring.Rollouts(
    prompt_ids=[np.array([1], np.int32)] * r,
    response_ids=[np.array([2], np.int32)] * r,
    response_logprobs=[np.zeros(1, np.float32)] * r,
    finish_reasons=["stop"] * r,
    group_ids=np.asarray(group_ids, np.int64),
    scores=(verifier_scores + np.asarray(penalties, np.float32)).astype(np.float32),
    verifier_scores=verifier_scores,
    acc=np.asarray(acc, bool),
    preds=[""] * r,
    overlong=np.asarray(penalties) < 0,
  )


def _verl_kept_uids(r: scoring.Rollouts, metric: str) -> set[int]:
  """verl recipe/dapo/dapo_ray_trainer.py: `score`/`acc` from reward_extra_info,
  seq_reward = token_level_scores.sum(-1), seq_final_reward = token_level_rewards.sum(-1)
  (= token_level_scores without an in-reward KL); keep std > 0 or a single member."""
  values = {
    "acc": r.acc,
    "score": r.verifier_scores,
    "seq_reward": r.scores,
    "seq_final_reward": r.scores,
  }[metric]
  vals = defaultdict(list)
  for uid, v in zip(r.group_ids.tolist(), values.tolist(), strict=True):
    vals[uid].append(v)
  return {uid for uid, v in vals.items() if np.std(v) > 0 or len(v) == 1}


# Group 0: mixed accuracy. Group 1: all right, one overlong (penalised). Group 2: all wrong, but a
# verifier with partial credit scores them apart. Group 3: identical. Group 4: one response.
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
ACC = [1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
VERIFIER = [1, -1, 1, 1, 1, 1, -1, -0.5, -1, -1, -1, -1, 1]
PENALTY = [0, 0, 0, 0, -0.25, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
  "metric, kept",
  [
    ("acc", {0, 4}),
    ("score", {0, 2, 4}),
    ("seq_reward", {0, 1, 2, 4}),
    ("seq_final_reward", {0, 1, 2, 4}),
  ],
)
def test_each_metric_keeps_the_groups_whose_values_differ(metric, kept):
  r = _rollouts(GROUPS, ACC, VERIFIER, PENALTY)
  keep = rollout.kept_groups(r, metric)
  assert set(r.group_ids[keep].tolist()) == kept == _verl_kept_uids(r, metric)
  # Whole groups only.
  for g in np.unique(r.group_ids):
    assert len(set(keep[r.group_ids == g].tolist())) == 1


@pytest.mark.parametrize("metric", sorted(rollout.FILTER_METRICS))
def test_random_batches_match_verl(metric):
  rng = np.random.default_rng(0)
  for _ in range(20):
    groups = np.repeat(np.arange(8), rng.integers(1, 5, size=8))
    rng.shuffle(groups)  # verl groups by uid wherever its responses are
    acc = rng.random(len(groups)) < 0.5
    verifier = np.where(acc, 1.0, -1.0) * rng.choice([1.0, 0.5], len(groups))
    penalty = np.where(rng.random(len(groups)) < 0.2, -rng.random(len(groups)), 0.0)
    r = _rollouts(groups, acc, verifier, penalty)
    kept = set(r.group_ids[rollout.kept_groups(r, metric)].tolist())
    assert kept == _verl_kept_uids(r, metric)


def test_seq_reward_sees_the_overlong_penalty_that_acc_and_score_do_not():
  """Scored as the trainer scores: four right answers, one of them in the overlong buffer."""
  cfg = rewards.RewardConfig(max_response_length=20, overlong_buffer_len=4)
  s = rewards.score_responses(["Answer: 7"] * 4, [16, 17, 16, 16], ["7"] * 4, cfg)
  r = _rollouts([5] * 4, s.acc, s.verifier_scores, s.scores - s.verifier_scores)
  assert not rollout.kept_groups(r, "acc").any() and not rollout.kept_groups(r, "score").any()
  assert rollout.kept_groups(r, "seq_reward").all()


def test_dynamic_sampling_filters_with_the_configured_metric():
  n = 3  # groups 0-3 above: three responses each

  def sample_round(i):
    r = _rollouts(GROUPS[:12], ACC[:12], VERIFIER[:12], PENALTY[:12])
    r.group_ids = r.group_ids + 100 * i
    return r

  kept = {}
  for metric in ("acc", "score", "seq_reward"):
    res = rollout.collect_with_dynamic_sampling(
      sample_round,
      train_batch_size=4,
      n=n,
      filter_groups=True,
      max_num_gen_batches=1,
      min_prompts=1,
      filter_metric=metric,
    )
    kept[metric] = list(dict.fromkeys(res.rollouts.group_ids.tolist()))
    assert len(res.rollouts) == n * len(kept[metric])
  assert kept == {"acc": [0], "score": [0, 2], "seq_reward": [0, 1, 2]}


def test_an_unknown_metric_is_refused():
  with pytest.raises(ValueError, match="rl.filter_groups_metric"):
    rollout.kept_groups(_rollouts(GROUPS, ACC, VERIFIER, PENALTY), "reward")
