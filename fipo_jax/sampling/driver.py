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
  loop = _Loop(engine, [np.asarray(p, np.int32) for p in prompts], n=n,
               budgets=_budgets(max_new_tokens, len(prompts)),
               stops=frozenset(int(i) for i in (*eos_ids, *stop_ids)), mode=mode,
               progress=progress)
  while loop.waiting or loop.busy():
    if loop.waiting and loop.may_fill():
      loop.fill(params, seed=seed, sampling=sampling)
    else:
      loop.decode(params, sampling=sampling)
  return loop.result()


class _Loop:
  """The host side of one `run`: the request queue, the slots, the finished samples."""

  def __init__(self, engine, prompts: list[np.ndarray], *, n: int, budgets: list[int],
               stops: frozenset[int], mode: str, progress: bool):
    self.engine, self.prompts, self.budgets, self.stops, self.mode = (
      engine, prompts, budgets, stops, mode)
    self.num_slots = engine.max_concurrent_decodes
    self.waiting = collections.deque((p, s) for p in range(len(prompts)) for s in range(n))
    self.stats = SamplerStats(num_requests=len(self.waiting))
    self.slots: list[_Running | None] = [None] * self.num_slots
    self.done: list[Sample] = []
    self.state = engine.init_decode_state()
    self.bar = tqdm.tqdm(total=len(self.waiting), disable=not progress, unit="sample",
                         dynamic_ncols=True)
    self.start = time.perf_counter()

  def busy(self) -> bool:
    return any(s is not None for s in self.slots)

  def free_slots(self) -> list[int]:
    return [i for i, s in enumerate(self.slots) if s is None]

  def may_fill(self) -> bool:
    """Continuous: any free slot; static: only once every slot of the last batch finished."""
    free = len(self.free_slots())
    return free == self.num_slots if self.mode == "static" else free > 0

  def fill(self, params, *, seed: int, sampling) -> None:
    """Prefills waiting requests into the free slots (a request may finish on its first token)."""
    free = self.free_slots()
    take = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
    use = free[: len(take)]
    prefix = self.engine.prefill(params, [self.prompts[p] for p, _ in take], take, seed=seed,
                                 sampling=sampling)
    self.state = self.engine.insert(prefix, self.state, use,
                                    [self.budgets[p] for p, _ in take], self.stops)
    # fetch: on several hosts the prefill's outputs may be sharded over all of them.
    first, first_lp = distributed.fetch((prefix.tokens, prefix.log_probs))
    self.stats.num_prefill_calls += 1
    self.stats.tokens_generated += len(take)
    for i, ((p, s), slot) in enumerate(zip(take, use, strict=True)):
      self.slots[slot] = _Running(p, s, [first[i : i + 1]], [first_lp[i : i + 1]])
      if int(first[i]) in self.stops or self.budgets[p] <= 1:
        self.finish(slot)  # the engine marked this slot inactive too

  def decode(self, params, *, sampling) -> None:
    """One generate call; appends each slot's valid tokens and finishes the inactive slots."""
    # With requests waiting (continuous), come back as soon as one slot frees up.
    min_free = 1 if (self.waiting and self.mode == "continuous") else self.num_slots + 1
    self.state, result = self.engine.generate(params, self.state, sampling=sampling,
                                              stop_ids=self.stops, min_free=min_free)
    res = jax.device_get(result)
    steps = int(res.num_steps)
    valid = np.asarray(res.valid[:steps])  # bool[steps, slots]
    self._count(steps, valid)
    for slot, run_ in enumerate(self.slots):
      if run_ is None:
        continue
      keep = valid[:, slot]
      run_.tokens.append(np.asarray(res.tokens[:steps, slot][keep]))
      run_.log_probs.append(np.asarray(res.log_probs[:steps, slot][keep]))
      if not res.active[slot]:
        self.finish(slot)

  def _count(self, steps: int, valid: np.ndarray) -> None:
    st = self.stats
    st.num_generate_calls += 1
    st.num_decode_steps += steps
    st.total_slot_steps += steps * self.num_slots
    st.active_slot_steps += int(valid.sum())
    st.tokens_generated += int(valid.sum())
    if self.waiting:
      st.idle_slot_steps_while_waiting += int((~valid).sum())

  def finish(self, slot: int) -> None:
    run_, self.slots[slot] = self.slots[slot], None
    response = np.concatenate(run_.tokens).astype(np.int32)
    logprobs = np.concatenate(run_.log_probs).astype(np.float32)
    reason = "stop" if response.size and int(response[-1]) in self.stops else "length"
    self.done.append(Sample(run_.prompt_index, run_.sample_index, self.prompts[run_.prompt_index],
                            response, logprobs, reason, int(response.size)))
    self.bar.update(1)
    elapsed = time.perf_counter() - self.start
    self.bar.set_postfix(tok_s=f"{self.stats.tokens_generated / elapsed:.1f}")

  def result(self) -> Result:
    self.stats.wall_time_s = time.perf_counter() - self.start
    self.bar.close()
    self.done.sort(key=lambda x: (x.prompt_index, x.sample_index))
    return Result(self.done, self.stats)


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
