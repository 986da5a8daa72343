"""The continuous-batching driver against a fake, deterministic engine (no model)."""

import dataclasses

import numpy as np
import pytest

from fipo_jax.sampling import driver

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
  tokens: np.ndarray
  log_probs: np.ndarray
  reqs: list


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
  """Implements the Engine API the driver uses, with the engine's early-return semantics."""

  def __init__(self, num_slots, steps_per_call):
    self.max_concurrent_decodes = num_slots
    self.steps = steps_per_call

  def init_decode_state(self):
    b = self.max_concurrent_decodes
    return _State([None] * b, np.zeros(b, int), np.zeros(b, int), np.zeros(b, bool))

  def prefill(self, params, prompts, request_ids, *, seed, sampling):
    assert 0 < len(prompts) <= self.max_concurrent_decodes
    reqs = [(np.asarray(p), s) for p, (_, s) in zip(prompts, request_ids, strict=True)]
    return _Prefix(
      np.array([_token(p, s, 0) for p, s in reqs]), np.array([_log_prob(0)] * len(reqs)), reqs
    )

  def insert(self, prefix, state, slots, max_new_tokens, stop_ids):
    for i, slot in enumerate(slots):
      assert not state.active[slot], "inserted into a busy slot"
      state.req[slot] = prefix.reqs[i]
      state.num_generated[slot] = 1
      state.max_new[slot] = max_new_tokens[i]
      state.active[slot] = prefix.tokens[i] not in stop_ids and max_new_tokens[i] > 1
    return state

  def generate(self, params, state, *, sampling, stop_ids, min_free):
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


@pytest.mark.parametrize("mode", driver.MODES)
def test_samples_are_complete_and_ordered(mode):
  prompts = _long_tailed_prompts(13)
  budgets = [40] * 13
  res = driver.run(
    FakeEngine(4, 8), None, prompts, n=3, max_new_tokens=budgets, eos_ids=(_STOP,), mode=mode
  )
  assert [(x.prompt_index, x.sample_index) for x in res.samples] == [
    (p, s) for p in range(13) for s in range(3)
  ]
  for x in res.samples:
    want, reason = _expected(prompts[x.prompt_index], x.sample_index, 40)
    np.testing.assert_array_equal(x.response_ids, want)
    np.testing.assert_allclose(x.response_logprobs, [_log_prob(t) for t in range(len(want))])
    assert x.finish_reason == reason and x.length == len(want)
    assert x.response_ids.dtype == np.int32 and x.response_logprobs.dtype == np.float32
    np.testing.assert_array_equal(x.prompt_ids, prompts[x.prompt_index])
  assert res.stats.tokens_generated == sum(x.length for x in res.samples)


def test_continuous_batching_never_idles_while_requests_wait():
  prompts = _long_tailed_prompts(40, seed=1)
  kwargs = dict(n=2, max_new_tokens=200, eos_ids=(_STOP,))
  cont = driver.run(FakeEngine(8, 16), None, prompts, mode="continuous", **kwargs)
  static = driver.run(FakeEngine(8, 16), None, prompts, mode="static", **kwargs)
  assert cont.stats.idle_slot_steps_while_waiting == 0
  assert static.stats.idle_slot_steps_while_waiting > 0  # the check can fail
  assert cont.stats.slot_utilisation > static.stats.slot_utilisation
  assert cont.stats.num_decode_steps < static.stats.num_decode_steps
  for a, b in zip(cont.samples, static.samples, strict=True):
    np.testing.assert_array_equal(a.response_ids, b.response_ids)


def test_first_token_can_finish_a_request():
  # Target length 1 => the prefill's token is the stop token; budget 1 => 'length'.
  prompts = [[1, 5], [3, 7], [1, 9]]
  res = driver.run(
    FakeEngine(2, 4), None, prompts, n=1, max_new_tokens=[5, 1, 5], stop_ids=(_STOP,)
  )
  assert [x.finish_reason for x in res.samples] == ["stop", "length", "stop"]
  assert [x.length for x in res.samples] == [1, 1, 1]


def test_argument_validation():
  with pytest.raises(ValueError, match="mode"):
    driver.run(FakeEngine(2, 4), None, [[1]], max_new_tokens=3, mode="dynamic")
  with pytest.raises(ValueError, match="max_new_tokens"):
    driver.run(FakeEngine(2, 4), None, [[1], [2]], max_new_tokens=[3])
  with pytest.raises(ValueError, match="positive"):
    driver.run(FakeEngine(2, 4), None, [[1]], max_new_tokens=0)
