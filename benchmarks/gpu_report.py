"""Train MFU and decode tokens/s of a random Qwen2.5-shaped model on one accelerator.

Usage: python benchmarks/gpu_report.py [--preset qwen2.5-0.5b] [--batch 8 --seq 2048]
                                       [--slots 256 --new_tokens 256 --prompt 128]

Train: the real FIPO update (fipo_jax.rl.train_step.train_step: chunked log-probs, FIPO loss,
AdamW) on batch x seq tokens in bf16 compute with float32 params. MFU = model FLOPs per second
(6 N per token for the dense layers plus 12 L T D per token for causal attention, the usual
estimate) over the chip's dense bf16 peak; the compiled cost analysis is printed beside it.
Decode: the sampling engine's decode steps with `slots` concurrent sequences; the baseline is
the HBM roofline: each decode step must at least read every weight once (bf16 copies) and the
live KV cache, so tokens/s <= slots * bandwidth / bytes_per_step.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fipo_jax import models
from fipo_jax.rl import train_step as ts
from fipo_jax.sampling import driver
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as sampling_params

# Dense bf16 peak FLOP/s and HBM bytes/s per chip (vendor datasheets, SXM parts).
CHIPS = {
  "H100": (989e12, 3.35e12),
  "H200": (989e12, 4.8e12),
  "cpu": (None, None),
}


def chip_name() -> str:
  kind = jax.devices()[0].device_kind
  for name in CHIPS:
    if name.lower() in kind.lower():
      return name
  return "cpu"


def train_report(cfg: models.ModelConfig, batch: int, seq: int, iters: int) -> dict:
  model = models.init_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  tx = ts.make_optimizer(lr=1e-6, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
  opt_state = jax.jit(tx.init)(params)
  t = seq // 2  # response half of the sequence
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  b = ts.PolicyBatch(
    input_ids=ids, attention_mask=jnp.ones_like(ids),
    positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
    response_mask=jnp.ones((batch, t), jnp.float32),
    old_log_probs=jnp.full((batch, t), -2.0, jnp.float32),
    advantages=jnp.asarray(rng.standard_normal((batch, 1)) * np.ones((1, t)), jnp.float32),
  )
  step = jax.jit(lambda p, o, x: ts.train_step(graphdef, p, o, x, cfg=ts.UpdateConfig(), tx=tx),
                 donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, b).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  params, opt_state, m = compiled(params, opt_state, b)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(iters):
    params, opt_state, m = compiled(params, opt_state, b)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / iters
  vd = cfg.vocab_size * cfg.hidden_size
  n_layers = models.count_params(params) - vd * (1 if cfg.tie_word_embeddings else 2)
  tokens = batch * seq
  # 6N per token for the layers, the LM head on the T response tokens only (chunked log-probs),
  # and causal attention scores + values: 6 * L * seq * N * H per token (fwd + bwd).
  model_flops = (6 * n_layers * tokens + 6 * vd * batch * t
                 + 6 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim * tokens)
  peak, _ = CHIPS[chip_name()]
  return {
    "tokens_per_s": tokens / dt, "step_s": dt, "compile_s": compile_s,
    "model_flops_per_step": model_flops, "compiled_flops_per_step": float(cost.get("flops", -1)),
    "mfu": model_flops / dt / peak if peak else None, "loss": float(m["actor/loss"]),
  }


def decode_report(cfg: models.ModelConfig, slots: int, prompt: int, new_tokens: int) -> dict:
  model = models.init_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  eng = engine_lib.Engine(cfg, graphdef, engine_lib.EngineConfig(
    num_slots=slots, max_prompt_len=prompt, max_new_tokens=new_tokens, steps_per_call=64))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(slots)]
  kw = dict(n=1, max_new_tokens=new_tokens, sampling=sampling_params.Sampling(1.0), seed=0)
  driver.run(eng, params, prompts, **kw)  # compile
  res = driver.run(eng, params, prompts, **kw)
  tok_s = res.stats.tokens_generated / res.stats.wall_time_s
  weight_bytes = models.count_params(params) * jnp.dtype(cfg.dtype).itemsize
  avg_ctx = prompt + new_tokens / 2
  kv_bytes = (2 * cfg.num_layers * slots * avg_ctx * cfg.num_kv_heads * cfg.head_dim
              * jnp.dtype(cfg.dtype).itemsize)
  _, bw = CHIPS[chip_name()]
  bound = slots * bw / (weight_bytes + kv_bytes) if bw else None
  return {"tokens_per_s": tok_s, "hbm_bound_tokens_per_s": bound,
          "fraction_of_hbm_bound": tok_s / bound if bound else None,
          "slot_utilisation": res.stats.slot_utilisation, "wall_s": res.stats.wall_time_s}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="qwen2.5-0.5b")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--slots", type=int, default=256)
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--layers", type=int, default=None, help="Override num_layers (smoke runs).")
  a = p.parse_args()
  over = {"num_layers": a.layers} if a.layers else {}
  cfg = models.get_preset(a.preset, dtype=a.dtype, param_dtype="float32", **over)
  print(f"device: {jax.devices()[0].device_kind} ({chip_name()}), preset {a.preset}, "
        f"{models.count_params(models.abstract_model(cfg)) / 1e6:.0f}M params")
  train = train_report(cfg, a.batch, a.seq, a.iters)
  print(f"train: {train['tokens_per_s']:,.0f} tokens/s, step {train['step_s'] * 1e3:.1f} ms, "
        f"MFU {train['mfu'] if train['mfu'] is None else round(train['mfu'], 3)} "
        f"(model {train['model_flops_per_step']:.3g} vs compiled "
        f"{train['compiled_flops_per_step']:.3g} FLOP/step)")
  dec = decode_report(cfg, a.slots, a.prompt, a.new_tokens)
  print(f"decode: {dec['tokens_per_s']:,.0f} tokens/s with {a.slots} slots; HBM roofline "
        f"{dec['hbm_bound_tokens_per_s']}; fraction {dec['fraction_of_hbm_bound']}")
  print(json.dumps({"chip": chip_name(), "preset": a.preset, "train": train, "decode": dec}))


if __name__ == "__main__":
  main()
