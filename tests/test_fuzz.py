"""Hypothesis fuzzing of the policy losses and the math reward: never NaN, never an exception.

Losses: random [B, T] shapes, masks (all-masked rows and all-masked batches included), log-probs
anywhere in [-1e4, 1e4] and advantages in [-1e3, 1e3], for the three losses, every aggregation
mode and the three Future-KL weight-clip modes (symmetric, high-only, none = min(exp F, 10)).
Loss, gradient and every metric must be finite.

Reward: hostile responses/ground truths (deep nesting, long strings, unicode, control chars,
non-strings) must give a well-formed dict, never raise.
"""

from __future__ import annotations

import functools

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fipo_jax.algo import aggregation, losses
from fipo_jax.algo import rewards as scores
from fipo_jax.rl import rewards

CLIP_MODES = {"symmetric": (0.2, False), "high_only": (0.2, True), "none": (0.0, False)}
_SETTINGS = hypothesis.settings(max_examples=40, deadline=None,
                                suppress_health_check=[hypothesis.HealthCheck.too_slow])


@functools.cache
def _loss_and_grad(mode: str, agg: str, clip: str):
  """(loss, metrics), grad of one configuration, jitted as the trainer runs it. Shapes vary
  per example, so most examples compile: one program (~0.9 CPU-s for fipo, ~0.15 for dapo)
  costs about half what running it op by op does, which compiles each op for the new shape."""
  ratio, high_only = CLIP_MODES[clip]
  cfg = losses.PolicyLossConfig(loss_agg_mode=agg, future_kl_clip_ratio=ratio,
                                future_kl_clip_high_only=high_only, chunk_size=4, decay_rate=4.0)

  def f(lp, old, adv, mask):
    return losses.compute_policy_loss(mode, lp, old, adv, mask, cfg)

  return jax.jit(jax.value_and_grad(f, has_aux=True))


@st.composite
def loss_inputs(draw):
  b = draw(st.integers(1, 4))
  t = draw(st.integers(1, 12))
  lp_values = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([-1e4, 1e4, 0.0]))
  lp = draw(hnp.arrays(np.float32, (b, t), elements=lp_values))
  old = draw(hnp.arrays(np.float32, (b, t), elements=lp_values))
  adv_row = draw(hnp.arrays(np.float32, (b, 1), elements=st.floats(-1e3, 1e3, width=32)))
  mask = draw(hnp.arrays(np.float32, (b, t), elements=st.sampled_from([0.0, 1.0])))
  if draw(st.booleans()):  # an all-masked row
    mask[draw(st.integers(0, b - 1))] = 0.0
  return lp, old, adv_row * mask, mask


@pytest.mark.slow  # a compile per new shape: ~20 CPU-s on 2 shared cores
@hypothesis.settings(_SETTINGS, max_examples=40)
@hypothesis.given(data=loss_inputs(), agg=st.sampled_from(aggregation.AGG_MODES),
                  mode=st.sampled_from(["fipo", "dapo", "grpo"]),
                  clip=st.sampled_from(sorted(CLIP_MODES)))
def test_loss_is_finite_for_finite_inputs(mode, clip, data, agg):
  lp, old, adv, mask = data
  (loss, metrics), grad = _loss_and_grad(mode, agg, clip)(lp, old, adv, mask)
  assert np.isfinite(float(loss)), (mode, clip, agg)
  assert np.all(np.isfinite(np.asarray(grad))), (mode, clip, agg)
  for name, value in metrics.items():
    assert np.all(np.isfinite(np.asarray(value))), name


def _nested(depth: int) -> str:
  return "Answer: " + "\\boxed{" * depth + "1" + "}" * depth


_hostile_text = st.one_of(
  st.text(),  # any unicode, incl. control chars, surrogates excluded by hypothesis' codec
  st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F)),  # control chars
  st.text(alphabet="$\\{}()^_=,.:Answer \n\t", max_size=400),  # the normaliser's syntax
  st.integers(0, 20_000).map(_nested),
  st.integers(1, 200_000).map(lambda n: "Answer: " + "$" * n),
  st.integers(1, 200_000).map(lambda n: "\\text{" * (n // 6) + "Answer: 1"),
  st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(1, 20_000)),
)
_non_str = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=20),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(), st.integers()))


@_SETTINGS
@hypothesis.given(response=st.one_of(_hostile_text, _non_str),
                  ground_truth=st.one_of(_hostile_text, _non_str))
def test_reward_never_raises(response, ground_truth):
  out = scores.math_dapo_score(response, ground_truth)
  assert out["score"] in (1.0, -1.0)
  assert out["acc"] is (out["score"] == 1.0)
  assert isinstance(out["pred"], str)


@_SETTINGS
@hypothesis.given(texts=st.lists(st.one_of(_hostile_text, _non_str), min_size=1, max_size=4),
                  gt=st.one_of(_hostile_text, _non_str))
def test_score_responses_never_raises(texts, gt):
  cfg = rewards.RewardConfig(max_response_length=16, overlong_buffer_len=4)
  s = rewards.score_responses(texts, [len(str(t)) % 20 for t in texts], [gt] * len(texts), cfg)
  assert np.all(np.isfinite(s.scores)) and np.all(np.isfinite(s.verifier_scores))
  assert len(s.preds) == len(texts) == len(s.acc) == len(s.overlong)
  assert 0 <= s.errors <= len(texts)
