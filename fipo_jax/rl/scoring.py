"""Sampled responses, scored: the `Rollouts` that training learns from and evaluation measures.

`make_rollouts` decodes the sampler's output and scores it with the verifier plus overlong
shaping (`rewards.score_responses`), split over processes by `score_shard`; a `Sampler` is what
sampling and scoring prompts takes. `rollout.collect` and `evaluation.evaluate` both use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from fipo_jax import distributed
from fipo_jax.rl import rewards as rewards_lib
from fipo_jax.rl.rewards import RewardConfig, ScoreFn

if TYPE_CHECKING:
  import transformers

  from fipo_jax.sampling import engine as engine_lib
  from fipo_jax.sampling import params as sampling_params


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What sampling and scoring prompts takes (`collect`, `evaluation.evaluate`): the engine, its
  sampling method, the stop tokens, the tokenizer that decodes responses for the verifier, and
  the verifier and overlong-shaping settings."""

  engine: engine_lib.Engine
  method: sampling_params.SamplingMethod
  eos_ids: Sequence[int]
  tokenizer: transformers.PreTrainedTokenizerBase
  reward_cfg: RewardConfig


@dataclasses.dataclass
class Rollouts:
  """Host-side rollouts, one entry per response (B responses in total, groups of G = rl.n)."""

  prompt_ids: list[np.ndarray]  # B x int32[P_i]
  response_ids: list[np.ndarray]  # B x int32[T_i]
  response_logprobs: list[np.ndarray]  # B x f32[T_i], from the sampler
  finish_reasons: list[str]
  group_ids: np.ndarray  # int64[B], one id per prompt
  scores: np.ndarray  # f32[B], verifier score + overlong penalty (what advantages use)
  verifier_scores: np.ndarray  # f32[B], the verifier's score alone
  acc: np.ndarray  # bool[B]
  preds: list[str]
  overlong: np.ndarray  # bool[B], penalty < 0
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
  [B] inputs are read; every process has the same B responses), then the results are
  all-gathered, so every process returns the scores of all B and dynamic sampling takes the
  same decisions everywhere. A collective when count > 1.
  Returns (the Scores of all B responses, the number this process scored).
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
