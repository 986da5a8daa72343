"""The host-side packer: every token placed once, rows within budget, index maps round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from fipo_jax.rl import packing


def _sequences(rng, m, p_max=12, t_max=20):
  prompts = [rng.integers(1, 50, rng.integers(1, p_max + 1)) for _ in range(m)]
  responses = [rng.integers(50, 99, rng.integers(0, t_max + 1)) for _ in range(m)]
  return prompts, responses


def test_bucket_rounds_up_to_powers_of_two_and_one_and_a_half_times_them():
  assert [packing.bucket(n) for n in (1, 2, 3, 5, 7, 9, 13, 17, 25)] == [
    1,
    2,
    3,
    6,
    8,
    12,
    16,
    24,
    32,
  ]
  assert packing.bucket(5, (4, 8)) == 8
  assert packing.bucket(9, (4, 8)) == 9  # past the largest bucket: unchanged


def test_first_fit_decreasing_places_every_item_once_within_capacity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 30, 57)
  bins = packing.first_fit_decreasing(lengths, 40)
  assert sorted(i for b in bins for i in b) == list(range(57))
  assert all(lengths[b].sum() <= 40 for b in bins)
  # First fit: no two bins could share one row (else the later one's first item would fit).
  loads = [int(lengths[b].sum()) for b in bins]
  assert all(a + b > 40 for i, a in enumerate(loads) for b in loads[i + 1 :])
  with pytest.raises(ValueError, match="exceeds the row budget"):
    packing.first_fit_decreasing([41], 40)


def _check_layout(plan, shape, prompts, responses, t_max):
  arrays = packing.pack_tokens(plan, shape, prompts, responses, response_len=t_max, pad_id=0)
  ids, seg, pos = arrays["input_ids"], arrays["segment_ids"], arrays["positions"]
  assert ids.shape == (shape.num_micro, shape.num_shards, shape.rows, shape.row_len)
  # Every real token is placed exactly once: the real slots hold exactly M sequences' tokens.
  assert int((seg > 0).sum()) == sum(
    len(p) + len(r) for p, r in zip(prompts, responses, strict=True)
  )
  for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
    j, d, row, o = plan.micro[i], plan.shard[i], plan.row[i], plan.offset[i]
    n = len(p) + len(r)
    assert o + n <= shape.row_len  # no row over budget
    np.testing.assert_array_equal(ids[j, d, row, o : o + n], np.concatenate([p, r]))
    np.testing.assert_array_equal(pos[j, d, row, o : o + n], np.arange(n))
    assert len(set(seg[j, d, row, o : o + n])) == 1 and seg[j, d, row, o] > 0
  # Segments of a row are numbered 1, 2, ... left to right with padding (0) only at the end.
  for row in seg.reshape(-1, shape.row_len):
    real = row[row > 0]
    assert (np.diff(real) >= 0).all() and (row[len(real) :] == 0).all()
    if len(real):
      assert set(real) == set(range(1, real.max() + 1))
  # The token index finds each response token's predecessor: gathering the next token of
  # every packed position at token_index gives back the responses.
  nxt = np.concatenate([ids[..., 1:], np.zeros_like(ids[..., :1])], axis=-1)
  flat = nxt.reshape(shape.num_micro, shape.num_shards, -1)
  got = np.take_along_axis(flat[:, :, None, :], arrays["token_index"], axis=-1)
  resp_mask = np.zeros((len(responses), t_max), bool)
  padded = np.zeros((len(responses), t_max), np.int32)
  for i, r in enumerate(responses):
    resp_mask[i, : len(r)] = True
    padded[i, : len(r)] = r
  back = packing.from_slots(plan, got)
  np.testing.assert_array_equal(np.where(resp_mask, back, 0), padded)
  return arrays


@pytest.mark.parametrize("num_shards", [1, 4])
def test_dynamic_plan_packs_by_budget_and_round_trips(num_shards):
  rng = np.random.default_rng(1)
  prompts, responses = _sequences(rng, 40)
  lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
  plan = packing.plan_mini_batch(lengths, num_shards=num_shards, row_len=48)
  shape = packing.layout_shape([plan], dynamic=True)
  assert shape.rows == 1 and shape.num_micro == packing.bucket(plan.num_micro)
  _check_layout(plan, shape, prompts, responses, 20)
  # Round trip of the response layout, empty slots filled.
  x = rng.normal(size=(40, 20)).astype(np.float32)
  slots = packing.to_slots(plan, shape, x, fill=np.nan)
  assert slots.shape == (shape.num_micro, num_shards, shape.slots, 20)
  np.testing.assert_array_equal(packing.from_slots(plan, slots), x)
  assert np.isnan(slots).all(axis=-1).sum() == slots[..., 0].size - 40
  # Fewer rows than padded layout would need, and the useful fraction counts the padding.
  assert 0 < packing.useful_fraction(plan, shape) <= 1


def test_fixed_plan_keeps_the_padded_micro_batches_row_for_row():
  rng = np.random.default_rng(2)
  m, nm, nd = 24, 3, 2
  prompts, responses = _sequences(rng, m)
  lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
  plan = packing.plan_mini_batch(lengths, num_shards=nd, row_len=40, num_micro=nm)
  shape = packing.layout_shape([plan], dynamic=False)
  assert shape.num_micro == nm and shape.slots == m // nm // nd
  # verl's split: micro-batch j = rows j, j + nm, ...; its row i on shard i // 4.
  for i in range(m):
    j, k = i % nm, i // nm
    assert (plan.micro[i], plan.shard[i], plan.slot[i]) == (j, k // 4, k % 4)
  _check_layout(plan, shape, prompts, responses, 20)


def test_layout_shape_is_shared_by_mini_batches_and_local_shards_are_a_slice():
  rng = np.random.default_rng(3)
  plans, seqs = [], []
  for m in (16, 16):
    prompts, responses = _sequences(rng, m)
    seqs.append((prompts, responses))
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    plans.append(packing.plan_mini_batch(lengths, num_shards=4, row_len=40))
  shape = packing.layout_shape(plans, dynamic=True)
  assert shape.num_micro >= max(p.num_micro for p in plans)
  for plan, (prompts, responses) in zip(plans, seqs, strict=True):
    full = packing.pack_tokens(plan, shape, prompts, responses, response_len=20, pad_id=0)
    part = packing.pack_tokens(
      plan, shape, prompts, responses, response_len=20, pad_id=0, shards=slice(2, 4)
    )
    for key, value in full.items():
      np.testing.assert_array_equal(part[key], value[:, 2:4])


def test_a_sequence_longer_than_the_row_budget_is_refused():
  with pytest.raises(ValueError, match="row budget"):
    packing.plan_mini_batch([10, 50], num_shards=1, row_len=40)
  with pytest.raises(ValueError, match="equal micro-batches"):
    packing.plan_mini_batch([10] * 5, num_shards=1, row_len=40, num_micro=2)
