"""RL-step wall time with partial rollouts (rollout.mode='partial') against sync, long-tailed.

  python benchmarks/async_rollout.py           # CPU, a few minutes
  python benchmarks/async_rollout.py --quick   # smaller shapes, a smoke check

The workload: groups of n = 8 responses whose lengths are log-normal (median 30, sigma 1, cap
512), forced through per-request budgets on a tiny random model without EOS (every response
is exactly its length); a third of the groups fail the DAPO filter. Each RL step samples until
train groups pass (rounds of gen = 4 x train groups, the FIPO recipe's ratio; the real engine
and continuous batching, through the scheduler of fipo_jax/rl/partial.py), then runs one
jitted update whose cost follows the batch's real tokens (gradient of their log-probs packed
end to end into a fixed buffer, an SGD step), so the next step samples with new weights.
Partial gains twice: the step stops waiting for the long tail, and passing groups beyond the
batch carry over instead of being discarded (sync discards them, as verl's DAPO does); the
sampled tokens per step are printed for both. 'sync' is the scheduler with eta = 0 (every
round runs to its end; the trainer test pins that to the synchronous run bit for bit);
'partial' stops each step once its batch is full, and the unfinished groups resume at the next
step by re-prefilling their prefixes (a real cost, included). Each mode runs warm-up steps,
then is timed over steps that compiled nothing (a resumed prefix brings new prefill shapes for
the first steps; steps that compiled are printed and left out, both modes alike).

The last line of stdout is one JSON object: partial_over_sync (mean sync RL-step time over mean
partial RL-step time, steps that compiled left out; target >= 1.3),
partial_over_sync_with_compiles (the same over every step after the warm-up), the ratio for the
sampling phase alone, the step times, and the partial run's staleness (max lag, dropped stale
groups).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax import models  # noqa: E402
from fipo_jax.models import logprob  # noqa: E402
from fipo_jax.rl import partial, partial_sampling  # noqa: E402
from fipo_jax.sampling import engine as engine_lib  # noqa: E402
from fipo_jax.sampling import params as params_lib  # noqa: E402

# gen = 4 x train, as the FIPO recipe's rl.gen_batch_size / rl.train_batch_size (2048 / 512).
FULL = {"n": 8, "train": 4, "gen": 16, "slots": 32, "cap": 512, "median": 30, "sigma": 1.0,
        "prompt": 16, "warmup": 3, "steps": 5, "eta": 1, "row": 512}  # fmt: skip
QUICK = {**FULL, "train": 2, "gen": 4, "slots": 8, "cap": 32, "median": 8, "warmup": 4,
         "steps": 2, "row": 64}  # fmt: skip
VOCAB = 256
_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
  lambda event, _, **kw: _COMPILES.__setitem__(0, _COMPILES[0] + ("backend_compile" in event))
)


class ForcedLengths(partial_sampling.EngineBackend):
  """Every response's budget is its drawn length (no EOS: it stops exactly there)."""

  def budget(self, group: partial.Group, sample: int) -> int:
    return int(group.example["lengths"][sample])


def _score(groups) -> None:
  for g in groups:
    g.scored, g.keep = None, g.example["id"] % 3 != 2


def _draw(sizes: dict, rng: np.random.Generator):
  counter = iter(range(10**9))

  def draw(k: int) -> list[dict]:
    out = []
    for _ in range(k):
      lengths = rng.lognormal(math.log(sizes["median"]), sizes["sigma"], sizes["n"])
      out.append({"id": next(counter), "lengths": np.clip(lengths, 2, sizes["cap"]).astype(int),
                  "prompt_ids": rng.integers(1, VOCAB, sizes["prompt"]).astype(np.int32)})
    return out

  return draw


def _rows(sizes: dict) -> int:
  """Rows of the update's packed buffer: the batch's expected real tokens (prompt + mean
  log-normal length per response) in rows of `row` tokens, rounded up."""
  mean = min(sizes["cap"], sizes["median"] * math.exp(sizes["sigma"] ** 2 / 2))
  return math.ceil(sizes["train"] * sizes["n"] * (sizes["prompt"] + mean) / sizes["row"])


def _update_fn(graphdef, sizes: dict):
  """A training-like update whose cost follows the batch's real tokens, as the trainer's packed
  layout does: the gradient of the mean log-prob of the batch's tokens packed end to end into
  a fixed [rows, row] buffer (the shape never changes), then an SGD step."""

  def loss(params, ids):
    model = nnx.merge(graphdef, params)
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s)[None, :], (b, s))
    lp = logprob.sequence_log_probs(model, ids, jnp.ones_like(ids), positions,
                                    num_response_tokens=s - 1)
    return -jnp.mean(lp)

  def update(params, ids):
    grads = jax.grad(loss)(params, ids)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  return jax.jit(update)


def _batch(groups: list[partial.Group], sizes: dict) -> np.ndarray:
  """The batch's prompt + response tokens end to end in the update's [rows, row] buffer
  (tokens past its end are left out, a shortfall stays 0)."""
  flat = np.concatenate([np.concatenate([g.example["prompt_ids"], r.tokens])
                         for g in groups for r in g.requests])  # fmt: skip
  buf = np.zeros(_rows(sizes) * sizes["row"], np.int32)
  buf[: min(flat.size, buf.size)] = flat[: buf.size]
  return buf.reshape(-1, sizes["row"])


def run_mode(name: str, eta: int, sizes: dict, engine, params, update, seed: int) -> dict:
  """`warmup` RL steps, then steps until `steps` of them compiled nothing (at most 3x as many):
  the mean times of those, their max lag, the stale groups dropped, the steps left out."""
  rng = np.random.default_rng(seed)
  draw, carry = _draw(sizes, rng), partial.Carry()
  sampling = params_lib.Sampling(temperature=1.0)
  times, lags, dropped, compiled, every = [], [], 0, 0, []
  step = 0
  while len(times) < sizes["steps"] and step < sizes["warmup"] + 3 * sizes["steps"]:
    before = _COMPILES[0]
    t0 = time.perf_counter()
    backend = ForcedLengths(engine, params, sampling, (), sizes["cap"], sizes["n"], seed, step,
                            refill_fraction=0.125)
    res = carry.step(backend, _score, draw, step=step, eta=eta, n=sizes["n"],
                     train_batch_size=sizes["train"], gen_batch_size=sizes["gen"],
                     max_num_gen_batches=0, min_prompts=1)
    t_sample = time.perf_counter() - t0
    tokens = sum(st.tokens_generated for st in res.sampler_stats)
    params = jax.block_until_ready(update(params, _batch(res.groups, sizes)))
    t_step = time.perf_counter() - t0
    m = res.metrics
    clean = _COMPILES[0] == before
    note = "warm-up" if step < sizes["warmup"] else ("timed" if clean else "compiled: left out")
    if step >= sizes["warmup"]:
      compiled += not clean
      every.append(t_step)
      if clean:
        times.append((t_step, t_sample, tokens))
        lags.append(m["rollout/staleness_max"])
        dropped += m["rollout/dropped_stale_groups"]
    print(f"{name:7s} step {step:2d} ({note}): {t_step:6.2f} s (sampling {t_sample:5.2f} s, "
          f"{tokens} tokens), "
          f"staleness max {m['rollout/staleness_max']:.0f}, carried {m['rollout/carried_groups']}"
          f", dropped {m['rollout/dropped_stale_groups']}, in flight "
          f"{m['rollout/in_flight_groups']}", flush=True)
    step += 1
  if not times:
    raise RuntimeError(f"{name}: every step compiled; raise --warmup")
  return {"step_s": float(np.mean([t[0] for t in times])),
          "sampling_s": float(np.mean([t[1] for t in times])),
          "sampled_tokens": float(np.mean([t[2] for t in times])), "timed_steps": len(times),
          "staleness_max": max(lags), "dropped_stale_groups": dropped,
          "steps_left_out_compiling": compiled, "step_s_with_compiles": float(np.mean(every)),
          "steps_after_warmup": len(every)}  # fmt: skip


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="smaller shapes: a smoke check")
  ap.add_argument("--eta", type=int, default=None, help="rollout.max_staleness of 'partial'")
  ap.add_argument("--warmup", type=int, default=None, help="untimed steps per mode")
  ap.add_argument("--gen", type=int, default=None, help="groups per round (default 4 x train)")
  args = ap.parse_args()
  sizes = dict(QUICK if args.quick else FULL)
  for key in ("eta", "warmup", "gen"):
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  cfg = models.ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=16,
                           max_position_embeddings=4096)  # fmt: skip
  model = models.init_model(cfg, seed=0)
  # insert_bucket as rollout.mode=partial's engine (one insert shape per prefill shape)
  ecfg = engine_lib.EngineConfig(num_slots=sizes["slots"],
                                 max_prompt_len=sizes["prompt"] + sizes["cap"],
                                 max_new_tokens=sizes["cap"], steps_per_call=16,
                                 insert_bucket="prefix")  # fmt: skip
  engine, params = engine_lib.Engine.from_model(model, ecfg)
  update = _update_fn(nnx.split(model)[0], sizes)
  out = {name: run_mode(name, eta, sizes, engine, params, update, seed=0)
         for name, eta in (("sync", 0), ("partial", sizes["eta"]))}
  sync, part = out["sync"], out["partial"]
  summary = {
    "partial_over_sync": sync["step_s"] / part["step_s"],
    "partial_over_sync_with_compiles": sync["step_s_with_compiles"] / part["step_s_with_compiles"],
    "sampling_partial_over_sync": sync["sampling_s"] / part["sampling_s"],
    "sync_step_s": sync["step_s"], "partial_step_s": part["step_s"], "eta": sizes["eta"],
    "sync": sync, "partial": part, "sizes": sizes,
  }
  print(f"RL step: sync {sync['step_s']:.2f} s, partial (eta {sizes['eta']}) "
        f"{part['step_s']:.2f} s: partial_over_sync {summary['partial_over_sync']:.2f}x "
        f"(target >= 1.3); sampling alone {summary['sampling_partial_over_sync']:.2f}x; "
        f"sampled tokens per step: sync {sync['sampled_tokens']:.0f}, partial "
        f"{part['sampled_tokens']:.0f}; with the steps that compiled "
        f"{summary['partial_over_sync_with_compiles']:.2f}x (steps compiling after warm-up: sync "
        f"{sync['steps_left_out_compiling']} of {sync['steps_after_warmup']}, partial "
        f"{part['steps_left_out_compiling']} of {part['steps_after_warmup']})")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
