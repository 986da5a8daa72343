"""JetStream-style sampling engine and the offline continuous-batching driver.

Public API:
  Greedy, Sampling, from_flags, TOP_K_OFF        params.py (sampling methods)
  Engine, EngineConfig, DecodeState, Prefix      engine.py (prefill / insert / generate)
  generate_samples, run                          driver.py (prompts x n -> samples)
  Sample, SamplerStats, Result                   batching.py (the driver's slots and results)

Typical use (rollouts, eval, the generate CLI):

  engine, params = Engine.from_model(model, EngineConfig(num_slots=64, max_prompt_len=1024,
                                                         max_new_tokens=4096))
  samples = generate_samples(engine, params, prompt_ids, n=16, max_new_tokens=4096,
                             sampling=Sampling(temperature=1.0), eos_ids=(eos,), seed=step)

The engine's KV cache is paged by default (EngineConfig.kv_layout); the driver prefills each
prompt once for its n samples, refills freed slots in batches (refill_fraction, 1/8 of the
slots) and decodes a call's tokens while the next call runs. `run(..., **driver.REFERENCE)`
with EngineConfig(kv_layout='dense') is the previous path (the benchmark's reference mode);
both give the same samples for a seed.
"""

from fipo_jax.sampling.batching import Result, Sample, SamplerStats
from fipo_jax.sampling.driver import generate_samples, run
from fipo_jax.sampling.engine import DecodeState, Engine, EngineConfig, Prefix, ResultTokens
from fipo_jax.sampling.params import TOP_K_OFF, Greedy, Sampling, SamplingMethod, from_flags

__all__ = [
  "DecodeState",
  "Engine",
  "EngineConfig",
  "Greedy",
  "Prefix",
  "Result",
  "ResultTokens",
  "Sample",
  "SamplerStats",
  "Sampling",
  "SamplingMethod",
  "TOP_K_OFF",
  "from_flags",
  "generate_samples",
  "run",
]
