"""The host side of one driver run: the request queue, the slots and the finished samples.

`Loop.run` is the loop of `driver.run` (and of partial rollouts, which stop it early): it fills
freed slots with waiting requests (one shared prefill per prompt), dispatches `generate` calls,
decodes each call's tokens while the next one runs, and collects the finished `Sample`s with
their `SamplerStats` (the scheduling knobs are described in `driver`'s docstring).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import numpy as np
import tqdm

from fipo_jax import distributed


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled response. The stop token (EOS) is included in `response_ids`, as in verl."""

  prompt_index: int
  sample_index: int
  prompt_ids: np.ndarray  # int32[P]
  response_ids: np.ndarray  # int32[T]
  response_logprobs: np.ndarray  # f32[T], log_softmax(logits / temperature), pre-truncation
  finish_reason: str  # 'stop' | 'length' ('aborted': stopped by Loop.run's stop, unfinished)
  length: int  # T


@dataclasses.dataclass
class SamplerStats:
  """Counters from one driver run (slot-steps = decode steps x slots)."""

  num_requests: int = 0
  num_prefill_calls: int = 0
  prefill_rows: int = 0  # prompts prefilled (a prompt shared by n requests counts once)
  prefill_tokens: int = 0  # real prompt tokens prefilled (the prefill's padding not counted)
  num_generate_calls: int = 0
  num_decode_steps: int = 0
  active_slot_steps: int = 0  # slot-steps that produced a token
  total_slot_steps: int = 0
  idle_slot_steps_while_waiting: int = 0  # idle slot-steps while requests were queued
  tokens_generated: int = 0  # includes the first token of each request (from prefill)
  wall_time_s: float = 0.0
  device_time_s: float = 0.0  # the host blocked on device results
  host_time_s: float = 0.0  # wall time outside those waits (host work, dispatch)

  @property
  def slot_utilisation(self) -> float:
    return self.active_slot_steps / max(self.total_slot_steps, 1)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_generated / max(self.wall_time_s, 1e-9)

  @property
  def device_busy(self) -> float:
    """Share of wall time inside device waits: a lower bound on the device's busy time."""
    return self.device_time_s / max(self.wall_time_s, 1e-9)


@dataclasses.dataclass(frozen=True)
class Result:
  samples: list[Sample]
  stats: SamplerStats


class _Prefill:
  """The host side of one Prefix: its requests, how many are inserted, its first tokens."""

  def __init__(self, prefix, requests: list[tuple[int, int, int]]):
    self.prefix = prefix  # dropped (with its KV) once every request is inserted
    self.first_dev = (prefix.tokens, prefix.log_probs)
    self.requests = requests  # (row, prompt_index, sample_index)
    self.next = 0  # requests[:next] are inserted
    self._first = None

  @property
  def remaining(self) -> int:
    return len(self.requests) - self.next

  def first(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Request i's first token and log-prob, int32[1], f32[1] (read once, when first needed)."""
    if self._first is None:
      # fetch: on several hosts the prefill's outputs may be sharded over all of them.
      self._first = distributed.fetch(self.first_dev)
      self.first_dev = None
    tokens, log_probs = self._first
    return np.asarray(tokens[i : i + 1]), np.asarray(log_probs[i : i + 1])


@dataclasses.dataclass
class _Running:
  prompt_index: int
  sample_index: int
  source: _Prefill  # where its first token is
  request: int  # its index in source.requests
  tokens: list[np.ndarray]
  log_probs: list[np.ndarray]
  ended: bool = False  # the engine finished it; its slot may already hold another request


class Loop:
  """The host side of one `run`: the request queue, the slots, the finished samples."""

  def __init__(self, engine, prompts: list[np.ndarray], *, n: int, budgets: list[list[int]],
               stops: frozenset[int], requests=None, mode: str = "continuous",
               share_prefill: bool = True, refill_fraction: float = 0.125, overlap: bool = True,
               progress: bool = False, solo_len: float = math.inf):  # fmt: skip
    # requests: the (prompt, sample) pairs to run, in order (default: every prompt x n).
    # solo_len: a prompt longer than this is prefilled alone (partial rollouts' resumed
    # prefixes: one row per call keeps their prefill and insert shapes to the length buckets).
    self.engine, self.prompts, self.budgets, self.stops, self.mode = (
      engine, prompts, budgets, stops, mode)  # fmt: skip
    self.share_prefill, self.overlap, self.solo_len = share_prefill, overlap, solo_len
    self.num_slots = engine.max_concurrent_decodes
    self.refill = max(1, math.ceil(refill_fraction * self.num_slots - 1e-9))
    self.waiting = collections.deque(
      requests if requests is not None else ((p, s) for p in range(len(prompts))
                                             for s in range(n)))  # fmt: skip
    self.live: collections.deque[_Prefill] = collections.deque()  # prefixes with requests left
    self.stats = SamplerStats(num_requests=len(self.waiting))
    self.slots: list[_Running | None] = [None] * self.num_slots
    self.pending = None  # (result, slot -> request map, waiting?) of the call not yet decoded
    self.fresh: list[tuple[int, _Running]] = []  # inserted since the last generate call
    self.first_only: list[_Running] = []  # budget 1: done on the prefill's token
    self.done: list[Sample] = []
    self.state = engine.init_decode_state()
    self.bar = tqdm.tqdm(total=len(self.waiting), disable=not progress, unit="sample",
                         dynamic_ncols=True)  # fmt: skip
    self.start = time.perf_counter()

  def run(self, params, *, seed: int, sampling, stop=None) -> Result:
    """Fill free slots, one generate call, repeat until every request ended; then drain.
    stop(samples) -> bool (partial rollouts) sees each sample once, when it ends: after each
    generate call those it finished, True stopping the run there (`_abort`); last, those the
    drain finished and, after a stop, the 'aborted' ones (its answer then unused)."""
    seen, stopped = 0, False
    while not stopped and (self.unplaced() or self.busy()):
      if self.unplaced() and self.may_fill():
        self.fill(params, seed=seed, sampling=sampling)
      self.step(params, sampling=sampling)
      if stop is not None:
        stopped, seen = bool(stop(self.done[seen:])), len(self.done)
    if self.pending is not None:  # the last call's tokens
      self._collect(*self.pending)
      self.pending = None
    self._complete_first_only()
    if stop is not None:
      stop(self.done[seen:] + (self._abort() if stopped else []))
    return self.result()

  def busy(self) -> bool:
    return any(s is not None for s in self.slots)

  def free_slots(self) -> list[int]:
    return [i for i, s in enumerate(self.slots) if s is None]

  def may_fill(self) -> bool:
    """Continuous: any free slot; static: only once every slot of the last batch finished."""
    free = len(self.free_slots())
    return free == self.num_slots if self.mode == "static" else free > 0

  def unplaced(self) -> int:
    """Requests not yet in a slot (queued, or prefilled and waiting for one)."""
    return len(self.waiting) + sum(h.remaining for h in self.live)

  # ------------------------------------------------------------------ filling slots

  def fill(self, params, *, seed: int, sampling) -> None:
    """Inserts waiting requests into free slots: prefilled ones first, then new prompts.

    Without overlap, a request that stopped on its first token frees its slot at once (today's
    behaviour); with overlap the host learns it from the next call's `active` flags.
    """
    while True:
      free, left = self.free_slots(), self.unplaced()
      for holder in list(self.live):
        self._place(holder, free)
      if free and self.waiting and self._fits(free, *self.waiting[0]):
        self._place(self._prefill(params, len(free), seed=seed, sampling=sampling), free)
      if not self.overlap:
        self._end_first_stops()
      if not (self.unplaced() and self.unplaced() < left and self.free_slots()):
        break  # nothing left, nothing placed, or every slot taken
    if self.unplaced() and not self.busy():
      p, s = self.waiting[0] if self.waiting else self.live[0].requests[self.live[0].next][1:]
      raise ValueError(f"no free slot can hold prompt {p} ({len(self.prompts[p])} tokens + "
                       f"{self.budgets[p][s]} new): too few KV pages in the engine")  # fmt: skip

  def _end_first_stops(self) -> None:
    """Ends the requests just inserted whose first token is a stop token."""
    ended = [slot for slot, run_ in self.fresh
             if int(run_.source.first(run_.request)[0][0]) in self.stops]  # fmt: skip
    self.fresh = []
    for slot in ended:
      run_, self.slots[slot] = self.slots[slot], None
      self._complete(run_)
    if ended:
      self.engine.release(ended)

  def _fits(self, free: list[int], p: int, s: int) -> bool:
    return self.budgets[p][s] <= 1 or any(self._can_insert(slot, p, s) for slot in free)

  def _can_insert(self, slot: int, p: int, s: int) -> bool:
    return self.engine.can_insert(slot, len(self.prompts[p]), self.budgets[p][s])

  def _prefill(self, params, num_free: int, *, seed: int, sampling) -> _Prefill:
    """Prefills the next waiting requests: whole prompts (share_prefill) or one row each."""
    rows: list[int] = []  # prompt index per prefill row
    requests: list[tuple[int, int, int]] = []
    need = 0  # requests that will take a slot
    while self.waiting:
      p, s = self.waiting[0]
      if not self.share_prefill or not rows or rows[-1] != p:  # a new prefill row
        if need >= num_free or len(rows) == self.num_slots or (rows and max(
            len(self.prompts[rows[0]]), len(self.prompts[p])) > self.solo_len):  # fmt: skip
          break  # enough requests to fill every free slot, or a prompt to prefill alone
        rows.append(p)
      self.waiting.popleft()
      requests.append((len(rows) - 1, p, s))
      need += self.budgets[p][s] > 1  # a budget of 1 takes no slot
    prefix = self.engine.prefill(params, [self.prompts[p] for p in rows], requests, seed=seed,
                                 sampling=sampling)  # fmt: skip
    self.stats.num_prefill_calls += 1
    self.stats.prefill_rows += len(rows)
    self.stats.prefill_tokens += sum(len(self.prompts[p]) for p in rows)
    holder = _Prefill(prefix, requests)
    self.live.append(holder)
    return holder

  def _place(self, holder: _Prefill, free: list[int]) -> None:
    """Inserts holder's next requests into slots taken from `free` (one insert call).

    `can_insert` looks at each slot alone, so a batch may still overdraw a shard's pages; the
    engine's insert then raises, reserving nothing, and the requests go in one at a time.
    """
    slots, rows, upto = self._choose(holder, free, limit=len(free))
    try:
      self._insert(holder, slots, rows, upto)
    except ValueError:
      free.extend(slots)
      free.sort()
      while holder.remaining:  # can_insert is exact for a single request
        slots, rows, upto = self._choose(holder, free, limit=1)
        if upto == holder.next:
          break
        self._insert(holder, slots, rows, upto)

  def _choose(self, holder: _Prefill, free: list[int], *, limit: int
              ) -> tuple[list[int], list[int], int]:  # fmt: skip
    """Up to `limit` slots off `free` for holder's next requests, in order.

    Returns (slots, their request rows, the end of the requests covered): a request with a
    budget of 1 takes no slot (its one token is the prefill's).
    """
    slots, rows, i = [], [], holder.next
    while i < len(holder.requests):
      _, p, s = holder.requests[i]
      if self.budgets[p][s] > 1:
        slot = None if len(slots) == limit else next(
          (x for x in free if self._can_insert(x, p, s)), None)  # fmt: skip
        if slot is None:
          break
        free.remove(slot)
        slots.append(slot)
        rows.append(i)
      i += 1
    return slots, rows, i

  def _insert(self, holder: _Prefill, slots: list[int], rows: list[int], upto: int) -> None:
    """engine.insert of `rows` into `slots` (raises, inserting nothing, if pages run out);
    the other requests before `upto` finish on their prefill token."""
    if slots:
      budgets = [self.budgets[p][s] for _, p, s in (holder.requests[r] for r in rows)]
      self.state = self.engine.insert(holder.prefix, self.state, slots, rows, budgets, self.stops)
    for slot, r in zip(slots, rows, strict=True):
      self.slots[slot] = _Running(*holder.requests[r][1:], holder, r, [], [])
      self.fresh.append((slot, self.slots[slot]))
    self.first_only += [_Running(*holder.requests[r][1:], holder, r, [], [], ended=True)
                        for r in range(holder.next, upto) if r not in rows]  # fmt: skip
    self.stats.tokens_generated += upto - holder.next
    holder.next = upto
    if not holder.remaining:
      holder.prefix = None  # every request inserted: its KV is no longer needed
      self.live.remove(holder)

  # ------------------------------------------------------------------ decoding

  def min_free(self) -> int:
    """Continuous with requests waiting: back once `refill` slots finished (or all it can use)."""
    left = self.unplaced()
    if self.mode == "static" or not left:
      return self.num_slots + 1
    return max(1, min(self.refill, left))

  def step(self, params, *, sampling) -> None:
    """One generate call; decodes the previous call's tokens while it runs (overlap)."""
    snapshot = list(self.slots)
    waiting = self.unplaced() > 0
    self.fresh = []
    self.state, res = self.engine.generate(
      params, self.state, sampling=sampling, stop_ids=self.stops, min_free=self.min_free()
    )
    if self.pending is not None:
      self._collect(*self.pending)
      self.pending = None
    self._end(snapshot, self._wait(res.active))
    if self.overlap:
      self.pending = (res, snapshot, waiting)
    else:
      self._collect(res, snapshot, waiting)

  def _complete_first_only(self) -> None:
    for run_ in self.first_only:
      self._complete(run_)
    self.first_only = []

  def _wait(self, tree):
    """distributed.fetch, timed as device time (the host blocks until the values exist)."""
    start = time.perf_counter()
    out = distributed.fetch(tree)
    self.stats.device_time_s += time.perf_counter() - start
    return out

  def _end(self, snapshot: list[_Running | None], active: np.ndarray) -> None:
    """Frees (and releases the pages of) the slots whose requests the engine finished."""
    ended = []
    for slot, run_ in enumerate(snapshot):
      if run_ is not None and not active[slot]:
        run_.ended = True
        self.slots[slot] = None
        ended.append(slot)
    if ended:
      self.engine.release(ended)

  def _collect(self, res, snapshot: list[_Running | None], waiting: bool) -> None:
    """Appends each request's valid tokens of one call; completes the requests that ended."""
    self._complete_first_only()  # their prefill ran before this call
    tokens, log_probs, valid, num_steps = self._wait(
      (res.tokens, res.log_probs, res.valid, res.num_steps))  # fmt: skip
    steps = int(num_steps)
    valid = np.asarray(valid[:steps])  # bool[steps, slots]
    self._count(steps, valid, waiting)
    for slot, run_ in enumerate(snapshot):
      if run_ is None:
        continue
      keep = valid[:, slot]
      run_.tokens.append(np.asarray(tokens[:steps, slot][keep]))
      run_.log_probs.append(np.asarray(log_probs[:steps, slot][keep]))
      if run_.ended:
        self._complete(run_)

  def _count(self, steps: int, valid: np.ndarray, waiting: bool) -> None:
    st = self.stats
    st.num_generate_calls += 1
    st.num_decode_steps += steps
    st.total_slot_steps += steps * self.num_slots
    st.active_slot_steps += int(valid.sum())
    st.tokens_generated += int(valid.sum())
    if waiting:
      st.idle_slot_steps_while_waiting += int((~valid).sum())

  def _abort(self) -> list[Sample]:
    """Stops the run: the requests in a slot as Samples of the tokens they have (finish_reason
    'aborted'; their pages released); those not in a slot yet are dropped."""
    busy = [i for i, run_ in enumerate(self.slots) if run_ is not None]
    out = [self._sample(self.slots[i], "aborted") for i in busy]
    self.slots = [None] * self.num_slots
    self.engine.release(busy)
    return out

  def _sample(self, run_: _Running, reason: str | None = None) -> Sample:
    first, first_lp = run_.source.first(run_.request)
    response = np.concatenate([first, *run_.tokens]).astype(np.int32)
    logprobs = np.concatenate([first_lp, *run_.log_probs]).astype(np.float32)
    if reason is None:
      reason = "stop" if response.size and int(response[-1]) in self.stops else "length"
    return Sample(run_.prompt_index, run_.sample_index, self.prompts[run_.prompt_index],
                  response, logprobs, reason, int(response.size))  # fmt: skip

  def _complete(self, run_: _Running) -> None:
    self.done.append(self._sample(run_))
    self.bar.update(1)
    elapsed = time.perf_counter() - self.start
    self.bar.set_postfix(tok_s=f"{self.stats.tokens_generated / elapsed:.1f}")

  def result(self) -> Result:
    st = self.stats
    st.wall_time_s = time.perf_counter() - self.start
    st.host_time_s = st.wall_time_s - st.device_time_s
    self.bar.close()
    self.done.sort(key=lambda x: (x.prompt_index, x.sample_index))
    return Result(self.done, st)
