"""One decode step's time against the live KV length: paged vs dense cache (issue 17).

  python benchmarks/decode_step.py            # 4 layers, d 256, S 8192, 32 slots, float32, CPU
  python benchmarks/decode_step.py --quick    # tiny shapes, a smoke check

On an attention-dominated config, every slot is set at 1/8 and at 7/8 of the cache by a
synthetic prefix (random k/v written straight into the cache: decoding thousands of tokens
would take minutes); what is timed is the real `Engine.generate` (steps_per_call decode steps,
after a warm-up call, min of repeats). Reported per kv_layout:
  decode_fill_ratio = t(1/8) / t(7/8)                (target <= 0.35 for 'paged')
  decode_roofline   = (weight bytes + live KV bytes read per step at 1/8) / t(1/8) / bandwidth
                                                     (target >= 0.2 for 'paged')
with bandwidth this machine's memory-read rate (a numpy sum over a 256 MB float32 array, min
of repeats). `measure()` returns the dict; benchmarks/sampling.py imports it. The last line
of stdout is that dict as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fipo_jax import models  # noqa: E402
from fipo_jax.models import paged  # noqa: E402
from fipo_jax.sampling import engine as engine_lib  # noqa: E402
from fipo_jax.sampling import params as params_lib  # noqa: E402

FULL = dict(layers=4, width=256, heads=4, kv_heads=2, cache_len=8192, slots=32)
QUICK = dict(layers=2, width=64, heads=4, kv_heads=2, cache_len=512, slots=8)


def model_config(layers: int, width: int, heads: int, kv_heads: int, vocab: int = 1024):
  return models.ModelConfig(
    vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_layers=layers,
    num_heads=heads, num_kv_heads=kv_heads, head_dim=width // heads, dtype="float32",
  )  # fmt: skip


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes/s of a numpy sum over a float32 array of `megabytes` (min time of repeats)."""
  x = np.ones(megabytes * 2**20 // 4, np.float32)
  x.sum()  # touch the pages once
  best = min(_timed(x.sum) for _ in range(repeats))
  return x.nbytes / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def fill_slots(engine: engine_lib.Engine, fill: int, seed: int = 0) -> engine_lib.DecodeState:
  """A DecodeState with every slot active at `fill` cached tokens of random k/v.

  Honest shortcut: the prefix is random, not a real prompt's, but the state has exactly the
  shapes and lengths a real run reaches, so the decode step timed on it is the real one.
  """
  cfg, mcfg = engine.cfg, engine.model_cfg
  b = cfg.num_slots
  state = engine.init_decode_state()
  if engine.paged:  # each slot reserves its worst case, as insert does
    table = np.zeros((b, cfg.pages_per_slot), np.int32)
    for slot in range(b):
      table[slot] = engine.allocator.reserve(slot, cfg.pages_per_slot)
  else:
    table = None

  def build(state, key):
    c = state.cache
    k = jax.random.normal(key, c.k.shape, c.k.dtype)
    v = c.v  # None: the TPU kernel's combined pool (k holds k and v)
    if v is not None:
      v = jax.random.normal(jax.random.fold_in(key, 1), v.shape, v.dtype)
    full = jnp.full((b,), fill, jnp.int32)
    if isinstance(c, paged.PagedCache):
      cache = c.replace(k=k, v=v, page_table=jnp.asarray(table), lengths=full)
    else:
      mask = jnp.broadcast_to(jnp.arange(c.max_len) < fill, c.mask.shape)
      cache = c.replace(k=k, v=v, mask=mask, index=full)
    return state.replace(
      cache=cache,
      tokens=jax.random.randint(key, (b,), 1, mcfg.vocab_size, jnp.int32),
      positions=full,
      num_generated=jnp.ones((b,), jnp.int32),
      max_new=jnp.full((b,), cfg.cache_len - fill, jnp.int32),
      active=jnp.ones((b,), bool),
      key_data=jax.random.key_data(jax.random.split(key, b)),
    )

  out = jax.jit(build, donate_argnums=0, out_shardings=engine.state_shardings)
  return out(state, jax.random.key(seed))


def step_time(engine, params, fill: int, repeats: int) -> float:
  """Seconds per decode step with every slot at `fill` tokens (min over repeats)."""
  state = fill_slots(engine, fill)
  sampling = params_lib.Sampling(temperature=1.0)
  kw = dict(sampling=sampling, stop_ids=[])
  state, res = engine.generate(params, state, **kw)  # warm-up (compiles once per engine)
  jax.block_until_ready(res)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    state, res = engine.generate(params, state, **kw)
    jax.block_until_ready((state, res))
    best = min(best, time.perf_counter() - start)
    assert int(res.num_steps) == engine.cfg.steps_per_call, "a slot finished early"
  del state
  return best / engine.cfg.steps_per_call


def measure(layouts=("paged", "dense"), *, quick: bool = False, repeats: int = 5,
            steps_per_call: int = 8, page_size: int = 128, decode_block: int = 128,
            bandwidth: float | None = None) -> dict:  # fmt: skip
  """{'decode_fill_ratio': {layout: r}, 'decode_roofline': {layout: r}, 'raw': {...}}."""
  shape = QUICK if quick else FULL
  mcfg = model_config(shape["layers"], shape["width"], shape["heads"], shape["kv_heads"])
  model = models.init_model(mcfg, seed=0)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.tree.map(np.asarray, model)))
  s, b = shape["cache_len"], shape["slots"]
  bandwidth = bandwidth or read_bandwidth(64 if quick else 256)
  kv_per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * 4  # f32 k and v
  low, high = s // 8, 7 * s // 8
  out = {"decode_fill_ratio": {}, "decode_roofline": {}, "raw": {
    "config": dict(shape, dtype="float32", steps_per_call=steps_per_call, page_size=page_size,
                   decode_block=decode_block),
    "bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes,
    "live_kv_bytes_at_1/8": b * low * kv_per_token, "step_s": {}}}  # fmt: skip
  for layout in layouts:
    cfg = engine_lib.EngineConfig(
      num_slots=b, max_prompt_len=s // 8, max_new_tokens=s - s // 8, steps_per_call=steps_per_call,
      kv_layout=layout, page_size=page_size, decode_block=decode_block,
    )  # fmt: skip
    engine, params = engine_lib.Engine.from_model(model, cfg)
    assert cfg.cache_len == s
    t_low, t_high = (step_time(engine, params, fill, repeats) for fill in (low, high))
    out["raw"]["step_s"][layout] = {"1/8": t_low, "7/8": t_high}
    out["decode_fill_ratio"][layout] = t_low / t_high
    read = weight_bytes + b * low * kv_per_token
    out["decode_roofline"][layout] = read / t_low / bandwidth
    del engine, params
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--page_size", type=int, default=128)
  parser.add_argument("--decode_block", type=int, default=128)
  parser.add_argument("--layouts", default="paged,dense")
  args = parser.parse_args()
  res = measure(tuple(args.layouts.split(",")), quick=args.quick, repeats=args.repeats,
                page_size=args.page_size, decode_block=args.decode_block)  # fmt: skip
  raw = res["raw"]
  live = raw["live_kv_bytes_at_1/8"] / 1e6
  print(f"memory-read bandwidth {raw['bandwidth_GBps']:.1f} GB/s; weights "
        f"{raw['weight_bytes'] / 1e6:.1f} MB, live KV at 1/8 {live:.1f} MB")  # fmt: skip
  for layout, t in raw["step_s"].items():
    print(f"{layout:5s}: step {t['1/8'] * 1e3:8.2f} ms at 1/8, {t['7/8'] * 1e3:8.2f} ms at 7/8; "
          f"decode_fill_ratio {res['decode_fill_ratio'][layout]:.3f} (target <= 0.35), "
          f"decode_roofline {res['decode_roofline'][layout]:.3f} (target >= 0.2)")  # fmt: skip
  print(json.dumps(res))


if __name__ == "__main__":
  main()
