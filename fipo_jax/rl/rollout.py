"""Rollouts on the host: sample, score, group advantages, dynamic sampling, pack into a batch.

docs/fipo_spec.md §4: each round samples `gen_batch_size` prompts x `n` responses, scores with the
verifier plus overlong shaping (`rewards.score_responses`), keeps the groups whose
`rl.filter_groups_metric` (official: `acc`) is not all-equal, and repeats (up to
`max_num_gen_batches` rounds) until `train_batch_size` prompts are kept; the kept groups are
truncated to exactly `train_batch_size` x `n` responses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fipo_jax import distributed
from fipo_jax.rl import advantages as adv_lib
from fipo_jax.rl import rewards as rewards_lib
from fipo_jax.rl.rewards import RewardConfig, ScoreFn

# rl.filter_groups_metric -> the per-response value whose spread within a group keeps it
# (verl recipe/dapo: `acc` and `score` from the reward function's extra info; `seq_reward` =
# token_level_scores summed = verifier score + overlong penalty; `seq_final_reward` =
# token_level_rewards summed, which differs only by an in-reward KL penalty this trainer does
# not have (its KL is a loss term), so it equals seq_reward here).
FILTER_METRICS = {
  "acc": lambda r: r.acc.astype(np.float32),
  "score": lambda r: r.verifier_scores,
  "seq_reward": lambda r: r.scores,
  "seq_final_reward": lambda r: r.scores,
}


@dataclasses.dataclass
class Rollouts:
  """Host-side rollouts, one entry per response (R responses in total, groups of n)."""

  prompt_ids: list[np.ndarray]  # R x int32[P_i]
  response_ids: list[np.ndarray]  # R x int32[T_i]
  response_logprobs: list[np.ndarray]  # R x f32[T_i], from the sampler
  finish_reasons: list[str]
  group_ids: np.ndarray  # int64[R], one id per prompt
  scores: np.ndarray  # f32[R], verifier score + overlong penalty (what advantages use)
  verifier_scores: np.ndarray  # f32[R], the verifier's score alone
  acc: np.ndarray  # bool[R]
  preds: list[str]
  overlong: np.ndarray  # bool[R], penalty < 0
  reward_errors: int = 0
  scored_here: int = 0  # responses this process scored (all of them on one process)

  def __len__(self) -> int:
    return len(self.response_ids)

  def select(self, idx: Sequence[int]) -> Rollouts:
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx]
    return Rollouts(
      prompt_ids=pick(self.prompt_ids),
      response_ids=pick(self.response_ids),
      response_logprobs=pick(self.response_logprobs),
      finish_reasons=pick(self.finish_reasons),
      group_ids=self.group_ids[idx],
      scores=self.scores[idx],
      verifier_scores=self.verifier_scores[idx],
      acc=self.acc[idx],
      preds=pick(self.preds),
      overlong=self.overlong[idx],
      reward_errors=self.reward_errors,
      scored_here=self.scored_here,
    )

  @staticmethod
  def concat(parts: Sequence[Rollouts]) -> Rollouts:
    cat = lambda name: [x for p in parts for x in getattr(p, name)]
    return Rollouts(
      prompt_ids=cat("prompt_ids"),
      response_ids=cat("response_ids"),
      response_logprobs=cat("response_logprobs"),
      finish_reasons=cat("finish_reasons"),
      group_ids=np.concatenate([p.group_ids for p in parts]),
      scores=np.concatenate([p.scores for p in parts]).astype(np.float32),
      verifier_scores=np.concatenate([p.verifier_scores for p in parts]).astype(np.float32),
      acc=np.concatenate([p.acc for p in parts]).astype(bool),
      preds=cat("preds"),
      overlong=np.concatenate([p.overlong for p in parts]).astype(bool),
      reward_errors=sum(p.reward_errors for p in parts),
      scored_here=sum(p.scored_here for p in parts),
    )


def score_shard(
  texts: Sequence[str],
  lengths: Sequence[int],
  ground_truths: Sequence[str],
  cfg: RewardConfig,
  score_fn: ScoreFn | None = None,
  *,
  index: int = 0,
  count: int = 1,
) -> tuple[rewards_lib.Scores, int]:
  """`rewards.score_responses` split over `count` processes, all-gathered.

  Process `index` scores the responses i with i % count == index (only those entries of the
  [R] inputs are read; every process has the same R responses), then the results are
  all-gathered, so every process returns the scores of all R and dynamic sampling takes the
  same decisions everywhere. A collective when count > 1.
  Returns (the Scores of all R responses, the number this process scored).
  """
  if count == 1:
    return rewards_lib.score_responses(texts, lengths, ground_truths, cfg, score_fn), len(texts)
  mine = range(index, len(texts), count)
  s = rewards_lib.score_responses(
    [texts[i] for i in mine], [lengths[i] for i in mine], [ground_truths[i] for i in mine],
    cfg, score_fn,
  )
  total = len(texts)
  out = distributed.allgather_strided({"scores": s.scores, "verifier_scores": s.verifier_scores,
                                       "acc": s.acc, "overlong": s.overlong}, total)
  preds = distributed.allgather_strings_strided(s.preds, total)
  errors = int(distributed.allgather_strided(np.asarray([s.errors], np.int32), count).sum())
  return rewards_lib.Scores(
    out["scores"].astype(np.float32), out["verifier_scores"].astype(np.float32),
    out["acc"].astype(bool), preds, out["overlong"].astype(bool), errors), len(mine)


def make_rollouts(tokenizer, reward_cfg: RewardConfig, examples: Sequence[dict], samples, *,
                  group_offset: int = 0, score_fn: ScoreFn | None = None) -> Rollouts:
  """Scores the sampler's output (samples of examples[s.prompt_index]) into Rollouts.

  The verifier is `reward_cfg.reward_fn`'s (or `score_fn`). The response is decoded without
  special tokens, as verl's DAPO reward manager does. On several processes each scores its
  share of the responses (`score_shard`; all of them call this).
  """
  index, count = jax.process_index(), jax.process_count()
  texts: list[str | None] = [None] * len(samples)  # only this process's share is decoded
  texts[index::count] = tokenizer.batch_decode(
    [s.response_ids for s in samples[index::count]], skip_special_tokens=True)
  gts = [examples[s.prompt_index]["ground_truth"] for s in samples]
  scored, scored_here = score_shard(
    texts, [s.length for s in samples], gts, reward_cfg, score_fn, index=index, count=count)
  return Rollouts(
    prompt_ids=[s.prompt_ids for s in samples],
    response_ids=[s.response_ids for s in samples],
    response_logprobs=[s.response_logprobs for s in samples],
    finish_reasons=[s.finish_reason for s in samples],
    group_ids=np.asarray([group_offset + s.prompt_index for s in samples], np.int64),
    scores=scored.scores, verifier_scores=scored.verifier_scores, acc=scored.acc,
    preds=scored.preds, overlong=scored.overlong, reward_errors=scored.errors,
    scored_here=scored_here,
  )


def kept_groups(rollouts: Rollouts, metric: str) -> np.ndarray:
  """bool[R]: the responses of the groups that dynamic sampling keeps under `metric`, those
  whose metric values differ (verl: population std > 0) or that have a single response."""
  if metric not in FILTER_METRICS:
    raise ValueError(f"rl.filter_groups_metric: {metric!r} not in {sorted(FILTER_METRICS)}")
  return adv_lib.filter_groups(FILTER_METRICS[metric](rollouts), rollouts.group_ids)


@dataclasses.dataclass
class DynamicSamplingResult:
  rollouts: Rollouts
  num_gen_batches: int
  num_prompts_kept: int
  round_stats: list[dict[str, float]]


def collect_with_dynamic_sampling(
  sample_round: Callable[[int], Rollouts],
  *,
  train_batch_size: int,
  n: int,
  filter_groups: bool,
  max_num_gen_batches: int,
  min_prompts: int,
  filter_metric: str = "acc",
) -> DynamicSamplingResult:
  """DAPO dynamic sampling over rounds of `sample_round(round_index) -> Rollouts`.

  Keeps the groups whose `filter_metric` (rl.filter_groups_metric, see FILTER_METRICS) is not
  all-equal until `train_batch_size` prompts are kept, then
  truncates to exactly `train_batch_size` groups. If `max_num_gen_batches` rounds (0 = no limit)
  do not fill the batch, the kept groups are truncated to a multiple of `min_prompts` (the
  mini-batch size) instead of verl's hard error, so a long run does not die on one hard batch;
  fewer than `min_prompts` kept prompts yield an empty result (the caller skips the step).
  """
  kept: list[Rollouts] = []
  num_kept, rounds, stats = 0, 0, []
  while True:
    part = sample_round(rounds)
    rounds += 1
    keep = kept_groups(part, filter_metric) if filter_groups else np.ones(len(part), bool)
    part_kept = part.select(np.flatnonzero(keep))
    groups = len(np.unique(part_kept.group_ids))
    stats.append({"round": rounds, "prompts": len(np.unique(part.group_ids)), "kept": groups})
    if len(part_kept):
      kept.append(part_kept)
    num_kept += groups
    if num_kept >= train_batch_size:
      break
    if max_num_gen_batches > 0 and rounds >= max_num_gen_batches:
      logging.warning(
        "dynamic sampling: %d prompts kept after %d rounds (< train_batch_size %d)",
        num_kept, rounds, train_batch_size,
      )
      break
  if not kept:
    f32 = np.zeros(0, np.float32)
    empty = Rollouts([], [], [], [], np.zeros(0, np.int64), f32, f32, np.zeros(0, bool), [],
                     np.zeros(0, bool))
    return DynamicSamplingResult(empty, rounds, 0, stats)
  allr = Rollouts.concat(kept)
  full = num_kept >= train_batch_size
  target = train_batch_size if full else (num_kept // min_prompts) * min_prompts
  # Groups are kept whole and in order; responses of a group are contiguous in each round.
  order = list(dict.fromkeys(allr.group_ids.tolist()))[:target]
  chosen = set(order)
  idx = [i for i, g in enumerate(allr.group_ids.tolist()) if g in chosen]
  result = allr.select(idx)
  assert len(result) == target * n, (len(result), target, n)
  return DynamicSamplingResult(result, rounds, target, stats)


def pack_batch(
  rollouts: Rollouts,
  advantages: np.ndarray,
  *,
  max_prompt_length: int,
  max_response_length: int,
  pad_id: int,
) -> dict[str, np.ndarray]:
  """Left-pad prompts to P, right-pad responses to T, and lay out the arrays of a PolicyBatch.

  Returns numpy arrays: input_ids/attention_mask/positions int32[R, P+T], response_mask,
  old_log_probs (the sampler's, replaced by the actor's recomputation later) and advantages
  f32[R, T] (the per-sequence advantage broadcast and multiplied by the mask).
  """
  r, p, t = len(rollouts), max_prompt_length, max_response_length
  ids = np.full((r, p + t), pad_id, np.int32)
  attn = np.zeros((r, p + t), np.int32)
  resp_mask = np.zeros((r, t), np.float32)
  sampler_lp = np.zeros((r, t), np.float32)
  for i, (pid, rid, lp) in enumerate(
    zip(rollouts.prompt_ids, rollouts.response_ids, rollouts.response_logprobs, strict=True)
  ):
    pid = np.asarray(pid, np.int32)[-p:]
    rid = np.asarray(rid, np.int32)[:t]
    ids[i, p - len(pid) : p] = pid
    attn[i, p - len(pid) : p] = 1
    ids[i, p : p + len(rid)] = rid
    attn[i, p : p + len(rid)] = 1
    resp_mask[i, : len(rid)] = 1.0
    sampler_lp[i, : len(rid)] = np.asarray(lp, np.float32)[: len(rid)]
  positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
  adv = (np.asarray(advantages, np.float32)[:, None] * resp_mask).astype(np.float32)
  return {
    "input_ids": ids,
    "attention_mask": attn,
    "positions": positions,
    "response_mask": resp_mask,
    "old_log_probs": sampler_lp,
    "advantages": adv,
  }
