"""Partial rollouts carried across RL steps (rollout.mode='partial'; stage A, colocated).

The scheduler here is host-only bookkeeping; what samples and scores is injected (the engine's
continuous-batching loop in `rl/partial_sampling.py`, a fake in the unit tests). Per RL step k
(the policy of version k = the params after k steps' updates):

  1. Groups carried from earlier steps whose oldest token is more than eta =
     rollout.max_staleness versions old (k - oldest > eta) are dropped: they could never be
     admitted. The others go first (oldest first) into round 0, topped up with new prompts to
     rl.gen_batch_size groups, so the groups in flight stay bounded.
  2. A round samples every unfinished request of its groups with version k: a request that has
     tokens resumes by re-prefilling its prompt plus its tokens (no stale KV). A group is scored
     (and passes or fails DAPO's filter) once all its n responses are finished.
  3. With eta >= 1 the round stops as soon as the passing groups fill the batch; the requests
     still running keep their tokens, behaviour log-probs and each token's version. With eta = 0
     the round runs to its end, as in sync: an unfinished group could never be admitted, so
     stopping early would only bias the batch towards short responses.
  4. The batch is the first rl.train_batch_size passing finished groups in (round, position)
     order, so carried groups come first; further passing finished groups and the unfinished
     ones carry over. Rounds repeat as in `rollout.collect_with_dynamic_sampling` while the
     batch is not full (rounds before the last run to their end).

With rollout.overlap_calls = c > 0 (disaggregated, eta >= 1), `Carry.overlap` runs one more
round after step k's batch is taken, while update k runs on the trainer's devices: the groups
carried into step k + 1 that it could still admit, topped up with new prompts to
rl.gen_batch_size groups as round 0 tops up, sampled with version k for exactly c device calls
(a fixed count, never a readiness poll: the run stays reproducible). Groups it finishes are
scored then and count for step k + 1; its unfinished requests carry over with their version-k
tokens and resume at step k + 1 under version k + 1 as any other (rules 1-4 unchanged).

A group is never split: it is admitted whole or dropped whole. With eta = 0 nothing carried is
ever admitted and every round runs to its end, so a partial run is the sync run bit for bit.
`Carry.clear` drops everything in flight (at checkpoints: a resumed run then equals an
uninterrupted one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class Request:
  """One response of a group, finished or not. Its arrays grow each time it resumes."""

  tokens: np.ndarray  # int32[t], the response so far
  log_probs: np.ndarray  # f32[t], the behaviour policy's log-prob of each token
  versions: np.ndarray  # int32[t], the policy version (RL step) that sampled each token
  finish_reason: str | None = None  # 'stop' | 'length'; None: unfinished

  @classmethod
  def empty(cls) -> Request:
    return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32))

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def extend(self, tokens, log_probs, version: int, finish_reason: str | None) -> None:
    """Appends tokens sampled by policy `version`; finish_reason None: still unfinished."""
    self.tokens = np.concatenate([self.tokens, np.asarray(tokens, np.int32)])
    self.log_probs = np.concatenate([self.log_probs, np.asarray(log_probs, np.float32)])
    self.versions = np.concatenate([self.versions, np.full(len(tokens), version, np.int32)])
    self.finish_reason = finish_reason


@dataclasses.dataclass
class Group:
  """A prompt's n requests, admitted or dropped together."""

  example: dict[str, Any]  # the data pipeline's example: prompt_ids, ground_truth, ...
  requests: list[Request]
  scored: Any = None  # once finished: what `score` made of it (Rollouts in the trainer)
  keep: bool = False  # once finished: whether it passes dynamic sampling's filter

  @classmethod
  def new(cls, example: dict[str, Any], n: int) -> Group:
    return cls(example, [Request.empty() for _ in range(n)])

  @property
  def done(self) -> bool:
    return all(r.done for r in self.requests)

  @property
  def oldest(self) -> int | None:
    """The version of its oldest token (None before it has any)."""
    started = [int(r.versions.min()) for r in self.requests if r.versions.size]
    return min(started) if started else None

  def lag(self, step: int) -> int:
    """Versions between its oldest token and policy `step` (0 when it has none)."""
    oldest = self.oldest
    return 0 if oldest is None else step - oldest


class Backend(Protocol):
  """What samples: `run` extends the unfinished requests of `groups` with policy `version`,
  calling `on_done(indices of groups that just finished)` after each device call; when that
  returns True it stops there (unfinished requests keep what they have), as it does after
  `max_calls` device calls (0: no limit; the overlap round). Returns its stats."""

  def run(self, groups: Sequence[Group], *, version: int, seed_round: int,
          on_done: Callable[[list[int]], bool], max_calls: int = 0) -> Any: ...


# score(groups): sets each finished group's `scored` and `keep`.
ScoreFn = Callable[[Sequence[Group]], None]


@dataclasses.dataclass
class StepResult:
  """One RL step's partial-mode dynamic sampling."""

  groups: list[Group]  # the batch, in order (whole groups)
  num_gen_batches: int  # rounds
  round_stats: list[dict[str, float]]
  sampler_stats: list[Any]  # the backend's per round
  scored: list[Group]  # every group that finished (and was scored) in this step
  metrics: dict[str, float]


@dataclasses.dataclass
class Carry:
  """The groups in flight between RL steps, oldest first."""

  groups: list[Group] = dataclasses.field(default_factory=list)
  # groups an overlap round finished and scored: reported with the next step's scored ones
  scored_early: list[Group] = dataclasses.field(default_factory=list)

  def clear(self) -> int:
    """Drops every group in flight (deterministically); returns how many."""
    dropped = len(self.groups)
    self.groups, self.scored_early = [], []
    return dropped

  def overlap(self, backend: Backend, score: ScoreFn, draw: Callable[[int], list[dict]], *,
              step: int, eta: int, n: int, gen_batch_size: int, calls: int) -> Any:
    """Step `step`'s overlap round (module docstring): at most `calls` device calls with
    policy `step`, after its batch was taken. Groups step + 1 would drop as stale are left
    alone (and dropped there). Returns the backend's stats (None: nothing left to sample)."""
    live = [g for g in self.groups if g.lag(step + 1) <= eta]
    k = max(0, gen_batch_size - len(live))
    new = [Group.new(e, n) for e in (draw(k) if k else [])]
    groups = live + new
    self.groups += new  # oldest first: the carried ones, then the new
    if all(g.done for g in groups):
      return None

    def on_done(idx: list[int]) -> bool:
      finished = [groups[i] for i in idx]
      score(finished)
      self.scored_early += finished
      return False  # only the call count ends the round

    return backend.run(groups, version=step, seed_round=0, on_done=on_done, max_calls=calls)

  def step(self, backend: Backend, score: ScoreFn, draw: Callable[[int], list[dict]], *,
           step: int, eta: int, n: int, train_batch_size: int, gen_batch_size: int,
           max_num_gen_batches: int, min_prompts: int) -> StepResult:
    """RL step `step`'s dynamic sampling (module docstring). `draw(k)`: the next k examples.

    Fewer than train_batch_size passing groups after max_num_gen_batches rounds (0 = no cap):
    as `rollout.collect_with_dynamic_sampling`, the batch is cut to a multiple of
    `min_prompts` groups (empty when fewer), the rest carries over."""
    live = [g for g in self.groups if g.lag(step) <= eta]
    dropped, carried_in = len(self.groups) - len(live), len(live)
    resumed = sum(1 for g in live for r in g.requests if r.tokens.size and not r.done)
    self.groups = []
    kept: list[Group] = []
    out = StepResult([], 0, [], [], self.scored_early, {})
    self.scored_early = []
    while True:
      new = max(0, gen_batch_size - len(live))
      groups = live + [Group.new(e, n) for e in (draw(new) if new else [])]
      live = []
      need = train_batch_size - len(kept)
      passing = sum(g.keep for g in groups if g.done)  # carried finished groups: scored before

      def on_done(idx: list[int], groups=groups, need=need) -> bool:
        nonlocal passing
        finished = [groups[i] for i in idx]
        score(finished)
        out.scored.extend(finished)
        passing += sum(g.keep for g in finished)
        return eta > 0 and passing >= need

      if not (eta > 0 and passing >= need):
        out.sampler_stats.append(backend.run(groups, version=step, seed_round=out.num_gen_batches,
                                             on_done=on_done))
      out.num_gen_batches += 1
      ok = [g for g in groups if g.done and g.keep]
      kept += ok[:need]
      self.groups += [g for g in groups if not g.done] + ok[need:]
      out.round_stats.append({"round": out.num_gen_batches, "prompts": len(groups),
                              "kept": len(ok)})
      if len(kept) >= train_batch_size:
        break
      if max_num_gen_batches > 0 and out.num_gen_batches >= max_num_gen_batches:
        cut = (len(kept) // min_prompts) * min_prompts
        self.groups = kept[cut:] + self.groups  # oldest first
        kept = kept[:cut]
        break
    out.groups = kept
    out.metrics = staleness_metrics(kept, step) | {
      "rollout/carried_groups": carried_in, "rollout/dropped_stale_groups": dropped,
      "rollout/resumed_requests": resumed, "rollout/in_flight_groups": len(self.groups)}
    return out


def staleness_metrics(groups: Sequence[Group], step: int) -> dict[str, float]:
  """rollout/staleness_{max,mean}: the lag (versions) of each response's oldest token, over the
  batch's responses; rollout/stale_token_frac: the share of tokens sampled before `step`."""
  lags = [step - int(r.versions.min()) for g in groups for r in g.requests if r.versions.size]
  tokens = sum(r.versions.size for g in groups for r in g.requests)
  stale = sum(int(np.sum(r.versions < step)) for g in groups for r in g.requests)
  return {"rollout/staleness_max": float(max(lags, default=0)),
          "rollout/staleness_mean": float(np.mean(lags)) if lags else 0.0,
          "rollout/stale_token_frac": stale / max(tokens, 1)}
