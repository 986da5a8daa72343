"""The GPU report in one command: packed train-step MFU, paged decode against the HBM roofline,
one whole RL step's phase split, each attention kernel against its fallback, the GPU tests.

  python benchmarks/gpu_report.py            # on a GPU host (bf16, Qwen2.5-0.5B and 1.5B shapes)
  python benchmarks/gpu_report.py --smoke    # tiny shapes on CPU (the test suite runs this)

- train: the trainer's packed update (`rl.packing.pack_rollouts` + `rl.steps.train_step`,
  FIPO loss, AdamW) on random Qwen2.5-shaped weights in bf16 compute, once with the platform's
  training kernel (models/kernels.py: 'pallas_flash' on a GPU) and once with the 'blockwise'
  fallback. MFU = model FLOPs per second (6 N per real token for the dense layers, 6 V D per
  response token for the LM head, 6 L N H s^2 per sequence of s tokens for causal attention)
  over the chip's dense bf16 peak; the compiled cost analysis is printed beside it.
- decode: the sampling engine at `--slots` slots, tokens/s and its share of the HBM roofline
  (each step reads the weights once and the live KV cache); and the paged decode attention
  alone at those slots, the platform's kernel (on a GPU in bf16, JAX's Pallas paged attention,
  models/gpu_paged.py) against 'gather_grouped' (where that is the kernel, 'gather_per_head'),
  with the largest difference of their outputs.
- rl_step: one RL step of configs/tiny_cpu.py:runlocal (no warm start, groups kept unfiltered)
  through `trainer.run`, split into generate / old log-probs / update (the trainer's timings);
  on a GPU at the 0.5B preset's shapes in bf16.
- gpu_tests: tests/test_model_gpu.py under pytest (GPU only).
The last line is JSON: {"chip", "platform", "smoke", "train", "decode", "rl_step", "gpu_tests"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax import models, recipes  # noqa: E402
from fipo_jax.algo import losses as losses_lib  # noqa: E402
from fipo_jax.models import kernels, paged  # noqa: E402
from fipo_jax.rl import packing, steps  # noqa: E402
from fipo_jax.sampling import driver  # noqa: E402
from fipo_jax.sampling import engine as engine_lib  # noqa: E402
from fipo_jax.sampling import params as sampling_params  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peak FLOP/s and HBM bytes/s per chip (vendor datasheets, SXM parts).
CHIPS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def chip_name() -> str:
  kind = jax.devices()[0].device_kind
  return next((name for name in CHIPS if name.lower() in kind.lower()), kind)


def _timed(fn, iters: int) -> float:
  """Mean seconds of fn() over `iters` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def _packed_batch(cfg, rng, seqs: int, prompt: int, response: int):
  """One packed mini-batch of `seqs` sequences (prompt 5-15%, responses log-normal around half
  of `response`) in rows of prompt + response tokens -> (steps.Batch, lengths [seqs, 2])."""
  plen = rng.integers(max(1, prompt // 20), max(2, prompt // 7) + 1, seqs)
  rlen = np.clip(np.round(rng.lognormal(np.log(response / 2) - 0.18, 0.6, seqs)), 1, response)
  ids = lambda n: rng.integers(1, cfg.vocab_size, int(n)).astype(np.int32)
  out = packing.pack_rollouts(
    [ids(n) for n in plen], [ids(n) for n in rlen],
    [-rng.random(int(n)).astype(np.float32) for n in rlen],
    rng.standard_normal(seqs).astype(np.float32), mini=seqs, max_prompt_length=prompt,
    max_response_length=response, layout=packing.Layout(prompt + response, None, 1), pad_id=0,
  )  # fmt: skip
  batch = steps.Batch(**{k: jnp.asarray(v) for k, v in out.batches[0].items()})
  return batch, np.stack([plen, rlen], axis=1).astype(np.int64)


def _model_flops(cfg, params, lengths: np.ndarray) -> float:
  tokens = lengths.sum(axis=1)
  vd = cfg.vocab_size * cfg.hidden_size
  dense = models.count_params(params) - vd * (1 if cfg.tie_word_embeddings else 2)
  attn = (
    6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float(np.sum(tokens.astype(float) ** 2))
  )
  return 6 * dense * float(tokens.sum()) + 6 * vd * float(lengths[:, 1].sum()) + attn


def train_report(cfg, a) -> dict:
  """The packed train step with the platform's kernel and with 'blockwise' (see the docstring)."""
  batch, lengths = _packed_batch(cfg, np.random.default_rng(0), a.seqs, a.prompt, a.response)
  loss_cfg = losses_lib.PolicyLossConfig(chunk_size=min(128, a.response))
  ucfg = steps.UpdateConfig(policy_loss=loss_cfg, num_micro_batches=1, logprob_chunk_size=512)
  tx = optax.adamw(1e-6)
  platform = kernels.platform_of()
  out = {"real_tokens": int(lengths.sum()), "row_tokens": int(np.prod(batch.input_ids.shape))}
  for label, impl in (("kernel", "auto"), ("fallback", "blockwise")):
    if label == "fallback" and out["kernel"]["attention"] == "blockwise":
      out[label] = out["kernel"]  # the platform's kernel is the fallback: timed once
      continue
    mcfg = cfg.replace(attention_impl=impl)
    graphdef, params = nnx.split(models.init_model(mcfg, seed=0))
    opt = tx.init(params)
    step = jax.jit(lambda p, o, b, g=graphdef: steps.train_step(g, p, o, b, cfg=ucfg, tx=tx))
    compiled = step.lower(params, opt, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    dt = _timed(lambda c=compiled, p=params, o=opt: c(p, o, batch)[2]["actor/loss"], a.iters)
    flops = _model_flops(mcfg, params, lengths)
    peak = CHIPS.get(chip_name(), (None, None))[0]
    out[label] = {
      "attention": kernels.train_kernel(platform, impl, mcfg.dtype, packed=True), "step_s": dt,
      "tokens_per_s": out["real_tokens"] / dt, "model_flops": flops,
      "compiled_flops": float((cost or {}).get("flops", -1)),
      "mfu": flops / dt / peak if peak else None,
    }  # fmt: skip
  out["kernel_speedup"] = out["fallback"]["step_s"] / out["kernel"]["step_s"]
  return out


def _decode_attention_step(name: str, pools, cache, q, kv):
  """(step, carry) timing one layer's paged decode attention with kernel `name`: step(carry)
  -> (carry, out [B, N, H]). A carried-pool kernel writes the token into its donated pools
  first (as the engine's layer scan does); a gather kernel reads the pools and merges it."""
  layout = paged.PagedLayout(page_size=cache.layout.page_size,
                             pages_per_block=cache.layout.pages_per_block, kernel=name)  # fmt: skip
  active = jnp.ones(cache.lengths.shape, bool)
  if name in kernels.GPU_PAGED_KERNELS:  # folded pools [K, L, Pg, page, H]
    c = cache.replace(k=None, v=None, layout=layout)
    f = jax.jit(lambda p, c, q: paged.write_and_attend(q, kv, kv, p, c, 0, active),
                donate_argnums=0)  # fmt: skip
    return (lambda p: f(p, c, q)), tuple(x.swapaxes(0, 1) for x in pools)
  c = cache.replace(k=pools[0], v=pools[1], layout=layout)
  f = jax.jit(lambda c, q: paged.decode_attention(q, kv, kv, c, 0, c.lengths))
  return (lambda p: (p, f(c, q))), pools


def decode_attention_report(cfg, slots: int, context: int, iters: int) -> dict:
  """The paged decode attention alone (one layer, `slots` slots of `context` tokens, the last
  one new): the platform's kernel (kernels.decode_kernel) against 'gather_grouped' (or, where
  that is the kernel, 'gather_per_head') -> seconds per call of each, and the largest output
  difference. Off GPU, the GPU kernel also runs in the Pallas interpreter (a correctness
  check of its wiring, not a speed)."""
  page = 16
  pages = -(-context // page)
  rng = np.random.default_rng(0)
  dt = jnp.dtype(cfg.dtype)
  shape = (1, cfg.num_kv_heads, slots * pages, page, cfg.head_dim)
  pools = tuple(jnp.asarray(rng.standard_normal(shape), dt) for _ in range(2))
  table = jnp.asarray(rng.permutation(slots * pages).reshape(slots, pages), jnp.int32)
  q = jnp.asarray(rng.standard_normal((slots, cfg.num_heads, cfg.head_dim)), dt)
  kv = jnp.asarray(rng.standard_normal((slots, cfg.num_kv_heads, cfg.head_dim)), dt)
  layout = paged.PagedLayout(page_size=page, pages_per_block=max(1, 512 // page))
  cache = paged.PagedCache(k=None, v=None, page_table=table, layout=layout,
                           lengths=jnp.full((slots,), context - 1, jnp.int32))  # fmt: skip
  platform = kernels.platform_of()
  chosen = kernels.decode_kernel(platform, cfg, page)
  other = "gather_per_head" if chosen == "gather_grouped" else "gather_grouped"
  names = [chosen, other] + (["pallas_paged_attention_interpret"] if platform != "gpu" else [])
  secs, outs = {}, {}
  for name in names:
    step, carry = _decode_attention_step(name, pools, cache, q, kv)
    carry, outs[name] = step(carry)  # compile
    jax.block_until_ready(outs[name])
    t0 = time.perf_counter()
    for _ in range(iters):
      carry, out = step(carry)
    jax.block_until_ready(out)
    secs[name] = (time.perf_counter() - t0) / iters
  diff = lambda n: float(jnp.max(jnp.abs(outs[n].astype(jnp.float32) - outs[other])))
  kv_bytes = 2 * slots * context * cfg.num_kv_heads * cfg.head_dim * dt.itemsize
  res = {"kernel": chosen, "fallback": other, "kernel_s": secs[chosen], "fallback_s": secs[other],
         "kernel_speedup": secs[other] / secs[chosen], "max_abs_diff": diff(chosen),
         "kernel_kv_gb_per_s": kv_bytes / secs[chosen] / 1e9}  # fmt: skip
  if len(names) > 2:
    res["interpret_max_abs_diff"] = diff(names[2])
  return res


def decode_report(cfg, a) -> dict:
  """Engine decode at `slots` slots: tokens/s and its share of the HBM roofline."""
  graphdef, params = nnx.split(models.init_model(cfg, seed=0))
  eng = engine_lib.Engine(cfg, graphdef, engine_lib.EngineConfig(
    num_slots=a.slots, max_prompt_len=a.prompt, max_new_tokens=a.new_tokens,
    steps_per_call=min(64, a.new_tokens)))  # fmt: skip
  params = eng.load_params(params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, cfg.vocab_size, a.prompt).tolist() for _ in range(a.slots)]
  kw = dict(n=1, max_new_tokens=a.new_tokens, sampling=sampling_params.Sampling(1.0), seed=0)
  driver.run(eng, params, prompts, **kw)  # compile
  stats = driver.run(eng, params, prompts, **kw).stats
  itemsize = jnp.dtype(cfg.dtype).itemsize
  weight_bytes = models.count_params(params) * itemsize
  kv_bytes = (2 * cfg.num_layers * a.slots * (a.prompt + a.new_tokens / 2) * cfg.num_kv_heads
              * cfg.head_dim * itemsize)  # fmt: skip
  bw = CHIPS.get(chip_name(), (None, None))[1]
  bound = a.slots * bw / (weight_bytes + kv_bytes) if bw else None
  return {
    "slots": a.slots, "tokens_per_s": stats.tokens_per_s, "hbm_bound_tokens_per_s": bound,
    "fraction_of_hbm_bound": stats.tokens_per_s / bound if bound else None,
    "slot_utilisation": stats.slot_utilisation, "wall_s": stats.wall_time_s,
    "attention": decode_attention_report(cfg, a.slots, a.prompt + a.new_tokens // 2, a.iters),
  }  # fmt: skip


def rl_step_config(smoke: bool):
  """configs/tiny_cpu.py:runlocal for one RL step: no warm start, no eval or checkpoint, groups
  kept unfiltered (a random policy scores 0 everywhere); off smoke, the full 0.5B preset in
  bf16 with 512-token responses."""
  from configs import tiny_cpu  # noqa: PLC0415 (the repository's recipe, by path)

  c = tiny_cpu.get_config("runlocal")
  c.total_steps, c.eval_every, c.checkpoint_every, c.sft.steps = 1, 0, 0, 0
  c.rl.filter_groups_enable = False
  if smoke:  # one mini-batch of 2 x 2 responses: three small programs to compile
    c.rl.n = c.rl.train_batch_size = c.rl.gen_batch_size = c.rl.ppo_mini_batch_size = 2
    c.sampling.num_slots = 4
  else:
    c.model.overrides, c.model.dtype = {}, "bfloat16"
    c.rl.max_response_length, c.rl.ppo_max_token_len_per_device = 512, 1024
  return c


def rl_step_report(smoke: bool) -> dict:
  """One RL step through `trainer.run` and its phase split (see the module docstring)."""
  from fipo_jax.rl import trainer  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as workdir:
    m = trainer.run(rl_step_config(smoke), workdir)
  phases = {k: float(m.get(f"timing_s/{k}", 0.0)) for k in ("gen", "old_log_prob", "update_actor")}
  total = float(m["timing_s/step"])
  return {"step_s": total, "phases_s": phases,
          "split": {k: v / total for k, v in phases.items()}}  # fmt: skip


def gpu_tests() -> dict:
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_model_gpu.py"]
  res = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
  print(res.stdout[-2000:], flush=True)
  return {"returncode": res.returncode, "summary": (res.stdout.strip().splitlines() or [""])[-1]}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
  p.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
  p.add_argument("--seqs", type=int, default=64, help="sequences in the packed mini-batch")
  p.add_argument("--prompt", type=int, default=256)
  p.add_argument("--response", type=int, default=1792)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--slots", type=int, default=256)
  p.add_argument("--new_tokens", type=int, default=256)
  a = p.parse_args(argv)
  over = {}
  if a.smoke:
    a.presets, a.seqs, a.prompt, a.response, a.iters = a.presets[:1], 6, 16, 48, 1
    a.slots, a.new_tokens = 8, 8
    over = dict(recipes.tiny_model())
  print(f"device: {jax.devices()[0].device_kind} ({chip_name()}), jax {jax.__version__}",
        flush=True)  # fmt: skip
  train, decode = {}, {}
  for preset in a.presets:
    cfg = models.get_preset(preset, dtype="bfloat16", param_dtype="float32", **over)
    train[preset] = t = train_report(cfg, a)
    print(f"{preset} train ({t['real_tokens']} real / {t['row_tokens']} row tokens): "
          + "; ".join(f"{k} '{t[k]['attention']}' {t[k]['step_s'] * 1e3:.1f} ms MFU {t[k]['mfu']}"
                      for k in ("kernel", "fallback")), flush=True)  # fmt: skip
    decode[preset] = d = decode_report(cfg, a)
    att = d["attention"]
    print(f"{preset} decode: {d['tokens_per_s']:,.0f} tokens/s at {a.slots} slots, "
          f"{d['fraction_of_hbm_bound']} of the HBM roofline; attention '{att['kernel']}' "
          f"{att['kernel_speedup']:.2f}x '{att['fallback']}'", flush=True)  # fmt: skip
  rl = rl_step_report(a.smoke)
  print(f"rl step: {rl['step_s']:.2f} s, split {rl['split']}", flush=True)
  tests = gpu_tests() if kernels.platform_of() == "gpu" else {"skipped": "no GPU"}
  print(
    json.dumps(
      {
        "chip": chip_name(),
        "platform": kernels.platform_of(),
        "smoke": a.smoke,
        "train": train,
        "decode": decode,
        "rl_step": rl,
        "gpu_tests": tests,
      }
    )
  )


if __name__ == "__main__":
  main()
