"""One RL step's training data on the host: sample, score, dynamic sampling, advantages, pack.

`collect(rc, sampler, data, params, step, ...) -> (mini-batches, metrics)`
(docs/fipo_spec.md §4): each dynamic-sampling round samples `gen_batch_size` prompts x `n`
responses with the sampler (`sampling.driver`), scores them with the verifier plus overlong
shaping (`rewards.score_responses`; split over processes by `score_shard`), and keeps the
groups whose `rl.filter_groups_metric` (official: `acc`) is not all-equal; rounds repeat (up to
`max_num_gen_batches`) until `train_batch_size` prompts are kept, and the kept groups are
truncated to exactly `train_batch_size` x `n` responses (`collect_with_dynamic_sampling`).
Then GRPO group advantages, and `layouts.mini_batches` lays the responses out on the run's layout
(packed rows, or padded rows with rl.use_remove_padding=False), one mini-batch per
`ppo_mini_batch_size` prompts, each placed on the train mesh from the shards this host's devices
hold.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax import metrics as metrics_lib
from fipo_jax import seeds
from fipo_jax.algo import advantages as adv_lib
from fipo_jax.rl import layouts, scoring, steps
from fipo_jax.sampling import batching
from fipo_jax.sampling import driver as driver_lib

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


def kept_groups(rollouts: scoring.Rollouts, metric: str) -> np.ndarray:
  """bool[B]: the responses of the groups that dynamic sampling keeps under `metric`, those
  whose metric values differ (verl: population std > 0) or that have a single response."""
  if metric not in FILTER_METRICS:
    raise ValueError(f"rl.filter_groups_metric: {metric!r} not in {sorted(FILTER_METRICS)}")
  return adv_lib.filter_groups(FILTER_METRICS[metric](rollouts), rollouts.group_ids)


@dataclasses.dataclass
class DynamicSamplingResult:
  rollouts: scoring.Rollouts
  num_gen_batches: int
  num_prompts_kept: int
  round_stats: list[dict[str, float]]


def collect_with_dynamic_sampling(
  sample_round: Callable[[int], scoring.Rollouts],
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
  kept: list[scoring.Rollouts] = []
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
    empty = scoring.Rollouts([], [], [], [], np.zeros(0, np.int64), f32, f32, np.zeros(0, bool),
                             [],
                     np.zeros(0, bool))
    return DynamicSamplingResult(empty, rounds, 0, stats)
  allr = scoring.Rollouts.concat(kept)
  full = num_kept >= train_batch_size
  target = train_batch_size if full else (num_kept // min_prompts) * min_prompts
  # Groups are kept whole and in order; responses of a group are contiguous in each round.
  order = list(dict.fromkeys(allr.group_ids.tolist()))[:target]
  chosen = set(order)
  idx = [i for i, g in enumerate(allr.group_ids.tolist()) if g in chosen]
  result = allr.select(idx)
  assert len(result) == target * n, (len(result), target, n)
  return DynamicSamplingResult(result, rounds, target, stats)


# --- One RL step's training data: collect() = sample -> score -> filter -> advantages -> pack.


def collect(rc: config_lib.RunConfig, sampler: scoring.Sampler, data, params: nnx.State,
            step: int, *, mesh: jax.sharding.Mesh, update_cfg: steps.UpdateConfig, pad_id: int,
            kept: list | None = None, carry=None) -> tuple[list[steps.Batch], dict[str, Any]]:
  """The training data of RL step `step` (0-based), sampled with `params`.

  Dynamic-sampling rounds of sampling (rl.gen_batch_size prompts of `data.next_batch` x n) and
  scoring until rl.train_batch_size prompts are kept, then group advantages, then packing into
  `train_batch_size / ppo_mini_batch_size` mini-batches placed on `mesh` (`update_cfg` gives the
  layout's micro-batches). Each host packs only the batch shards its own devices hold.
  `old_log_probs` are the sampler's; the trainer replaces them with the actor's
  (rl.old_log_prob_source='trainer'). Returns (mini-batches, [] when no group was kept; rollout
  metrics). `kept` (a list, for the rollout dump) receives the kept Rollouts and their
  advantages f32[B], in mini-batch order. `carry` (rollout.mode='partial'): the groups in flight
  across steps, whose `dynamic_sampling` replaces this one (rl/partial_sampling.py).
  """
  t0 = time.perf_counter()
  sample = _dynamic_sampling if carry is None else carry.dynamic_sampling
  res, sampled = sample(rc, sampler, data, params, step)
  t_gen = time.perf_counter() - t0
  metrics: dict[str, Any] = {
    "train/num_gen_batches": res.num_gen_batches, "timing_s/gen": t_gen,
    # Accuracy over every sampled response; the kept (mixed-accuracy) groups are biased.
    "train/acc_mean": float(np.concatenate(sampled["acc"]).mean()),
    **sampled.get("metrics", {}),  # partial mode: staleness and carry-over
  }
  r = res.rollouts
  if len(r) == 0:  # the trainer tells a solved batch (acc ~1) from a run that cannot learn
    return [], metrics
  adv = adv_lib.grpo_outcome_advantages(
    r.scores, r.group_ids, norm_by_std=rc.rl.norm_adv_by_std_in_grpo
  )
  batches, packed = layouts.mini_batches(rc, mesh, r, adv, update_cfg=update_cfg, pad_id=pad_id)
  if kept is not None:
    kept.append((r, adv))
  lengths = np.asarray([len(x) for x in r.response_ids])
  metrics.update({
    "train/kept_acc_mean": float(np.mean(r.acc)),
    "critic/score/mean": float(np.mean(r.scores)),
    "critic/advantages/mean": metrics_lib.advantage_token_mean(
      adv, np.minimum(lengths, rc.rl.max_response_length),
      packed if jax.process_count() == 1 else None),  # one process holds every row
    "reward/errors": int(r.reward_errors),
    "reward/overlong_frac": float(np.mean(r.overlong)),
    "train/num_prompts_kept": res.num_prompts_kept,
    "perf/sampler_tokens_per_s": sampled["tokens"] / max(t_gen, 1e-9),
    "perf/responses_scored_here": sampled["scored"],  # this process's share of the scoring
    **_sampler_perf(sampled["stats"]),
  })
  metrics.update(metrics_lib.response_length_metrics(lengths, rc.rl.max_response_length))
  return batches, metrics


def _dynamic_sampling(rc: config_lib.RunConfig, sampler: scoring.Sampler, data,
                      params: nnx.State, step: int) -> tuple[DynamicSamplingResult, dict[str, Any]]:
  """The step's dynamic-sampling rounds; also returns what was sampled before filtering:
  {'tokens': sampled, 'acc': [bool[B] per round], 'scored': responses this process scored}."""
  sampled: dict[str, Any] = {"tokens": 0, "acc": [], "scored": 0, "stats": []}
  # Once per step (the params do not change while sampling): the trainer's params in the
  # sampler's layout and dtype, one jitted reshard and cast on device.
  params = sampler.engine.load_params(params)

  def sample_round(round_idx: int) -> scoring.Rollouts:
    examples = data.next_batch(rc.rl.gen_batch_size)
    res = driver_lib.run(
      sampler.engine, params, [e["prompt_ids"] for e in examples], n=rc.rl.n,
      max_new_tokens=rc.rl.max_response_length, sampling=sampler.method,
      eos_ids=sampler.eos_ids, seed=seeds.seed_for(rc.seed, "sampling", step, round_idx),
      refill_fraction=rc.sampling.refill_fraction,
    )
    r = scoring.make_rollouts(sampler.tokenizer, sampler.reward_cfg, examples, res.samples,
                      group_offset=round_idx * rc.rl.gen_batch_size)
    sampled["tokens"] += res.stats.tokens_generated
    sampled["stats"].append(res.stats)
    sampled["acc"].append(r.acc)
    sampled["scored"] += r.scored_here
    return r

  res = collect_with_dynamic_sampling(
    sample_round, train_batch_size=rc.rl.train_batch_size, n=rc.rl.n,
    filter_groups=rc.rl.filter_groups_enable, max_num_gen_batches=rc.rl.max_num_gen_batches,
    min_prompts=rc.rl.ppo_mini_batch_size, filter_metric=rc.rl.filter_groups_metric,
  )
  return res, sampled


def _sampler_perf(stats: Sequence[batching.SamplerStats]) -> dict[str, float]:
  """The rollout sampler's device-busy share (time blocked on the device / wall time) and
  slot utilisation over the step's dynamic-sampling rounds."""
  wall = sum(s.wall_time_s for s in stats)
  slot_steps = sum(s.total_slot_steps for s in stats)
  return {
    "perf/sampler_device_busy": sum(s.device_time_s for s in stats) / max(wall, 1e-9),
    "perf/sampler_slot_utilisation": sum(s.active_slot_steps for s in stats) / max(slot_steps, 1),
  }
