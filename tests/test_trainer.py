"""Trainer pieces: dynamic sampling, batch packing, overlong shaping, micro-batch arithmetic,
and the 32B recipe's train step built abstractly (no allocation)."""

import functools
import types

import jax
import numpy as np
import pytest

from configs import fipo_qwen2_5_32b, tiny_cpu
from fipo_jax import aot_batches, models
from fipo_jax import config as config_lib
from fipo_jax import policy as policy_lib
from fipo_jax.rl import layouts, optimizer, packing, scoring, steps
from fipo_jax.rl import rewards as rewards_lib
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.rl import setup as setup_lib


def _round(accs_per_group, n, offset):
  """Rollouts of len(accs_per_group) prompts x n responses with the given acc per response."""
  acc = np.asarray(accs_per_group, bool).reshape(-1)
  g = len(accs_per_group)
  groups = np.repeat(np.arange(g) + offset, n)
  r = len(acc)
  return scoring.Rollouts(
    prompt_ids=[np.array([1, 2], np.int32)] * r,
    response_ids=[np.array([3, 4, 5], np.int32)] * r,
    response_logprobs=[np.zeros(3, np.float32)] * r,
    finish_reasons=["stop"] * r, group_ids=groups,
    scores=np.where(acc, 1.0, -1.0).astype(np.float32),
    verifier_scores=np.where(acc, 1.0, -1.0).astype(np.float32), acc=acc, preds=[""] * r,
    overlong=np.zeros(r, bool),
  )


def test_dynamic_sampling_drops_all_same_groups_refills_and_truncates():
  n = 4
  mixed, right, wrong = [1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]
  rounds = [
    [mixed, right, wrong, mixed],  # 2 kept
    [wrong, wrong, right, right],  # 0 kept
    [mixed, mixed, mixed, right],  # 3 kept -> 5 >= 3: stop, truncate to 3
    [mixed, mixed, mixed, mixed],  # never sampled
  ]
  calls = []

  def sample_round(i):
    calls.append(i)
    return _round(rounds[i], n, offset=100 * i)

  res = rollout_lib.collect_with_dynamic_sampling(
    sample_round, train_batch_size=3, n=n, filter_groups=True, max_num_gen_batches=10,
    min_prompts=1)
  assert calls == [0, 1, 2]
  assert res.num_gen_batches == 3
  assert res.num_prompts_kept == 3
  assert len(res.rollouts) == 3 * n
  # The kept groups are the first three mixed ones, whole and in order.
  assert list(dict.fromkeys(res.rollouts.group_ids.tolist())) == [0, 3, 200]
  for g in np.unique(res.rollouts.group_ids):
    accs = res.rollouts.acc[res.rollouts.group_ids == g]
    assert 0 < accs.sum() < n


def test_dynamic_sampling_gives_up_after_max_rounds_with_whole_mini_batches():
  n = 2
  res = rollout_lib.collect_with_dynamic_sampling(
    lambda i: _round([[1, 0], [1, 1], [0, 1]], n, offset=10 * i), train_batch_size=100, n=n,
    filter_groups=True, max_num_gen_batches=3, min_prompts=4)
  # 2 mixed groups per round x 3 rounds = 6 kept, truncated to a multiple of the mini-batch (4).
  assert res.num_gen_batches == 3
  assert res.num_prompts_kept == 4
  assert len(res.rollouts) == 8


def test_dynamic_sampling_without_filter_takes_everything():
  res = rollout_lib.collect_with_dynamic_sampling(
    lambda i: _round([[1, 1], [0, 0]], 2, offset=0), train_batch_size=2, n=2,
    filter_groups=False, max_num_gen_batches=1, min_prompts=1)
  assert res.num_prompts_kept == 2 and res.num_gen_batches == 1


def test_padded_layout_is_one_sequence_per_row():
  """Prompts left-padded to P = 4 and responses right-padded to T = 3 (truncated), one row each."""
  r = _round([[1, 0]], 2, offset=0)
  r.prompt_ids = [np.array([7, 8, 9], np.int32), np.array([5], np.int32)]
  r.response_ids = [np.array([1, 2], np.int32), np.array([3, 4, 6, 2], np.int32)]
  r.response_logprobs = [np.array([-1, -2], np.float32), np.array([-3, -4, -5, -6], np.float32)]
  packed = packing.pack_rollouts(
    r.prompt_ids, r.response_ids, r.response_logprobs, np.array([0.5, -0.5], np.float32), mini=2,
    max_prompt_length=4, max_response_length=3, pad_id=0,
    layout=packing.Layout(7, num_micro=1, num_shards=1, padded=True))
  out = {k: v[0, 0] for k, v in packed.batches[0].items()}  # micro-batch 0, shard 0
  np.testing.assert_array_equal(out["input_ids"], [[0, 7, 8, 9, 1, 2, 0], [0, 0, 0, 5, 3, 4, 6]])
  np.testing.assert_array_equal(out["segment_ids"], [[0, 1, 1, 1, 1, 1, 0],
                                                     [0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["positions"], [[0, 0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 1, 2, 3]])
  # Response token t of row e is predicted at flat position e * 7 + P - 1 + t.
  np.testing.assert_array_equal(out["token_index"], [[3, 4, 0], [10, 11, 12]])
  np.testing.assert_array_equal(out["response_mask"], [[1, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(out["advantages"], [[0.5, 0.5, 0], [-0.5, -0.5, -0.5]])
  np.testing.assert_allclose(out["old_log_probs"], [[-1, -2, 0], [-3, -4, -5]])
  np.testing.assert_array_equal(out["seq_index"], [0, 1])


def test_overlong_shaping_counts_tokens():
  cfg = rewards_lib.RewardConfig(max_response_length=20, overlong_buffer_enable=True,
                                 overlong_buffer_len=4, overlong_penalty_factor=1.0)
  texts = ["Answer: 7"] * 4
  s = rewards_lib.score_responses(texts, [16, 17, 18, 20], ["7"] * 4, cfg)
  # Expected length 20 - 4 = 16 tokens: no penalty at 16, then -1/4 per extra token.
  np.testing.assert_allclose(s.scores, [1.0, 0.75, 0.5, 0.0])
  np.testing.assert_array_equal(s.verifier_scores, [1.0] * 4)  # the penalty is not the verifier's
  assert s.acc.all() and s.errors == 0
  np.testing.assert_array_equal(s.overlong, [False, True, True, True])


def test_score_responses_counts_verifier_crashes_as_wrong():
  def boom(text, gt):
    raise RuntimeError("verifier exploded")

  cfg = rewards_lib.RewardConfig(max_response_length=8, overlong_buffer_enable=False)
  s = rewards_lib.score_responses(["x"], [1], ["1"], cfg, boom)
  assert s.scores.tolist() == [-1.0] and not s.acc.any() and s.errors == 1
  assert s.preds == ["[ERROR]"]


def _mesh_like(data, fsdp):
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": 1})


def test_32b_recipe_batch_arithmetic():
  rc = config_lib.validate(fipo_qwen2_5_32b.get_config(), check_paths=False)
  assert rc.rl.n == 16 and rc.rl.train_batch_size == 512 and rc.rl.ppo_mini_batch_size == 64
  assert rc.rl.num_mini_batches == 8  # 512 / 64 optimizer steps per rollout batch
  seq = rc.data.max_prompt_length + rc.rl.max_response_length
  assert seq == 22528 == rc.rl.ppo_max_token_len_per_device  # one sequence per device
  # v5p-128: 64 chips in one FSDP group -> 64 sequences per micro-batch, 16 micro-batches.
  upd = setup_lib.update_config(rc, _mesh_like(1, 64), seq)
  assert upd.num_micro_batches == 64 * 16 // 64
  assert upd.loss_mode == "fipo" and upd.policy_loss.future_kl_clip_high_only is True
  # 128 GPUs (the paper's 16 x 8): 8 micro-batches of 128 sequences.
  assert setup_lib.update_config(rc, _mesh_like(2, 64), seq).num_micro_batches == 8


def test_padded_micro_batches_split_strided():
  """verl's split: micro-batch j holds rows j, j + NM, ...; each shard a contiguous share."""
  packed = packing.pack_rollouts(
    [np.array([i], np.int32) for i in range(12)], [np.array([1], np.int32)] * 12,
    [np.zeros(1, np.float32)] * 12, np.zeros(12, np.float32), mini=12, max_prompt_length=1,
    max_response_length=2, pad_id=0, layout=packing.Layout(3, 3, num_shards=2, padded=True))
  index = packed.batches[0]["seq_index"]
  assert index.shape == (3, 2, 2)  # [NM, W, E]
  np.testing.assert_array_equal(index[0], [[0, 3], [6, 9]])  # rows 0, 3 | 6, 9
  np.testing.assert_array_equal(packed.batches[0]["input_ids"][1, :, :, 0], [[1, 4], [7, 10]])


@pytest.mark.slow
def test_32b_recipe_train_step_builds_abstractly():
  """The real train step of the 32B recipe, traced with eval_shape: shapes only, no memory."""
  rc = config_lib.validate(fipo_qwen2_5_32b.get_config(), check_paths=False)
  cfg = policy_lib.model_config(rc)
  assert cfg.num_layers == 64 and cfg.hidden_size == 5120 and cfg.remat_policy != "none"
  graphdef, abstract, _ = models.build.param_shardings(cfg, None)
  tx, _ = optimizer.make_optimizer(rc.optim, total_updates=rc.total_updates)
  opt = jax.eval_shape(tx.init, abstract)
  p, t = rc.data.max_prompt_length, rc.rl.max_response_length
  m = rc.rl.ppo_mini_batch_size * rc.rl.n  # 1024 responses per optimizer step
  upd = setup_lib.update_config(rc, _mesh_like(1, 64), p + t)
  shape = aot_batches.padded_shape(rc, _mesh_like(1, 64), upd)  # the padded layout
  assert (shape.num_micro * shape.num_shards * shape.rows, shape.row_len) == (m, p + t)
  batch = layouts.abstract_batch(shape, t)
  fn = functools.partial(steps.train_step, graphdef, cfg=upd, tx=tx)
  new_params, new_opt, metrics = jax.eval_shape(fn, abstract, opt, batch)
  assert models.count_params(new_params) == 32_763_876_352
  assert jax.tree.structure(new_opt) == jax.tree.structure(opt)
  for key in ("actor/pg_loss", "actor/influence_weights_mean_raw", "actor/grad_norm"):
    assert metrics[key].shape == ()


def test_tiny_cpu_config_is_consistent():
  rc = config_lib.validate(tiny_cpu.get_config(), check_paths=False)
  assert rc.rl.num_mini_batches >= 2  # FIPO is a no-op with a single mini-batch
  assert rc.data.synthetic.kind == "copy" and 0 < rc.sft.wrong_fraction < 1
  # The gold answer plus EOS fits before the overlong buffer starts.
  assert len("Answer: 4831") + 1 <= rc.rl.max_response_length - rc.rl.overlong_buffer_len


def test_a_verifier_that_hangs_is_cut_off_and_scored_wrong():
  import time  # noqa: PLC0415

  def slow(text, gt):
    time.sleep(30)
    return {"score": 1.0, "acc": True, "pred": gt}

  cfg = rewards_lib.RewardConfig(max_response_length=8, overlong_buffer_enable=False,
                                 max_seconds=0.2)
  s = rewards_lib.score_responses(["x", "y"], [1, 1], ["1", "2"], cfg, slow)
  assert s.scores.tolist() == [-1.0, -1.0] and not s.acc.any() and s.errors == 2
  # The alarm is disarmed afterwards: a normal verifier call is unaffected.
  s = rewards_lib.score_responses(["Answer: 1"], [3], ["1"], cfg)
  assert s.scores.tolist() == [1.0] and s.acc.all() and s.errors == 0
