"""One mini-batch update (forward, backward, FIPO loss) packed vs padded, in the same run.

  python benchmarks/packing.py [--layers 4 --hidden 256 --prompt 256 --response 1792
                                --batch 16 --repeats 3 --means 0.3 0.5]

The trainer's own code on both sides: `packing.pack_rollouts` + `steps.train_step` on the padded
layout (rows of P + T tokens, one sequence each; verl's token budget of one full sequence per
device per micro-batch means one row per micro-batch) against the same on the packed layout
(packed rows of the same budget, token-budget micro-batches). Lengths follow the paper's shape
scaled to the CPU: prompts 5-15% of P, responses log-normal with a mean of `--means` x T (sigma
0.6) and a tail clipped at T. Per case it prints the useful-token fraction of each layout (real
tokens / tokens the model runs on), the ideal speedup (padded tokens / packed tokens) and the
measured one (padded time / packed time, best of `--repeats` alternating calls after a compile
run).
The last line is JSON:
{"cases": [{"mean": ..., "useful_padded", "useful_packed", "ideal_speedup", "speedup"}, ...]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax import models  # noqa: E402
from fipo_jax.algo import advantages as adv_lib  # noqa: E402
from fipo_jax.algo import losses as losses_lib  # noqa: E402
from fipo_jax.rl import packing, steps  # noqa: E402


@dataclasses.dataclass
class _Rollouts:
  """What packing.pack_rollouts reads."""

  prompt_ids: list
  response_ids: list
  response_logprobs: list

  def __len__(self):
    return len(self.response_ids)


def sample_lengths(rng, m: int, p: int, t: int, mean: float) -> tuple[np.ndarray, np.ndarray]:
  """Prompt lengths 5-15% of p; response lengths log-normal, mean `mean` x t, clipped to t."""
  prompts = rng.integers(max(1, int(0.05 * p)), max(2, int(0.15 * p)) + 1, m)
  sigma = 0.6
  mu = np.log(mean * t) - sigma**2 / 2  # log-normal with this mean
  responses = np.clip(np.round(rng.lognormal(mu, sigma, m)), 1, t).astype(np.int64)
  return prompts, responses


def make_rollouts(rng, m: int, p: int, t: int, mean: float, vocab: int) -> _Rollouts:
  plen, rlen = sample_lengths(rng, m, p, t, mean)
  ids = lambda n: rng.integers(1, vocab, n).astype(np.int32)
  return _Rollouts(
    [ids(n) for n in plen],
    [ids(n) for n in rlen],
    [-rng.random(n).astype(np.float32) for n in rlen],
  )


def timed_pair(fns, repeats: int) -> list[float]:
  """Best wall time of each fn() after one compile/warm-up call each, timed in alternation so a
  burst of load from another process hurts both sides alike."""
  for fn in fns:
    jax.block_until_ready(fn())
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def jitted_update(args, graphdef):
  """The trainer's update (FIPO loss, AdamW) as one jitted fn(params, opt, batch) and its
  optimizer: one for every case, so a case whose layout has a shape already seen (the padded
  one: always m x (P + T)) reuses that compile."""
  loss_cfg = losses_lib.PolicyLossConfig(chunk_size=min(128, args.response))
  cfg = steps.UpdateConfig(
    policy_loss=loss_cfg, num_micro_batches=args.batch, logprob_chunk_size=512
  )
  tx = optax.adamw(1e-6)
  return jax.jit(functools.partial(steps.train_step, graphdef, cfg=cfg, tx=tx)), tx


def run_case(args, fn, params, opt, mean: float, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  m, p, t = args.batch, args.prompt, args.response
  r = make_rollouts(rng, m, p, t, mean, args.vocab)
  adv = adv_lib.grpo_outcome_advantages(
    rng.choice([-1.0, 1.0], m).astype(np.float32), np.arange(m) // 4
  )
  budget = p + t  # verl's ppo_max_token_len_per_gpu = P + T in the recipes

  def pack(layout):
    return packing.pack_rollouts(
      r.prompt_ids,
      r.response_ids,
      r.response_logprobs,
      adv,
      mini=m,
      max_prompt_length=p,
      max_response_length=t,
      layout=layout,
      pad_id=0,
    )

  padded = pack(packing.Layout(budget, m, 1, padded=True)).batches[0]
  padded = steps.Batch(**{k: jnp.asarray(v) for k, v in padded.items()})
  out = pack(packing.Layout(budget, None, 1))
  packed = steps.Batch(**{k: jnp.asarray(v) for k, v in out.batches[0].items()})
  (plan,), shape = out.plans, out.shape

  step = lambda batch: lambda: fn(params, opt, batch)[2]["actor/loss"]
  t_pad, t_pack = timed_pair([step(padded), step(packed)], args.repeats)

  real = float(plan.lengths.sum())
  padded_tokens = m * budget
  # Padding micro-batches (bucket rounding) are skipped at run time: count the ones used.
  packed_tokens = plan.num_micro * shape.num_shards * shape.rows * shape.row_len
  case = {
    "mean": mean,
    "useful_padded": real / padded_tokens,
    "useful_packed": real / packed_tokens,
    "ideal_speedup": padded_tokens / packed_tokens,
    "speedup": t_pad / t_pack,
    "padded_s": t_pad,
    "packed_s": t_pack,
    "micro_batches": {"padded": m, "packed": plan.num_micro, "packed_bucket": shape.num_micro},
  }
  print(
    f"mean response {mean:.0%} of T: useful tokens padded {case['useful_padded']:.1%}, "
    f"packed {case['useful_packed']:.1%}; micro-batches {m} padded, {plan.num_micro} packed "
    f"(bucket {shape.num_micro}); update {t_pad:.2f} s padded, {t_pack:.2f} s packed; "
    f"ideal speedup {case['ideal_speedup']:.2f}x, measured {case['speedup']:.2f}x "
    f"({case['speedup'] / case['ideal_speedup']:.0%} of ideal)",
    flush=True,
  )
  return case


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--mlp", type=int, default=768)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--prompt", type=int, default=256, help="P, max prompt tokens")
  ap.add_argument("--response", type=int, default=1792, help="T, max response tokens")
  ap.add_argument("--batch", type=int, default=16, help="sequences in the mini-batch")
  ap.add_argument("--block", type=int, default=256, help="attention block size")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--means", type=float, nargs="+", default=[0.3, 0.5])
  args = ap.parse_args(argv)

  cfg = models.ModelConfig(
    model_type="qwen2",
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.mlp,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.hidden // args.heads,
    attention_impl="blockwise",
    attention_block_size=args.block,
    remat_policy="full",
  )
  graphdef, params = nnx.split(models.init_model(cfg, seed=0))
  print(
    f"model: {args.layers} layers, d {args.hidden}, vocab {args.vocab}, "
    f"{models.count_params(params) / 1e6:.1f}M params; P + T = {args.prompt} + "
    f"{args.response}, {args.batch} sequences; jax {jax.__version__} on "
    f"{jax.devices()[0].platform} x{jax.device_count()}",
    flush=True,
  )
  fn, tx = jitted_update(args, graphdef)
  opt = tx.init(params)
  cases = [run_case(args, fn, params, opt, mean, seed=i) for i, mean in enumerate(args.means)]
  print(json.dumps({"cases": cases}))


if __name__ == "__main__":
  main()
