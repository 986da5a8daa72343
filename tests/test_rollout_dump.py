"""rl/rollout_dump.py: the per-step JSONL from padded and from packed mini-batches.

Rollouts of known lengths go through the real layouts (packing.pack_rollouts, padded and packed);
the influence dumps hold a value that names (update, row, position), so every JSON list must
come back to its own response, update and token, under the row cap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fipo_jax.rl import packing, rollout_dump, scoring, steps

P, T, MINI, NUM_MINI, EPOCHS = 6, 7, 4, 3, 2


class _Tok:
  """Token id i is the letter chr(97 + i % 26)."""

  def decode(self, ids):
    return "".join(chr(97 + int(i) % 26) for i in ids)


def _rollouts(rng) -> tuple[scoring.Rollouts, np.ndarray]:
  b = MINI * NUM_MINI
  lengths = rng.integers(1, T + 1, size=b)
  resp = [rng.integers(0, 26, size=n).astype(np.int32) for n in lengths]
  r = scoring.Rollouts(
    prompt_ids=[
      rng.integers(0, 26, size=rng.integers(2, P + 1)).astype(np.int32) for _ in range(b)
    ],
    response_ids=resp,
    response_logprobs=[np.full(len(x), -1.0, np.float32) for x in resp],
    finish_reasons=["stop"] * b,
    group_ids=np.arange(b) // 2,
    scores=np.where(np.arange(b) % 2 == 0, 1.0, -1.0).astype(np.float32),
    verifier_scores=np.zeros(b, np.float32),
    acc=np.arange(b) % 2 == 0,
    preds=[""] * b,
    overlong=np.zeros(b, bool),
  )
  return r, np.where(np.arange(b) % 2 == 0, 0.5, -0.5).astype(np.float32)


def _value(u: int, row, t):
  """What the fake influence step gives on update u for the mini-batch's row `row`, token t."""
  return 100.0 * u + row + t / 10.0


def _batches(r, adv, layout: packing.Layout):
  """The mini-batches on `layout` and a fake influence step whose value names its token."""
  packed = packing.pack_rollouts(
    r.prompt_ids,
    r.response_ids,
    r.response_logprobs,
    adv,
    mini=MINI,
    max_prompt_length=P,
    max_response_length=T,
    layout=layout,
    pad_id=0,
  )
  batches = [steps.Batch(**a) for a in packed.batches]
  t = np.arange(T)

  def dump(u, b):
    row = np.asarray(b.seq_index)[..., None]
    val = np.where((np.asarray(b.response_mask) > 0) & (row >= 0), _value(u, row, t), 0.0)
    return dict.fromkeys(steps.INFLUENCE_KEYS, val)

  return batches, dump


def _padded(r, adv):
  return _batches(r, adv, packing.Layout(P + T, 2, num_shards=2, padded=True))


def _packed(r, adv):
  return _batches(r, adv, packing.Layout(P + T + 3, None, num_shards=2))


@pytest.mark.parametrize("layout", [_padded, _packed], ids=["padded", "packed"])
def test_dump_rows_come_back_to_their_response_update_and_token(tmp_path, layout):
  r, adv = _rollouts(np.random.default_rng(0))
  batches, dump = layout(r, adv)
  before = [dump(e * NUM_MINI + j, b) for e in range(EPOCHS) for j, b in enumerate(batches)]
  after = [dump(99, b) for b in batches]
  cap = MINI * NUM_MINI - 3
  path = rollout_dump.write_step(
    str(tmp_path),
    7,
    before=before,
    after=after,
    batches=batches,
    rollouts=r,
    advantages=adv,
    tokenizer=_Tok(),
    max_rows=cap,
    loss_mode="fipo",
  )
  rows = [json.loads(x) for x in open(path)]
  assert rows == rollout_dump.read_step(str(tmp_path), 7)
  assert rollout_dump.dumped_steps(str(tmp_path)) == [7]
  # ceil(9 / 3) = 3 rows of each mini-batch: every update is seen
  assert [x["index"] for x in rows] == [0, 1, 2, 4, 5, 6, 8, 9, 10]
  assert rollout_dump.dumped_rows(4, 32, 64) == [
    *range(16),
    *range(32, 48),
    *range(64, 80),
    *range(96, 112),
  ]
  assert rollout_dump.dumped_rows(4, 8, 2) == [0, 8] and rollout_dump.dumped_rows(2, 3, 99) == [
    0,
    1,
    2,
    3,
    4,
    5,
  ]
  for x in rows:
    i = x["index"]
    j, m = divmod(i, MINI)
    n = len(r.response_ids[i])
    assert x["mini_batch"] == j and x["step"] == 7
    assert x["response"] == "".join(x["tokens"]) == _Tok().decode(r.response_ids[i])
    assert x["prompt"] == _Tok().decode(r.prompt_ids[i])
    assert x["score"] == r.scores[i] and x["acc"] == bool(r.acc[i])
    assert x["advantage"] == pytest.approx(adv[i])
    assert x["updates"] == [j + 1, NUM_MINI + j + 1]
    for key in ("log_ratio", "influence_weights", "raw_influence_weights"):
      want = [[_value(u - 1, m, t) for t in range(n)] for u in x["updates"]]
      np.testing.assert_allclose(x[key], want, atol=1e-6)
    np.testing.assert_allclose(x["log_ratio_after"], [_value(99, m, t) for t in range(n)])
  z = np.load(tmp_path / "influence" / "step_7.npz")
  assert z["influence_weights"].shape == (EPOCHS * NUM_MINI, MINI, T)
  assert z["response_ids"].shape == (NUM_MINI, MINI, T)


def test_dump_max_rows_is_validated():
  from fipo_jax import config as config_lib  # noqa: PLC0415
  from fipo_jax import recipes  # noqa: PLC0415

  c = recipes.base()
  c.dump_max_rows = 0
  with pytest.raises(config_lib.ConfigError, match="dump_max_rows"):
    config_lib.validate(c, check_paths=False)
