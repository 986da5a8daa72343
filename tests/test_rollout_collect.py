"""rollout.collect: sampling -> scoring -> dynamic sampling -> advantages -> mini-batches.

Runs against the driver tests' fake engine (deterministic tokens, no model) on the suite's
8-device mesh; the answers are decoded so that the samples of one prompt disagree.
"""

import types

import numpy as np
import padded_layout as pl
import pytest
from test_sampling_driver import FakeEngine, _log_prob, _token

from fipo_jax import sharding
from fipo_jax.rl import rewards, rollout, scoring, steps
from fipo_jax.sampling import params as params_lib

N, GEN, TRAIN, MINI, T, P = 4, 3, 4, 2, 8, 6  # MINI prompts x N = 8 rows: one per device


class _Tokenizer:
  """Decodes a response to 'Answer: <parity of its second token>' (odd: right, ground truth 1)."""

  def __init__(self, always: str | None = None):
    self.always = always

  def batch_decode(self, seqs, skip_special_tokens):
    assert skip_special_tokens
    return [f"Answer: {self.always or int(s[1]) % 2}" for s in seqs]


class _Data:
  def __init__(self):
    self.next = 0

  def next_batch(self, size):
    # prompt[0] = 5: every response is 5 tokens, the last one the stop token 0.
    rows = [
      {"prompt_ids": [5, 1 + (self.next + i) % 7, 2], "ground_truth": "1"} for i in range(size)
    ]
    self.next += size
    return rows


def _run(tokenizer, max_rounds=3):
  mesh = sharding.make_mesh(1, -1, 1)
  rc = types.SimpleNamespace(
    seed=0,
    rl=types.SimpleNamespace(
      n=N,
      gen_batch_size=GEN,
      train_batch_size=TRAIN,
      ppo_mini_batch_size=MINI,
      max_response_length=T,
      norm_adv_by_std_in_grpo=True,
      filter_groups_enable=True,
      max_num_gen_batches=max_rounds,
      filter_groups_metric="acc",
      use_remove_padding=False,  # the padded layout (packed rows: tests/test_packing_step.py)
    ),
    sampling=types.SimpleNamespace(refill_fraction=0.125),
    data=types.SimpleNamespace(max_prompt_length=P),
  )
  engine = FakeEngine(num_slots=5, steps_per_call=3)
  engine.load_params = lambda p: p
  sampler = scoring.Sampler(
    engine=engine,
    method=params_lib.Sampling(temperature=1.0),
    eos_ids=[0],
    tokenizer=tokenizer,
    reward_cfg=rewards.RewardConfig(max_response_length=T, overlong_buffer_enable=False),
  )
  upd = steps.UpdateConfig(num_micro_batches=1)
  out = rollout.collect(rc, sampler, _Data(), None, step=0, mesh=mesh, update_cfg=upd, pad_id=9)
  return out, mesh


def test_collect_returns_placed_mini_batches_of_kept_groups_with_their_advantages():
  (batches, metrics), mesh = _run(_Tokenizer())
  assert len(batches) == TRAIN // MINI
  # The kept groups are mixed: within each group, odd second tokens are right (+1), even wrong.
  seconds = []
  for b in batches:
    w = mesh.size  # one row per sequence, [NM, W, E, ...]
    assert b.input_ids.shape == (1, w, MINI * N // w, P + T)
    assert b.advantages.shape == (1, w, MINI * N // w, T)
    assert b.input_ids.sharding.mesh == mesh
    ids, mask, adv, lp = (
      pl.rows_of(b, x) for x in (b.input_ids, b.response_mask, b.advantages, b.old_log_probs)
    )
    np.testing.assert_array_equal(mask.sum(1), 5)  # 4 tokens and the stop token
    np.testing.assert_array_equal(ids[:, P + 4], 0)
    np.testing.assert_array_equal(ids[:, : P - 3], 9)  # left-padded prompts
    np.testing.assert_allclose(lp[:, :5], np.tile([_log_prob(t) for t in range(5)], (MINI * N, 1)))
    right = ids[:, P + 1] % 2 == 1
    seconds.append(right)
    for g in range(MINI):  # GRPO: (score - group mean) / (group std + eps), on every token
      rows = slice(g * N, (g + 1) * N)
      score = np.where(right[rows], 1.0, -1.0)
      want = (score - score.mean()) / (score.std(ddof=1) + 1e-6)
      np.testing.assert_allclose(adv[rows], want[:, None] * mask[rows], rtol=1e-5, atol=1e-6)
      assert 0 < right[rows].sum() < N
  # The rows are the fake engine's samples, in order: prompt g's sample s.
  first = pl.rows_of(batches[0], batches[0].input_ids)
  assert first[1, P + 1] == _token(first[1, P - 3 : P], 1, 1)
  assert metrics["train/num_prompts_kept"] == TRAIN
  assert metrics["train/kept_acc_mean"] == pytest.approx(np.concatenate(seconds).mean())
  assert metrics["critic/advantages/mean"] == pytest.approx(0.0, abs=1e-6)  # per-group centred
  assert metrics["reward/errors"] == 0 and metrics["response_length/mean"] == 5


def test_collect_with_no_mixed_group_returns_no_batches():
  (batches, metrics), _ = _run(_Tokenizer(always="1"), max_rounds=2)
  assert batches == []
  assert metrics["train/num_gen_batches"] == 2 and "timing_s/gen" in metrics


def test_sampler_perf_pools_the_steps_rounds():
  """perf/sampler_device_busy and slot utilisation are ratios of sums over the rounds."""
  from fipo_jax.sampling.batching import SamplerStats

  rounds = [
    SamplerStats(wall_time_s=2.0, device_time_s=1.8, active_slot_steps=30, total_slot_steps=40),
    SamplerStats(wall_time_s=1.0, device_time_s=0.3, active_slot_steps=10, total_slot_steps=40),
  ]
  got = rollout._sampler_perf(rounds)
  assert got["perf/sampler_device_busy"] == pytest.approx(2.1 / 3.0)
  assert got["perf/sampler_slot_utilisation"] == pytest.approx(40 / 80)
  assert rollout._sampler_perf([]) == {"perf/sampler_device_busy": 0.0,
                                       "perf/sampler_slot_utilisation": 0.0}
