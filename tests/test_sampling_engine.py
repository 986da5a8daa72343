"""The engine on real tiny models: HF greedy parity, exact log-probs, batching, recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fipo_jax import models, sharding
from fipo_jax.sampling import driver
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as params_lib

_VOCAB = 96
_PROMPT_LENS = (3, 11, 6, 1, 16, 8)  # one prefill length bucket: fewer compiles
_ENGINE_CFG = engine_lib.EngineConfig(
  num_slots=4, max_prompt_len=16, max_new_tokens=16, steps_per_call=4
)
_SAMPLING = params_lib.Sampling(temperature=0.7, top_p=0.9, top_k=20)


def _hf_config(model_type: str):
  common = dict(
    vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
    bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
  )  # fmt: skip
  if model_type == "qwen2":
    return transformers.Qwen2Config(**common)
  return transformers.LlamaConfig(**common, rope_theta=10000.0)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_pair(request, tmp_path_factory):
  """(torch model, our model) with the same random weights via save/from_pretrained."""
  torch.manual_seed(0)
  cls = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}
  hf_model = cls[request.param](_hf_config(request.param)).eval()
  path = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(path)
  return hf_model, models.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny():
  """A random qwen2 model (the HF test's config, so compiles are shared) and its engine."""
  cfg = models.ModelConfig.from_hf_config(_hf_config("qwen2").to_dict())
  model = models.init_model(cfg, seed=1)
  engine, params = engine_lib.Engine.from_model(model, _ENGINE_CFG)
  return model, engine, params


def _prompts(lengths=_PROMPT_LENS, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, _VOCAB, size=n).tolist() for n in lengths]


def _hf_greedy(hf_model, prompts, max_new, eos=None):
  """Left-padded batched HF greedy generate -> per-prompt new tokens (up to eos)."""
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :] = torch.tensor(p)
    mask[i, width - len(p) :] = 1
  gen = transformers.GenerationConfig(
    do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0, bos_token_id=None
  )
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
  rows = []
  for row in out[:, width:].numpy():
    row = row.tolist()
    if eos is not None and eos in row:
      row = row[: row.index(eos) + 1]
    rows.append(row)
  return rows


@pytest.mark.slow
def test_greedy_matches_transformers_generate(hf_pair):
  hf_model, model = hf_pair
  prompts = _prompts()
  engine, params = engine_lib.Engine.from_model(model, _ENGINE_CFG)
  samples = driver.generate_samples(engine, params, prompts, max_new_tokens=12)
  want = _hf_greedy(hf_model, prompts, 12)
  for s in samples:
    assert s.response_ids.tolist() == want[s.prompt_index], s.prompt_index
    assert s.finish_reason == "length"
  # With an EOS taken from the responses: truncated after it, 'stop', same as HF.
  eos = int(samples[0].response_ids[4])
  samples = driver.generate_samples(engine, params, prompts, max_new_tokens=12, eos_ids=(eos,))
  want = _hf_greedy(hf_model, prompts, 12, eos=eos)
  for s in samples:
    assert s.response_ids.tolist() == want[s.prompt_index], s.prompt_index
    assert s.finish_reason == ("stop" if s.response_ids[-1] == eos else "length")
  assert samples[0].finish_reason == "stop" and samples[0].length <= 5


def _trainer_log_probs(model, samples, temperature):
  """sequence_log_probs on the trainer's layout: left-padded prompts, right-padded responses."""
  p_max = max(len(s.prompt_ids) for s in samples)
  t_max = max(s.length for s in samples)
  ids = np.zeros((len(samples), p_max + t_max), np.int32)
  mask = np.zeros_like(ids)
  for i, s in enumerate(samples):
    p = len(s.prompt_ids)
    ids[i, p_max - p : p_max] = s.prompt_ids
    ids[i, p_max : p_max + s.length] = s.response_ids
    mask[i, p_max - p : p_max + s.length] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  out = models.sequence_log_probs(
    model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
    num_response_tokens=t_max, temperature=temperature,
  )  # fmt: skip
  return np.asarray(out), mask[:, p_max:].astype(bool)


@pytest.mark.parametrize("method", [_SAMPLING, params_lib.Greedy()], ids=str)
@pytest.mark.slow
def test_sampler_log_probs_equal_trainer_log_probs(tiny, method):
  model, engine, params = tiny
  samples = driver.generate_samples(
    engine, params, _prompts(), n=2, max_new_tokens=16, sampling=method, seed=3
  )
  ref, mask = _trainer_log_probs(model, samples, method.temperature)
  for i, s in enumerate(samples):
    assert s.response_logprobs.dtype == np.float32
    np.testing.assert_allclose(s.response_logprobs, ref[i][mask[i]], rtol=0, atol=1e-5)


def test_seed_reproducible_and_independent_of_batching(tiny):
  _, engine, params = tiny
  kw = dict(n=3, max_new_tokens=10, sampling=_SAMPLING, seed=5)
  a = driver.generate_samples(engine, params, _prompts(), **kw)
  b = driver.generate_samples(engine, params, _prompts(), **kw, mode="static")
  c = driver.generate_samples(engine, params, _prompts(), **{**kw, "seed": 6})
  assert [x.response_ids.tolist() for x in a] == [x.response_ids.tolist() for x in b]
  assert [x.response_ids.tolist() for x in a] != [x.response_ids.tolist() for x in c]
  # Samples of one prompt differ from each other (per-request keys).
  assert a[0].response_ids.tolist() != a[1].response_ids.tolist()


def test_continuous_batching_fills_freed_slots(tiny):
  _, engine, params = tiny
  rng = np.random.default_rng(0)
  budgets = np.minimum(rng.pareto(1.0, 14) * 2 + 1, 16).astype(int).tolist()
  prompts = _prompts([int(n) for n in rng.integers(1, 17, size=14)])
  # refill_fraction=0: refill after every finish, so no slot idles while requests wait.
  res = driver.run(engine, params, prompts, max_new_tokens=budgets, refill_fraction=0.0)
  assert [s.length for s in res.samples] == budgets
  assert res.stats.idle_slot_steps_while_waiting == 0
  static = driver.run(engine, params, prompts, max_new_tokens=budgets, mode="static")
  assert static.stats.idle_slot_steps_while_waiting > 0
  assert res.stats.num_decode_steps < static.stats.num_decode_steps
  for x, y in zip(res.samples, static.samples, strict=True):
    assert x.response_ids.tolist() == y.response_ids.tolist()


def test_no_recompiles_across_buckets_and_new_params(tiny):
  _, engine, params = tiny
  kw = dict(max_new_tokens=6, sampling=params_lib.Greedy())
  driver.generate_samples(engine, params, _prompts([5, 9]), **kw)
  sizes = (engine._prefill._cache_size(), engine._generate._cache_size())
  out = driver.generate_samples(engine, params, _prompts([3, 14], seed=1), **kw)
  # New weights (an optimizer step): same shapes, so nothing recompiles, and they are used.
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  out_new = driver.generate_samples(engine, new_params, _prompts([3, 14], seed=1), **kw)
  assert (engine._prefill._cache_size(), engine._generate._cache_size()) == sizes
  assert [s.response_ids.tolist() for s in out] != [s.response_ids.tolist() for s in out_new]


def test_prefill_buckets():
  cfg = engine_lib.EngineConfig(num_slots=6, max_prompt_len=100, max_new_tokens=50)
  assert [cfg.prefill_bucket(n) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 128, 128]
  assert [cfg.batch_bucket(n) for n in (1, 3, 5, 6)] == [1, 4, 8, 8]
  assert cfg.cache_len == 150
  # Pages of 128 tokens: a slot holds ceil(150 / 128) = 2 and reserves its worst case.
  assert (cfg.page, cfg.pages_per_slot) == (128, 2)
  assert [cfg.pages_needed(p, m) for p, m in ((100, 50), (10, 5), (100, 28), (100, 29))] == [
    2, 1, 1, 2,
  ]  # fmt: skip
  assert engine_lib.EngineConfig(max_prompt_len=8, max_new_tokens=8).page == 16  # capped at S
  with pytest.raises(ValueError, match="kv_layout"):
    engine_lib.EngineConfig(kv_layout="ragged")
  with pytest.raises(ValueError, match="insert_bucket"):
    engine_lib.EngineConfig(insert_bucket="rows")
  with pytest.raises(ValueError, match="max_prompt_len"):
    cfg.prefill_bucket(101)


@pytest.mark.slow
def test_sharded_engine_matches_unsharded(tiny):
  model, engine, params = tiny
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = engine_lib.Engine(model.cfg, engine.graphdef, _ENGINE_CFG, mesh=mesh)
  sharded_params = sharded.load_params(params)
  # The page pool [L, K, pages, page, H]: pages over the slots' axes, kv heads over tensor.
  kv_spec = sharded.init_decode_state().cache.k.sharding.spec
  assert kv_spec[1] == "tensor" and kv_spec[2] == ("data", "fsdp")
  kw = dict(n=2, max_new_tokens=8, sampling=_SAMPLING, seed=2)
  want = driver.generate_samples(engine, params, _prompts(), **kw)
  got = driver.generate_samples(sharded, sharded_params, _prompts(), **kw)
  assert [x.response_ids.tolist() for x in got] == [x.response_ids.tolist() for x in want]
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(x.response_logprobs, y.response_logprobs, atol=1e-5)


@pytest.mark.slow
def test_aot_traces_are_the_engines_steps(tiny):
  """trace_prefill / trace_generate (what fipo_jax.aot compiles) on abstract params compile and,
  run on real inputs, give what the engine's own prefill and generate give."""
  model, engine, params = tiny
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = engine_lib.Engine(model.cfg, engine.graphdef, _ENGINE_CFG, mesh=mesh)
  p = sharded.load_params(params)
  spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)  # noqa: E731
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), p)
  assert spec(sharded.abstract_decode_state()) == spec(sharded.init_decode_state())

  prompts = _prompts([16] * 4)  # the largest bucket: Up = Rb = 4, P = 16
  ids = [(i, i, 0) for i in range(4)]
  want = sharded.prefill(p, prompts, ids, seed=3, sampling=_SAMPLING)
  prefill = sharded.trace_prefill(abstract, sampling=_SAMPLING).lower().compile()
  put = lambda x: jax.device_put(np.asarray(x, np.int32), sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
  got = prefill(
    p,
    put(np.asarray(prompts)),
    put(np.full((4,), 16)),
    put(np.asarray(ids)),
    jax.device_put(np.uint32(3), sharding.replicated(mesh)),
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)
  # Batch-sharded inputs (the engine's own are host arrays): f32 rounding of another layout.
  np.testing.assert_allclose(got.cache.k, want.cache.k, atol=1e-6)

  state = sharded.insert(
    want, sharded.init_decode_state(), [0, 1, 2, 3], [0, 1, 2, 3], [8] * 4, [0]
  )
  traced = sharded.trace_generate(abstract, sampling=_SAMPLING)
  assert spec(traced.out_info[0]) == spec(sharded.abstract_decode_state())
  generate = traced.lower().compile()
  rep = sharding.replicated(mesh)
  stop = jax.device_put(engine_lib._stop_array([0]), rep)
  _, got_res = generate(p, jax.tree.map(jnp.copy, state), stop, jax.device_put(np.int32(5), rep))
  _, want_res = sharded.generate(p, state, sampling=_SAMPLING, stop_ids=[0])
  assert int(want_res.num_steps) == _ENGINE_CFG.steps_per_call
  np.testing.assert_array_equal(got_res.tokens, want_res.tokens)
