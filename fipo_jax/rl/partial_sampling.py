"""The engine side of partial rollouts: `rl/partial.py`'s scheduler on the real sampler.

`PartialRollouts` (held by the trainer's Env in rollout.mode='partial') plugs into
`rollout.collect` in place of its synchronous dynamic sampling; `EngineBackend` runs a round's
requests through the engine's continuous-batching loop (`sampling.batching.Loop.run`, as
`sampling.driver.run` does) and stops it when the scheduler says the batch is full; the
score function turns finished groups into scored `Rollouts`. With rollout.overlap_calls > 0
(disaggregated), `PartialRollouts.overlap` is what the trainer runs while its update runs: it
dispatches the staging of the update's weights onto the sampler's devices, then decodes an
overlap round (`partial.Carry.overlap`) with the weights the batch was sampled with. Also the
trainer's hooks: `correction` (the staleness IS weights' mode) and `correction_metrics`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fipo_jax import seeds
from fipo_jax.rl import partial, scoring
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.sampling import batching


@dataclasses.dataclass
class EngineBackend:
  """Samples a round's unfinished requests with the engine (partial.Backend)."""

  engine: Any
  params: Any  # in the sampler's layout (engine.load_params)
  sampling: Any
  eos_ids: Sequence[int]
  max_len: int  # rl.max_response_length: a response's whole budget
  n: int
  seed: int  # the run's seed
  step: int
  refill_fraction: float
  stream: str = "sampling"  # the seed stream: 'overlap_sampling' in the overlap round

  def budget(self, group: partial.Group, sample: int) -> int:  # noqa: ARG002
    """A response's whole token budget (the benchmark forces long-tailed lengths here)."""
    return self.max_len

  def run(self, groups: Sequence[partial.Group], *, version: int, seed_round: int,
          on_done: Callable[[list[int]], bool], max_calls: int = 0) -> batching.SamplerStats:
    """One round, ended by `on_done` or after `max_calls` generate calls (0: no limit). Fresh
    requests of a group share one prefill of its prompt (entry = the group's position when
    nothing resumes, so a round of new groups is sync's round); a request with tokens resumes
    alone from its prompt + tokens, with the budget it has left."""
    prompts, budgets, requests, owner = [], [], [], []
    for gi, g in enumerate(groups):
      for s, r in enumerate(g.requests):
        if r.tokens.size and not r.done:  # resumed: re-prefill the prefix under `version`
          owner.append({0: (gi, s)})
          prompts.append(np.concatenate([g.example["prompt_ids"], r.tokens]).astype(np.int32))
          budgets.append([self.budget(g, s) - r.tokens.size])
          requests.append((len(prompts) - 1, 0))
    for gi, g in enumerate(groups):
      fresh = [s for s, r in enumerate(g.requests) if not r.tokens.size and not r.done]
      if fresh:
        owner.append({s: (gi, s) for s in fresh})
        prompts.append(np.asarray(g.example["prompt_ids"], np.int32))
        budgets.append([self.budget(g, x) for x in range(self.n)])
        requests += [(len(prompts) - 1, s) for s in fresh]
    # A resumed prefix longer than every prompt is prefilled alone: its prefill and insert
    # shapes are then its length bucket only, not (rows x length x requests) mixes that
    # compile anew for many steps. Fresh prompts (all of sync's) batch as before.
    loop = batching.Loop(self.engine, prompts, n=self.n, budgets=budgets, requests=requests,
                         stops=frozenset(int(i) for i in self.eos_ids),
                         refill_fraction=self.refill_fraction,
                         solo_len=max(len(g.example["prompt_ids"]) for g in groups))  # fmt: skip
    calls = 0

    def stop(samples: Sequence[batching.Sample]) -> bool:
      """Extends the requests; asks the scheduler whether the groups they finished fill the
      batch (aborted samples extend a request without finishing it). Called after each
      generate call (and once more after the last)."""
      nonlocal calls
      calls += 1
      finished = set()
      for smp in samples:
        gi, s = owner[smp.prompt_index][smp.sample_index]
        reason = None if smp.finish_reason == "aborted" else smp.finish_reason
        groups[gi].requests[s].extend(smp.response_ids, smp.response_logprobs, version, reason)
        if reason is not None and groups[gi].done:
          finished.add(gi)
      return (bool(finished) and on_done(sorted(finished))) or calls == max_calls

    seed = seeds.seed_for(self.seed, self.stream, self.step, seed_round)
    return loop.run(self.params, seed=seed, sampling=self.sampling, stop=stop).stats


def score_groups(sampler: scoring.Sampler, filter_enable: bool, metric: str
                 ) -> partial.ScoreFn:
  """Scores finished groups together (one verifier batch): each gets its Rollouts and keep."""

  def score(groups: Sequence[partial.Group]) -> None:
    samples = [batching.Sample(i, s, np.asarray(g.example["prompt_ids"], np.int32), r.tokens,
                               r.log_probs, r.finish_reason, int(r.tokens.size))
               for i, g in enumerate(groups) for s, r in enumerate(g.requests)]  # fmt: skip
    r = scoring.make_rollouts(sampler.tokenizer, sampler.reward_cfg,
                              [g.example for g in groups], samples)
    keep = rollout_lib.kept_groups(r, metric) if filter_enable else np.ones(len(r), bool)
    for i, g in enumerate(groups):
      rows = np.flatnonzero(r.group_ids == i)
      g.scored, g.keep = r.select(rows), bool(keep[rows].all())

  return score


@dataclasses.dataclass
class PartialRollouts:
  """rollout.mode='partial' or 'disaggregated': the groups in flight, the step's dynamic
  sampling, and (rollout.overlap_calls > 0) the overlap round run while the update runs."""

  carry: partial.Carry = dataclasses.field(default_factory=partial.Carry)
  current: Any = None  # overlap: the sampler's copy of the weights the last batch used
  staged: Any = None  # overlap: (a leaf of the trainer's params, their sampler copy) staged ahead

  def clear(self) -> int:
    return self.carry.clear()

  def _backend(self, rc, sampler: scoring.Sampler, params, step: int, stream: str
               ) -> EngineBackend:
    rl = rc.rl
    return EngineBackend(sampler.engine, params, sampler.method, sampler.eos_ids,
                         rl.max_response_length, rl.n, rc.seed, step,
                         rc.sampling.refill_fraction, stream)

  @staticmethod
  def _score(rc, sampler: scoring.Sampler) -> partial.ScoreFn:
    return score_groups(sampler, rc.rl.filter_groups_enable, rc.rl.filter_groups_metric)

  def _load(self, engine, params):
    """`params` in the sampler's layout: the copy `overlap` staged for them when there is one
    (the same arrays: the step's params are the update's output), else staged now."""
    staged, self.staged = self.staged, None
    if staged is not None and staged[0] is jax.tree.leaves(params)[0]:
      return staged[1]
    return engine.load_params(params)

  def dynamic_sampling(self, rc, sampler: scoring.Sampler, data, params, step: int
                       ) -> tuple[rollout_lib.DynamicSamplingResult, dict[str, Any]]:
    """`rollout._dynamic_sampling`'s contract, with groups carried across steps."""
    rl = rc.rl
    loaded = self._load(sampler.engine, params)
    if rc.rollout.overlap_calls > 0:
      self.current = loaded  # for the overlap round, while the update runs
    res = self.carry.step(self._backend(rc, sampler, loaded, step, "sampling"),
                          self._score(rc, sampler), data.next_batch, step=step,
                          eta=rc.rollout.max_staleness, n=rl.n,
                          train_batch_size=rl.train_batch_size, gen_batch_size=rl.gen_batch_size,
                          max_num_gen_batches=rl.max_num_gen_batches,
                          min_prompts=rl.ppo_mini_batch_size)
    if res.groups:
      rollouts = scoring.Rollouts.concat([g.scored for g in res.groups])
      rollouts.group_ids = np.repeat(np.arange(len(res.groups), dtype=np.int64), rl.n)
    else:
      rollouts = _empty_rollouts()
    stats = res.sampler_stats
    sampled = {
      "tokens": sum(s.tokens_generated for s in stats), "stats": stats,
      # every group scored in this step (or, when carried groups filled it, the batch's)
      "acc": [g.scored.acc for g in res.scored or res.groups] or [np.zeros(0, bool)],
      "scored": sum(g.scored.scored_here for g in res.scored), "metrics": res.metrics,
    }
    return rollout_lib.DynamicSamplingResult(rollouts, res.num_gen_batches, len(res.groups),
                                             res.round_stats), sampled

  def overlap(self, rc, sampler: scoring.Sampler, data, params, step: int) -> dict[str, float]:
    """Run by the trainer after dispatching step `step`'s updates, before fetching them:
    dispatches the staging of their output `params` (version step + 1) onto the sampler's
    devices, then the overlap round (`partial.Carry.overlap`, rollout.overlap_calls generate
    calls) with the weights the batch was sampled with (version `step`). No round when a
    checkpoint follows the step (it would drop the round's groups). {} without overlap."""
    calls = rc.rollout.overlap_calls
    if calls == 0:
      return {}
    current, self.current = self.current, None  # freed once the round's calls complete
    self.staged = (jax.tree.leaves(params)[0], sampler.engine.load_params(params))
    t0 = time.perf_counter()
    stats = None
    if current is not None and not checkpoint_follows(rc, step + 1):
      rl = rc.rl
      stats = self.carry.overlap(
        self._backend(rc, sampler, current, step, "overlap_sampling"),
        self._score(rc, sampler), data.next_batch, step=step, eta=rc.rollout.max_staleness,
        n=rl.n, gen_batch_size=rl.gen_batch_size, calls=calls)
    return {"rollout/overlap_calls": stats.num_generate_calls if stats else 0,
            "rollout/overlap_tokens": stats.tokens_generated if stats else 0,
            "timing_s/overlap": time.perf_counter() - t0}


def checkpoint_follows(rc, done: int) -> bool:
  """Whether the trainer checkpoints after RL step `done` (1-based) on schedule, dropping the
  groups in flight: the last step, and every rc.checkpoint_every."""
  return done == rc.total_steps or (rc.checkpoint_every > 0 and done % rc.checkpoint_every == 0)


def _empty_rollouts() -> scoring.Rollouts:
  f32 = np.zeros(0, np.float32)
  return scoring.Rollouts([], [], [], [], np.zeros(0, np.int64), f32, f32, np.zeros(0, bool), [],
                          np.zeros(0, bool))


def correction(rc) -> tuple[str, float]:
  """(mode, threshold) of the IS weights the trainer's old-log-prob pass puts on the loss:
  rl.rollout_is's, or in partial mode with eta >= 1 rollout.staleness_is's
  min(pi_prox / pi_behav, thr). With eta = 0 no token is stale (the run is the sync one)."""
  mode = rc.rollout.staleness_is if rc.rollout.resumes else rc.rl.rollout_is
  return mode, rc.rl.rollout_is_threshold


def correction_metrics(stats: Sequence[dict], mode: str) -> dict[str, float]:
  """Partial mode: the share of tokens whose IS weight was truncated and the token mean of
  |lp_prox - lp_behav| over the step's batches (`rollout_correction.batch_stats`)."""
  n_tok = max(sum(float(s["n_tok"]) for s in stats), 1.0)
  out = {"rollout/abs_log_ratio_mean": sum(float(s["abs_log_ratio_sum"]) for s in stats) / n_tok}
  if mode != "sequence":
    out["rollout/is_truncated_frac"] = sum(float(s["is_high"]) for s in stats) / n_tok
  return out
