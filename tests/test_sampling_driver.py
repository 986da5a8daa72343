"""The continuous-batching driver against a fake, deterministic engine (no model)."""

import dataclasses

import numpy as np
import pytest

from fipo_jax.sampling import batching, driver

_STOP = 0


def _token(prompt, sample_index, t):
  """Request token t: the stop token at t == prompt[0] - 1 (the target length), else 1..50."""
  if t == prompt[0] - 1:
    return _STOP
  return 1 + (int(np.sum(prompt)) + 3 * sample_index + t) % 50


def _log_prob(t):
  return -0.01 * (t + 1)


@dataclasses.dataclass
class _Prefix:
  tokens: np.ndarray  # [R] first token per request
  log_probs: np.ndarray
  reqs: list  # per request: (prompt array, sample_index)


@dataclasses.dataclass
class _State:
  req: list  # per slot: (prompt, sample_index) or None
  num_generated: np.ndarray
  max_new: np.ndarray
  active: np.ndarray


@dataclasses.dataclass
class _Result:
  tokens: np.ndarray
  log_probs: np.ndarray
  valid: np.ndarray
  active: np.ndarray
  num_steps: int


class FakeEngine:
  """The Engine API the driver uses (shared prefill, page reservation, early-return generate).

  A slot reserves ceil((prompt + max_new) / page_size) of `num_pages` pages at insert (None:
  unlimited) until `release`; inserting into a busy or unreleased slot is an error. `prefills`
  records each prefill call's rows as prompt indices; `min_frees` each generate's min_free.
  """

  def __init__(self, num_slots, steps_per_call, *, num_pages=None, page_size=4):
    self.max_concurrent_decodes = num_slots
    self.steps = steps_per_call
    self.num_pages, self.page_size = num_pages, page_size
    self.reserved: dict[int, int] = {}  # slot -> pages
    self.prefills: list[list[int]] = []
    self.min_frees: list[int] = []

  def init_decode_state(self):
    b = self.max_concurrent_decodes
    self.reserved = {}
    return _State([None] * b, np.zeros(b, int), np.zeros(b, int), np.zeros(b, bool))

  def prefill(self, params, prompts, requests, *, seed, sampling):
    assert 0 < len(prompts) <= self.max_concurrent_decodes
    assert sorted({r for r, _, _ in requests}) == list(range(len(prompts)))
    rows = {}
    for r, p, _ in requests:
      assert rows.setdefault(r, p) == p, "a prefill row serves one prompt"
    self.prefills.append([rows[r] for r in range(len(prompts))])
    reqs = [(np.asarray(prompts[r]), s) for r, _, s in requests]
    return _Prefix(
      np.array([_token(p, s, 0) for p, s in reqs]), np.array([_log_prob(0)] * len(reqs)), reqs
    )

  def _pages(self, prompt_len, max_new):
    return -(-(prompt_len + max_new) // self.page_size)

  def can_insert(self, slot, prompt_len, max_new):
    if self.num_pages is None:
      return True
    return self._pages(prompt_len, max_new) <= self.num_pages - sum(self.reserved.values())

  def release(self, slots):
    for slot in slots:
      assert slot in self.reserved, "released a slot that holds nothing"
      del self.reserved[slot]

  def insert(self, prefix, state, slots, request_rows, max_new_tokens, stop_ids):
    assert len(slots) == len(request_rows) == len(max_new_tokens)
    need = [
      self._pages(len(prefix.reqs[r][0]), b)
      for r, b in zip(request_rows, max_new_tokens, strict=True)
    ]
    if self.num_pages is not None and sum(need) > self.num_pages - sum(self.reserved.values()):
      raise ValueError("too few free pages")  # nothing reserved, as the engine's insert
    for slot, row, budget, pages in zip(slots, request_rows, max_new_tokens, need, strict=True):
      assert not state.active[slot], "inserted into a busy slot"
      assert slot not in self.reserved, "inserted into a slot that was not released"
      self.reserved[slot] = pages
      state.req[slot] = prefix.reqs[row]
      state.num_generated[slot] = 1
      state.max_new[slot] = budget
      state.active[slot] = prefix.tokens[row] not in stop_ids and budget > 1
    return state

  def generate(self, params, state, *, sampling, stop_ids, min_free):
    self.min_frees.append(min_free)
    b = self.max_concurrent_decodes
    out = _Result(
      np.zeros((self.steps, b), int),
      np.zeros((self.steps, b)),
      np.zeros((self.steps, b), bool),
      None,
      0,
    )
    freed = 0
    while out.num_steps < self.steps and state.active.any() and freed < min_free:
      i = out.num_steps
      for slot in np.flatnonzero(state.active):
        prompt, s = state.req[slot]
        t = state.num_generated[slot]
        tok = _token(prompt, s, t)
        out.tokens[i, slot], out.log_probs[i, slot], out.valid[i, slot] = tok, _log_prob(t), True
        state.num_generated[slot] += 1
        if tok in stop_ids or state.num_generated[slot] >= state.max_new[slot]:
          state.active[slot] = False
          freed += 1
      out.num_steps += 1
    out.active = state.active.copy()
    return state, out


def _long_tailed_prompts(num, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.minimum(rng.pareto(1.2, num) * 4 + 2, 120).astype(int)
  return [[int(n), *rng.integers(1, 50, size=rng.integers(1, 6)).tolist()] for n in lengths]


def _expected(prompt, s, budget):
  out = []
  for t in range(budget):
    out.append(_token(np.asarray(prompt), s, t))
    if out[-1] == _STOP:
      return out, "stop"
  return out, "length"


KNOBS = {"new": {}, "reference": driver.REFERENCE,
         "no_overlap": {"overlap": False}, "per_request_prefill": {"share_prefill": False},
         "refill_each": {"refill_fraction": 0.0}}  # fmt: skip


def _check_samples(res, prompts, n, budgets):
  assert [(x.prompt_index, x.sample_index) for x in res.samples] == [
    (p, s) for p in range(len(prompts)) for s in range(n)
  ]
  for x in res.samples:
    budget = budgets[x.prompt_index]
    budget = budget if np.ndim(budget) == 0 else budget[x.sample_index]  # per request
    want, reason = _expected(prompts[x.prompt_index], x.sample_index, budget)
    np.testing.assert_array_equal(x.response_ids, want)
    np.testing.assert_allclose(x.response_logprobs, [_log_prob(t) for t in range(len(want))])
    assert x.finish_reason == reason and x.length == len(want)
    assert x.response_ids.dtype == np.int32 and x.response_logprobs.dtype == np.float32
    np.testing.assert_array_equal(x.prompt_ids, prompts[x.prompt_index])
  assert res.stats.tokens_generated == sum(x.length for x in res.samples)


@pytest.mark.parametrize("knobs", KNOBS)
@pytest.mark.parametrize("mode", driver.MODES)
def test_samples_are_complete_and_ordered(mode, knobs):
  prompts = _long_tailed_prompts(13)
  budgets = [40, 3, 25] * 4 + [40]
  res = driver.run(FakeEngine(4, 8), None, prompts, n=3, max_new_tokens=budgets,
                   eos_ids=(_STOP,), mode=mode, **KNOBS[knobs])  # fmt: skip
  _check_samples(res, prompts, 3, budgets)


@pytest.mark.parametrize("slots", [1, 3, 8, 64])
@pytest.mark.parametrize("knobs", KNOBS)
def test_samples_do_not_depend_on_slots_or_knobs(slots, knobs):
  prompts = _long_tailed_prompts(9, seed=2)
  budgets = [60, 1, 17] * 3  # budget 1: the prefill's token is the whole response
  res = driver.run(FakeEngine(slots, 5), None, prompts, n=5, max_new_tokens=budgets,
                   eos_ids=(_STOP,), **{"refill_fraction": 0.3, **KNOBS[knobs]})  # fmt: skip
  _check_samples(res, prompts, 5, budgets)


@pytest.mark.parametrize("knobs", ["new", "reference"])
def test_per_request_budgets(knobs):
  prompts = _long_tailed_prompts(7, seed=8)
  rng = np.random.default_rng(0)
  budgets = rng.integers(1, 50, size=(7, 4)).tolist()
  res = driver.run(FakeEngine(5, 4), None, prompts, n=4, max_new_tokens=budgets,
                   eos_ids=(_STOP,), **KNOBS[knobs])  # fmt: skip
  _check_samples(res, prompts, 4, budgets)
  with pytest.raises(ValueError, match="n=3"):
    driver.run(FakeEngine(5, 4), None, prompts, n=3, max_new_tokens=budgets)


def test_reference_continuous_batching_never_idles_while_requests_wait():
  prompts = _long_tailed_prompts(40, seed=1) + [[1, 4]]  # [1, ...] stops on its first token
  budgets = [200, 1, 200, 200] * 10 + [200]
  kwargs = dict(n=2, max_new_tokens=budgets, eos_ids=(_STOP,), **driver.REFERENCE)
  cont = driver.run(FakeEngine(8, 16), None, prompts, mode="continuous", **kwargs)
  static = driver.run(FakeEngine(8, 16), None, prompts, mode="static", **kwargs)
  assert cont.stats.idle_slot_steps_while_waiting == 0
  assert static.stats.idle_slot_steps_while_waiting > 0  # the check can fail
  assert cont.stats.slot_utilisation > static.stats.slot_utilisation
  assert cont.stats.num_decode_steps < static.stats.num_decode_steps
  for a, b in zip(cont.samples, static.samples, strict=True):
    np.testing.assert_array_equal(a.response_ids, b.response_ids)


@pytest.mark.parametrize("slots", [4, 7, 64])
def test_one_prefill_per_prompt(slots):
  # n = 5 samples on 4 or 7 slots: a prompt's samples spread over several fills.
  prompts = _long_tailed_prompts(11, seed=3)
  engine = FakeEngine(slots, 4)
  res = driver.run(engine, None, prompts, n=5, max_new_tokens=30, eos_ids=(_STOP,))
  rows = [p for call in engine.prefills for p in call]
  assert sorted(rows) == list(range(11))  # every prompt in exactly one prefill row
  assert res.stats.num_prefill_calls == len(engine.prefills) <= 11
  if slots == 64:
    assert engine.prefills == [list(range(11))]  # all 55 requests in one fill
  assert res.stats.prefill_tokens == sum(map(len, prompts)) and res.stats.prefill_rows == 11
  ref_engine = FakeEngine(slots, 4)
  ref = driver.run(ref_engine, None, prompts, n=5, max_new_tokens=30, eos_ids=(_STOP,),
                   **driver.REFERENCE)  # fmt: skip
  assert sorted(p for call in ref_engine.prefills for p in call) == sorted(list(range(11)) * 5)
  assert ref.stats.prefill_tokens == 5 * sum(map(len, prompts)) and ref.stats.prefill_rows == 55


def test_refill_in_batches():
  prompts = _long_tailed_prompts(30, seed=4)
  kwargs = dict(n=2, max_new_tokens=100, eos_ids=(_STOP,))
  engine = FakeEngine(8, 16)
  res = driver.run(engine, None, prompts, refill_fraction=0.5, **kwargs)
  # 4 of 8 slots while >= 4 requests wait, then as many as wait, then run to the end (9).
  assert engine.min_frees[0] == 4 and set(engine.min_frees) <= {1, 2, 3, 4, 9}
  assert engine.min_frees[-1] == 9
  each = driver.run(FakeEngine(8, 16), None, prompts, refill_fraction=0.0, **kwargs)
  assert res.stats.num_generate_calls < each.stats.num_generate_calls
  assert [x.response_ids.tolist() for x in res.samples] == [
    x.response_ids.tolist() for x in each.samples
  ]


def test_overlap_reads_a_call_only_after_dispatching_the_next(monkeypatch):
  """Call i's tokens are read after call i+1 is dispatched; its `active` flags before."""
  events = []
  engine = FakeEngine(4, 3)
  generate, fetch = engine.generate, batching.distributed.fetch

  def logged_generate(*args, **kwargs):
    state, out = generate(*args, **kwargs)
    events.append(("dispatch", out))
    return state, out

  def logged_fetch(tree):
    leaves = tree if isinstance(tree, tuple) else (tree,)
    for _, out in [e for e in events if e[0] == "dispatch"]:
      if any(x is out.tokens for x in leaves):
        events.append(("tokens", out))
      if any(x is out.active for x in leaves):
        events.append(("active", out))
    return fetch(tree)

  monkeypatch.setattr(engine, "generate", logged_generate)
  monkeypatch.setattr(batching.distributed, "fetch", logged_fetch)
  prompts = _long_tailed_prompts(6, seed=5)
  res = driver.run(engine, None, prompts, n=2, max_new_tokens=20, eos_ids=(_STOP,))
  _check_samples(res, prompts, 2, [20] * 6)
  calls = [out for kind, out in events if kind == "dispatch"]
  assert len(calls) > 3
  position = {(kind, id(out)): i for i, (kind, out) in enumerate(events)}
  for i, out in enumerate(calls):
    assert position[("active", id(out))] > position[("dispatch", id(out))]
    if i + 1 < len(calls):
      assert position[("tokens", id(out))] > position[("dispatch", id(calls[i + 1]))]
      assert position[("active", id(out))] < position[("dispatch", id(calls[i + 1]))]


def test_page_pool_limits_concurrency():
  # 12 pages of 4 tokens; a request reserves ceil((len + 20) / 4) = 6 or 7: one or two at once.
  prompts = _long_tailed_prompts(5, seed=6)
  engine = FakeEngine(4, 4, num_pages=14, page_size=4)
  res = driver.run(engine, None, prompts, n=3, max_new_tokens=20, eos_ids=(_STOP,))
  _check_samples(res, prompts, 3, [20] * 5)
  with pytest.raises(ValueError, match="too few KV pages"):
    driver.run(FakeEngine(4, 4, num_pages=3, page_size=4), None, prompts, max_new_tokens=20)


def test_first_token_can_finish_a_request():
  # Target length 1 => the prefill's token is the stop token; budget 1 => 'length'.
  prompts = [[1, 5], [3, 7], [1, 9]]
  for knobs in KNOBS.values():
    res = driver.run(FakeEngine(2, 4), None, prompts, n=1, max_new_tokens=[5, 1, 5],
                     stop_ids=(_STOP,), **knobs)  # fmt: skip
    assert [x.finish_reason for x in res.samples] == ["stop", "length", "stop"]
    assert [x.length for x in res.samples] == [1, 1, 1]


def test_stats_split_wall_time():
  prompts = _long_tailed_prompts(6, seed=7)
  st = driver.run(FakeEngine(4, 4), None, prompts, n=2, max_new_tokens=30).stats
  assert st.wall_time_s > 0 and 0 <= st.device_time_s <= st.wall_time_s
  assert st.host_time_s == pytest.approx(st.wall_time_s - st.device_time_s)
  assert 0 <= st.device_busy <= 1


def test_argument_validation():
  with pytest.raises(ValueError, match="mode"):
    driver.run(FakeEngine(2, 4), None, [[1]], max_new_tokens=3, mode="dynamic")
  with pytest.raises(ValueError, match="max_new_tokens"):
    driver.run(FakeEngine(2, 4), None, [[1], [2]], max_new_tokens=[3])
  with pytest.raises(ValueError, match="positive"):
    driver.run(FakeEngine(2, 4), None, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="refill_fraction"):
    driver.run(FakeEngine(2, 4), None, [[1]], max_new_tokens=3, refill_fraction=1.5)


# ---------------------------------------------------------------- the real engine, tiny model


@pytest.fixture(scope="module")
def tiny_model():
  from fipo_jax import models  # noqa: PLC0415 -- the fake-engine tests above need no model

  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
  return models.init_model(cfg, seed=3)


def _engine(model, **kwargs):
  from fipo_jax.sampling import engine as engine_lib  # noqa: PLC0415

  cfg = engine_lib.EngineConfig(max_prompt_len=16, max_new_tokens=24, steps_per_call=4,
                                **{"num_slots": 4, **kwargs})  # fmt: skip
  return engine_lib.Engine.from_model(model, cfg)


@pytest.mark.slow  # four engines to compile (~1 min on 2 cores)
def test_real_engine_new_driver_equals_reference(tiny_model):
  """Paged engine + new driver == dense engine + reference knobs: tokens and log-probs, with
  temperature sampling, n = 3, budgets varied per request (1..24), 4 and 3 slots, and a page
  pool too small for every slot at once (inserts then go one at a time)."""
  from fipo_jax.sampling import params as params_lib  # noqa: PLC0415

  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 64, size=n).tolist() for n in (5, 16, 2, 9, 12)]
  budgets = rng.integers(1, 25, size=(5, 3)).tolist()
  kw = dict(n=3, max_new_tokens=budgets, sampling=params_lib.Sampling(temperature=0.8), seed=7,
            eos_ids=(5,))  # fmt: skip
  ref = driver.run(*_engine(tiny_model, kv_layout="dense"), prompts, **kw, **driver.REFERENCE)
  runs = {
    "paged": driver.run(*_engine(tiny_model, page_size=8), prompts, **kw),
    "3 slots": driver.run(*_engine(tiny_model, num_slots=3, page_size=8), prompts, **kw),
    "few pages": driver.run(*_engine(tiny_model, page_size=8, num_pages=9), prompts, **kw),
  }
  assert [(x.prompt_index, x.sample_index) for x in ref.samples] == [
    (p, s) for p in range(5) for s in range(3)
  ]
  assert any(x.finish_reason == "stop" for x in ref.samples)  # eos 5 is reachable
  for name, res in runs.items():
    assert res.stats.prefill_rows == 5, name
    for a, b in zip(res.samples, ref.samples, strict=True):
      assert a.response_ids.tolist() == b.response_ids.tolist(), (name, a.prompt_index)
      np.testing.assert_allclose(a.response_logprobs, b.response_logprobs, rtol=0, atol=1e-5)
      assert a.finish_reason == b.finish_reason
  assert ref.stats.prefill_rows == 15
