"""The offline rollout driver: prompts x n samples through an Engine, continuously batched.

Continuous batching: whenever requests are waiting, `generate` is asked to return as soon
as one slot finishes, and the host prefills and inserts waiting requests into every free
slot before the next call, so no slot idles while work remains. Static batching (for the
benchmark) fills all slots, runs them to completion, then takes the next batch.

Every request's PRNG key is derived from (seed, prompt_index, sample_index), so the same
seed gives the same samples whatever the slot count or batching mode.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np
import tqdm

from fipo_jax import distributed
from fipo_jax.sampling import params as params_lib

MODES = ("continuous", "static")
_GREEDY = params_lib.Greedy()


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled response. The stop token (EOS) is included in `response_ids`, as in verl."""

  prompt_index: int
  sample_index: int
  prompt_ids: np.ndarray  # int32[P]
  response_ids: np.ndarray  # int32[T]
  response_logprobs: np.ndarray  # f32[T], log_softmax(logits / temperature), pre-truncation
  finish_reason: str  # 'stop' | 'length'
  length: int  # T


@dataclasses.dataclass
class SamplerStats:
  """Counters from one driver run (slot-steps = decode steps x slots)."""

  num_requests: int = 0
  num_prefill_calls: int = 0
  num_generate_calls: int = 0
  num_decode_steps: int = 0
  active_slot_steps: int = 0  # slot-steps that produced a token
  total_slot_steps: int = 0
  idle_slot_steps_while_waiting: int = 0  # idle slot-steps while requests were queued
  tokens_generated: int = 0  # includes the first token of each request (from prefill)
  wall_time_s: float = 0.0

  @property
  def slot_utilisation(self) -> float:
    return self.active_slot_steps / max(self.total_slot_steps, 1)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_generated / max(self.wall_time_s, 1e-9)


@dataclasses.dataclass(frozen=True)
class Result:
  samples: list[Sample]
  stats: SamplerStats


@dataclasses.dataclass
class _Running:
  prompt_index: int
  sample_index: int
  tokens: list[np.ndarray]
  log_probs: list[np.ndarray]


def generate_samples(engine, params, prompts: Sequence[Sequence[int]], **kwargs) -> list[Sample]:
  """Samples n responses per prompt; see `run` for the arguments. Sorted by (prompt, sample)."""
  return run(engine, params, prompts, **kwargs).samples


def run(
  engine,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  n: int = 1,
  max_new_tokens: int | Sequence[int],
  sampling: params_lib.SamplingMethod = _GREEDY,
  eos_ids: Sequence[int] = (),
  stop_ids: Sequence[int] = (),
  seed: int = 0,
  mode: str = "continuous",
  progress: bool = False,
) -> Result:
  """Runs all prompts x n samples through `engine` with `params`.

  Args:
    engine: an `engine.Engine` (or anything with its prefill/insert/generate API).
    params: the model params state; pass the newest after each optimizer step.
    prompts: token-id lists, each 1..engine max_prompt_len long.
    n: samples per prompt.
    max_new_tokens: response budget, one int or one per prompt.
    sampling: `Greedy()` or `Sampling(temperature, top_p, top_k)`.
    eos_ids, stop_ids: tokens that end a response (kept in it, finish_reason 'stop').
    seed: makes runs reproducible; request keys derive from (seed, prompt, sample).
    mode: 'continuous' (refill freed slots at once) or 'static' (batch by batch).
    progress: show a tqdm bar with tokens/s.

  Returns:
    Result(samples sorted by (prompt_index, sample_index), stats).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if n <= 0:
    raise ValueError(f"n must be positive, got {n}")
  budgets = _budgets(max_new_tokens, len(prompts))
  stops = frozenset(int(i) for i in (*eos_ids, *stop_ids))
  prompts = [np.asarray(p, np.int32) for p in prompts]
  num_slots = engine.max_concurrent_decodes
  waiting = collections.deque((p, s) for p in range(len(prompts)) for s in range(n))
  stats = SamplerStats(num_requests=len(waiting))
  slots: list[_Running | None] = [None] * num_slots
  done: list[Sample] = []
  state = engine.init_decode_state()
  bar = tqdm.tqdm(total=len(waiting), disable=not progress, unit="sample", dynamic_ncols=True)
  start = time.perf_counter()

  def finish(slot: int) -> None:
    run_ = slots[slot]
    slots[slot] = None
    response = np.concatenate(run_.tokens).astype(np.int32)
    logprobs = np.concatenate(run_.log_probs).astype(np.float32)
    reason = "stop" if response.size and int(response[-1]) in stops else "length"
    done.append(
      Sample(
        run_.prompt_index,
        run_.sample_index,
        prompts[run_.prompt_index],
        response,
        logprobs,
        reason,
        int(response.size),
      )
    )
    bar.update(1)
    bar.set_postfix(tok_s=f"{stats.tokens_generated / (time.perf_counter() - start):.1f}")

  while waiting or any(s is not None for s in slots):
    free = [i for i, s in enumerate(slots) if s is None]
    may_fill = len(free) == num_slots if mode == "static" else bool(free)
    if waiting and may_fill:
      take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
      use = free[: len(take)]
      prefix = engine.prefill(
        params, [prompts[p] for p, _ in take], take, seed=seed, sampling=sampling
      )
      state = engine.insert(prefix, state, use, [budgets[p] for p, _ in take], stops)
      # fetch: on several hosts the prefill's outputs may be sharded over all of them.
      first, first_lp = distributed.fetch((prefix.tokens, prefix.log_probs))
      stats.num_prefill_calls += 1
      stats.tokens_generated += len(take)
      for i, ((p, s), slot) in enumerate(zip(take, use, strict=True)):
        slots[slot] = _Running(p, s, [first[i : i + 1]], [first_lp[i : i + 1]])
        if int(first[i]) in stops or budgets[p] <= 1:
          finish(slot)  # the engine marked this slot inactive too
      continue
    # With requests waiting (continuous), come back as soon as one slot frees up.
    min_free = 1 if (waiting and mode == "continuous") else num_slots + 1
    state, result = engine.generate(
      params, state, sampling=sampling, stop_ids=stops, min_free=min_free
    )
    res = jax.device_get(result)
    steps = int(res.num_steps)
    valid = np.asarray(res.valid[:steps])
    stats.num_generate_calls += 1
    stats.num_decode_steps += steps
    stats.total_slot_steps += steps * num_slots
    stats.active_slot_steps += int(valid.sum())
    stats.tokens_generated += int(valid.sum())
    if waiting:
      stats.idle_slot_steps_while_waiting += int((~valid).sum())
    for slot, run_ in enumerate(slots):
      if run_ is None:
        continue
      keep = valid[:, slot]
      run_.tokens.append(np.asarray(res.tokens[:steps, slot][keep]))
      run_.log_probs.append(np.asarray(res.log_probs[:steps, slot][keep]))
      if not res.active[slot]:
        finish(slot)
  stats.wall_time_s = time.perf_counter() - start
  bar.close()
  done.sort(key=lambda x: (x.prompt_index, x.sample_index))
  return Result(done, stats)


def _budgets(max_new_tokens: int | Sequence[int], num_prompts: int) -> list[int]:
  if isinstance(max_new_tokens, int | np.integer):
    budgets = [int(max_new_tokens)] * num_prompts
  else:
    budgets = [int(b) for b in max_new_tokens]
    if len(budgets) != num_prompts:
      raise ValueError(f"{len(budgets)} max_new_tokens for {num_prompts} prompts")
  if budgets and min(budgets) <= 0:
    raise ValueError("max_new_tokens must be positive")
  return budgets
