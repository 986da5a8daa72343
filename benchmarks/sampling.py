"""Sampling throughput: our engine vs transformers `generate`, and continuous vs static batching.

  python benchmarks/sampling.py            # the full run (CPU, a few minutes)
  python benchmarks/sampling.py --quick    # smaller shapes, for a smoke check
  JAX_PLATFORMS=cuda python benchmarks/sampling.py --preset qwen2.5-0.5b --dtype bfloat16
      # accelerator: a random-weight preset, engine throughput and continuous vs static only

One small random Qwen2 model is built in torch, saved with `save_pretrained` and loaded through
`fipo_jax.models.from_pretrained`, so both sides run the same weights on the same prompts
(greedy, no EOS: every request produces exactly its budget of tokens). Every timing is taken
after a warm-up run of the same shapes (our compiles; torch's first-call overheads) and the
baselines are measured in the same process, so the printed ratios are like for like.

Targets (issue 4): engine >= 2x transformers tokens/s at batch 16 x 64 and batch 64 x 256;
continuous >= 1.5x static batching on a long-tailed mix of response lengths.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fipo_jax import models  # noqa: E402
from fipo_jax.sampling import driver  # noqa: E402
from fipo_jax.sampling import engine as engine_lib  # noqa: E402

VOCAB = 1024


def build_models(tmp: str):
  """A random tiny Qwen2 in torch and the same weights in fipo_jax."""
  cfg = transformers.Qwen2Config(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, bos_token_id=None,
    eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
  )  # fmt: skip
  torch.manual_seed(0)
  hf_model = transformers.Qwen2ForCausalLM(cfg).eval()
  hf_model.save_pretrained(tmp)
  return hf_model, models.from_pretrained(tmp)


def make_prompts(num: int, rng: np.random.Generator, lo: int = 8, hi: int = 32, vocab=VOCAB):
  return [rng.integers(1, vocab, size=int(n)).tolist() for n in rng.integers(lo, hi + 1, num)]


def hf_generate(hf_model, prompts, max_new: int) -> tuple[float, int]:
  """Seconds and new tokens for one left-padded batched greedy `generate`."""
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :] = torch.tensor(p)
    mask[i, width - len(p) :] = 1
  gen = transformers.GenerationConfig(
    do_sample=False, max_new_tokens=max_new, eos_token_id=None, pad_token_id=0, bos_token_id=None
  )
  start = time.perf_counter()
  with torch.inference_mode():
    out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
  seconds = time.perf_counter() - start
  return seconds, int(out[:, width:].numel())


def ours(engine, params, prompts, max_new, mode="continuous") -> tuple[float, int, driver.Result]:
  res = driver.run(engine, params, prompts, max_new_tokens=max_new, mode=mode)
  return res.stats.wall_time_s, sum(s.length for s in res.samples), res


def engine_vs_transformers(hf_model, model, batch: int, new: int, rng, repeats: int) -> float:
  prompts = make_prompts(batch, rng)
  cfg = engine_lib.EngineConfig(
    num_slots=batch, max_prompt_len=32, max_new_tokens=new, steps_per_call=32
  )
  engine, params = engine_lib.Engine.from_model(model, cfg)
  ours(engine, params, prompts, new)  # compile
  hf_generate(hf_model, prompts[:2], 4)  # torch warm-up
  t_ours = min(ours(engine, params, prompts, new)[0] for _ in range(repeats))
  t_hf = min(hf_generate(hf_model, prompts, new)[0] for _ in range(repeats))
  tokens = batch * new
  ratio = t_hf / t_ours
  print(
    f"batch {batch:3d} x {new:3d} new: fipo_jax {tokens / t_ours:8.1f} tok/s, "
    f"transformers {tokens / t_hf:8.1f} tok/s, ratio {ratio:.2f}x (target >= 2x)"
  )
  return ratio


def continuous_vs_static(model, num_requests: int, slots: int, max_new: int, rng) -> float:
  """Long-tailed budgets (Pareto): most responses short, a few hit the cap."""
  budgets = np.minimum(8 + rng.pareto(1.1, num_requests) * 12, max_new).astype(int).tolist()
  prompts = make_prompts(num_requests, rng, vocab=model.cfg.vocab_size)
  cfg = engine_lib.EngineConfig(
    num_slots=slots, max_prompt_len=32, max_new_tokens=max_new, steps_per_call=16
  )
  engine, params = engine_lib.Engine.from_model(model, cfg)
  results = {}
  for mode in driver.MODES:
    ours(engine, params, prompts, budgets, mode)  # compile every bucket this mode uses
    results[mode] = ours(engine, params, prompts, budgets, mode)
  (t_c, n_c, r_c), (t_s, n_s, r_s) = results["continuous"], results["static"]
  assert n_c == n_s == sum(budgets)
  ratio = t_s / t_c
  print(
    f"{num_requests} requests on {slots} slots, budgets median {int(np.median(budgets))} "
    f"max {max(budgets)}: continuous {n_c / t_c:8.1f} tok/s "
    f"(utilisation {r_c.stats.slot_utilisation:.0%}), static {n_s / t_s:8.1f} tok/s "
    f"(utilisation {r_s.stats.slot_utilisation:.0%}), ratio {ratio:.2f}x (target >= 1.5x)"
  )
  return ratio


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="Smaller shapes (smoke check).")
  parser.add_argument("--repeats", type=int, default=2, help="Timed runs per case (min taken).")
  parser.add_argument("--preset", help="Random-weight models.PRESETS entry: engine-only run.")
  parser.add_argument("--dtype", default="float32", help="Compute dtype for --preset.")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  if args.preset:
    preset_run(args.preset, args.dtype, rng)
    return
  with tempfile.TemporaryDirectory() as tmp:
    hf_model, model = build_models(tmp)
  cases = [(16, 64)] if args.quick else [(16, 64), (64, 256)]
  ratios = [engine_vs_transformers(hf_model, model, b, t, rng, args.repeats) for b, t in cases]
  if args.quick:
    cb = continuous_vs_static(model, 48, 8, 128, rng)
  else:
    cb = continuous_vs_static(model, 128, 16, 256, rng)
  print(
    f"summary: engine/transformers {', '.join(f'{r:.2f}x' for r in ratios)}; "
    f"continuous/static {cb:.2f}x"
  )


def preset_run(name: str, dtype: str, rng) -> None:
  """Engine-only numbers for a full-size architecture (no transformers baseline on GPU here)."""
  import jax  # noqa: PLC0415

  model = models.init_model(models.get_preset(name, dtype=dtype), seed=0)
  print(f"{name} ({dtype}) on {jax.devices()[0].device_kind}")
  for batch, new in ((16, 64), (64, 256)):
    prompts = make_prompts(batch, rng, vocab=model.cfg.vocab_size)
    cfg = engine_lib.EngineConfig(
      num_slots=batch, max_prompt_len=32, max_new_tokens=new, steps_per_call=32
    )
    engine, params = engine_lib.Engine.from_model(model, cfg)
    ours(engine, params, prompts, new)  # compile
    t = ours(engine, params, prompts, new)[0]
    print(f"batch {batch:3d} x {new:3d} new: fipo_jax {batch * new / t:8.1f} tok/s")
  continuous_vs_static(model, 128, 32, 256, rng)


if __name__ == "__main__":
  main()
