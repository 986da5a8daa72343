"""The engine backend of partial rollouts: a request aborted mid-response and resumed by
re-prefilling its prefix (same weights, greedy) continues exactly as an uninterrupted one."""

import numpy as np
import pytest

from fipo_jax import models
from fipo_jax.rl import partial, partial_sampling
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib

N, SHORT, LONG, PROMPT = 2, 3, 40, 8


class Budgets(partial_sampling.EngineBackend):
  def budget(self, group, sample):
    return int(group.example["lengths"][sample])


def _setup(num_layers: int = 2):
  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_layers=num_layers,
                           num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
  model = models.init_model(cfg, seed=0)
  ecfg = engine_lib.EngineConfig(num_slots=4, max_prompt_len=PROMPT + LONG, max_new_tokens=LONG,
                                 steps_per_call=4, insert_bucket="prefix")  # as partial mode's
  return engine_lib.Engine.from_model(model, ecfg)


def _groups():
  rng = np.random.default_rng(0)
  make = lambda i, length: partial.Group.new(
    {"id": i, "lengths": [length] * N, "prompt_ids": rng.integers(1, 64, PROMPT)}, N)
  return [make(0, SHORT), make(1, LONG)]


def _backend(engine, params, step):
  return Budgets(engine, params, params_lib.Greedy(), (), LONG, N, seed=0, step=step,
                 refill_fraction=0.125)


@pytest.mark.slow  # compiles a tiny engine (~30 s alone, 2 min on a busy host)
def test_aborted_request_resumes_where_it_stopped():
  engine, params = _setup()
  whole = _groups()
  _backend(engine, params, 0).run(whole, version=0, seed_round=0, on_done=lambda idx: False)
  assert all(g.done for g in whole)

  cut = _groups()
  finished = []
  stop = lambda idx: finished.extend(idx) or True  # abort once the short group is done
  _backend(engine, params, 0).run(cut, version=0, seed_round=0, on_done=stop)
  assert finished == [0] and cut[0].done and not cut[1].done
  mid = [r.tokens.size for r in cut[1].requests]
  assert all(0 < m < LONG for m in mid), mid  # really cut mid-response
  _backend(engine, params, 1).run(cut, version=1, seed_round=0, on_done=lambda idx: False)
  assert cut[1].done
  for a, b, m in zip(whole[1].requests, cut[1].requests, mid, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5)
    np.testing.assert_array_equal(b.versions, [0] * m + [1] * (LONG - m))
    assert b.finish_reason == "length"


def _draw(rng):
  """draw(k): k groups whose responses have long-tailed forced lengths (2..LONG)."""
  ids = iter(range(10**6))

  def draw(k):
    return [{"id": next(ids), "prompt_ids": rng.integers(1, 64, PROMPT),
             "lengths": np.clip(rng.lognormal(np.log(8), 1.0, N), 2, LONG).astype(int)}
            for _ in range(k)]  # fmt: skip

  return draw


def _keep_two_of_three(groups):
  for g in groups:
    g.scored, g.keep = None, g.example["id"] % 3 != 2


@pytest.mark.slow  # compiles a tiny engine's prefill and insert shapes (~40 s)
def test_partial_steps_stop_compiling_new_prefill_and_insert_shapes():
  """Resumed prefixes (prompt + tokens, any length) are prefilled one per call, and an insert
  has its prefix's request bucket (insert_bucket='prefix'), so the shapes partial steps bring
  are a few length buckets: the second half of 12 steps compiles no new prefill or insert
  program (before, each step's mix of resumed rows x lengths x requests and of insert counts
  kept compiling new ones until step 9 here)."""
  # jax.jit's caches are per function, shared by every engine of the test process: a model no
  # other test builds (3 layers) and counts from before the loop keep other tests' programs out.
  engine, params = _setup(num_layers=3)
  carry, draw = partial.Carry(), _draw(np.random.default_rng(0))
  sizes, resumed = [], 0
  before = (engine._prefill._cache_size(), engine._insert._cache_size())
  for step in range(12):
    res = carry.step(_backend(engine, params, step), _keep_two_of_three, draw, step=step, eta=1,
                     n=N, train_batch_size=2, gen_batch_size=6, max_num_gen_batches=0,
                     min_prompts=1)  # fmt: skip
    resumed += res.metrics["rollout/resumed_requests"]
    sizes.append((engine._prefill._cache_size() - before[0],
                  engine._insert._cache_size() - before[1]))
  assert resumed >= 12, resumed  # resumed prefixes of many lengths were prefilled
  assert sizes[6:] == [sizes[5]] * 6, sizes  # the programs compiled by step 5 serve the rest
  assert all(p == i for p, i in sizes), sizes  # one insert program per prefill program
