"""RL-step wall time with partial rollouts (rollout.mode='partial') against sync, long-tailed.

  python benchmarks/async_rollout.py           # CPU, a few minutes
  python benchmarks/async_rollout.py --quick   # smaller shapes, a smoke check
  python benchmarks/async_rollout.py --disaggregated   # and stage B: sampler and trainer devices

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

--disaggregated adds stage B on two host devices (one trains, one samples, the weights staged
device to device as rollout.mode='disaggregated' does), eta 1, two schedules: 'alternating'
(sample, update, stage, repeat: stage A's schedule on split devices) and 'overlapped' (after
the update, an overlap round of C decode calls with the batch's weights, rollout.overlap_calls;
C defaults to what the alternating run measures: (update + staging) / decode-call time). Each
phase is timed alone (the update and the staging are waited for before the overlap round),
since both meshes share this host's cores and wall time proves nothing. From the phases it
prints each mesh's device-busy share and the step time projected for hardware where the meshes
do not share cores: alternating = sample + update + stage + rest; overlapped = max(update +
stage, overlap decode) + the sampling left + rest. The JSON line gains `stage_b` and
`projected_overlapped_over_alternating`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--disaggregated" in sys.argv and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  # before jax is imported: a trainer device and a sampler device (stage B)
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax import models, sharding  # noqa: E402
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


def _forced(engine, params, sampling, sizes: dict, seed: int, step: int, stream: str
            ) -> ForcedLengths:
  return ForcedLengths(engine, params, sampling, (), sizes["cap"], sizes["n"], seed, step,
                       refill_fraction=0.125, stream=stream)


def run_stage_b(name: str, calls: int, sizes: dict, engine, params, update, seed: int) -> dict:
  """Stage A's schedule (eta) with the sampler `engine` on its own device and `params` (the
  trainer's) on another; `calls` > 0: an overlap round after each update. Each phase is timed
  alone. Means over `steps` steps after `warmup` that compiled nothing (at most 3x as many)."""
  draw, carry = _draw(sizes, np.random.default_rng(seed)), partial.Carry()
  sampling = params_lib.Sampling(temperature=1.0)
  current = engine.load_params(params)  # version 0 on the sampler's device
  timed, step = [], 0
  while len(timed) < sizes["steps"] and step < sizes["warmup"] + 3 * sizes["steps"]:
    before, t = _COMPILES[0], [time.perf_counter()]
    res = carry.step(_forced(engine, current, sampling, sizes, seed, step, "sampling"), _score,
                     draw, step=step, eta=sizes["eta"], n=sizes["n"],
                     train_batch_size=sizes["train"], gen_batch_size=sizes["gen"],
                     max_num_gen_batches=0, min_prompts=1)
    t.append(time.perf_counter())
    ids = _batch(res.groups, sizes)
    t.append(time.perf_counter())
    params = jax.block_until_ready(update(params, ids))  # the trainer's device
    t.append(time.perf_counter())
    staged = jax.block_until_ready(engine.load_params(params))  # trainer -> sampler device
    t.append(time.perf_counter())
    ov = None
    if calls:
      ov = carry.overlap(_forced(engine, current, sampling, sizes, seed, step,
                                 "overlap_sampling"), _score, draw, step=step, eta=sizes["eta"],
                         n=sizes["n"], gen_batch_size=sizes["gen"], calls=calls)
    t.append(time.perf_counter())
    current = staged
    st = res.sampler_stats
    phases = dict(zip(("sample", "rest", "update", "stage", "overlap"), np.diff(t), strict=True))
    phases |= {"overlap_calls": ov.num_generate_calls if ov else 0,
               "sample_calls": sum(x.num_generate_calls for x in st)}
    clean = _COMPILES[0] == before
    if step >= sizes["warmup"] and clean:
      timed.append(phases)
    note = "warm-up" if step < sizes["warmup"] else ("timed" if clean else "compiled: left out")
    print(f"{name:11s} step {step:2d} ({note}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()), flush=True)
    step += 1
  if not timed:
    raise RuntimeError(f"{name}: every step compiled; raise --warmup")
  return {k: float(np.mean([p[k] for p in timed])) for k in timed[0]}


def stage_b_summary(alt: dict, ov: dict, calls: int, suggested: int) -> dict:
  """Device-busy shares and projected step times of both schedules from their phase times."""
  train = lambda p: p["update"] + p["stage"]  # the trainer's devices (staging's hop 1 there)
  step_alt = alt["sample"] + train(alt) + alt["rest"]
  step_ov = max(train(ov), ov["overlap"]) + ov["sample"] + ov["rest"]
  return {
    "alternating": alt, "overlapped": ov, "overlap_calls": calls,
    "suggested_overlap_calls": suggested,
    "decode_call_s": ov["overlap"] / max(ov["overlap_calls"], 1),
    "projected_step_s": {"alternating": step_alt, "overlapped": step_ov},
    "busy_share": {
      "alternating": {"sampler": alt["sample"] / step_alt, "trainer": train(alt) / step_alt},
      "overlapped": {"sampler": (ov["sample"] + ov["overlap"]) / step_ov,
                     "trainer": train(ov) / step_ov}},
  }


def stage_b(sizes: dict, cfg, model, overlap_calls: int | None) -> dict:
  """Both stage-B schedules on devices 0 (trainer) and 1 (sampler); their summary."""
  trainer_dev, sampler_dev = jax.devices()[:2]
  ecfg = engine_lib.EngineConfig(num_slots=sizes["slots"],
                                 max_prompt_len=sizes["prompt"] + sizes["cap"],
                                 max_new_tokens=sizes["cap"], steps_per_call=16,
                                 insert_bucket="prefix")  # fmt: skip
  engine = engine_lib.Engine(cfg, nnx.split(model)[0], ecfg,
                             mesh=sharding.make_mesh(1, 1, 1, devices=[sampler_dev]))
  params = jax.device_put(nnx.split(model)[1], trainer_dev)
  update = _update_fn(nnx.split(model)[0], sizes)
  alt = run_stage_b("alternating", 0, sizes, engine, params, update, seed=0)
  decode_call = alt["sample"] / max(alt["sample_calls"], 1)  # prefills and scoring included
  suggested = max(1, math.ceil((alt["update"] + alt["stage"]) / decode_call))
  calls = overlap_calls or suggested
  ov = run_stage_b("overlapped", calls, sizes, engine, params, update, seed=0)
  out = stage_b_summary(alt, ov, calls, suggested)
  p, b = out["projected_step_s"], out["busy_share"]
  print(f"stage B (1 trainer + 1 sampler device of this host; they share its cores, so wall "
        f"time proves nothing: phases timed alone, step times projected for meshes that do not "
        f"share cores): update {alt['update']:.3f} s + staging {alt['stage']:.3f} s vs decode "
        f"call {out['decode_call_s']:.3f} s -> overlap_calls about {suggested} (ran {calls}); "
        f"projected step: alternating {p['alternating']:.2f} s (busy: sampler "
        f"{b['alternating']['sampler']:.0%}, trainer {b['alternating']['trainer']:.0%}), "
        f"overlapped {p['overlapped']:.2f} s (busy: sampler {b['overlapped']['sampler']:.0%}, "
        f"trainer {b['overlapped']['trainer']:.0%}): "
        f"{p['alternating'] / p['overlapped']:.2f}x", flush=True)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="smaller shapes: a smoke check")
  ap.add_argument("--eta", type=int, default=None, help="rollout.max_staleness of 'partial'")
  ap.add_argument("--warmup", type=int, default=None, help="untimed steps per mode")
  ap.add_argument("--gen", type=int, default=None, help="groups per round (default 4 x train)")
  ap.add_argument("--disaggregated", action="store_true",
                  help="also stage B: device-busy shares and projected step times")
  ap.add_argument("--overlap-calls", type=int, default=None,
                  help="stage B's overlap round (default: the measured suggestion)")
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
  if args.disaggregated:
    summary["stage_b"] = stage_b(sizes, cfg, model, args.overlap_calls)
    p = summary["stage_b"]["projected_step_s"]
    summary["projected_overlapped_over_alternating"] = p["alternating"] / p["overlapped"]
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
