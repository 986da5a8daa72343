"""The RL step's training half with old log-probs from the trainer vs from the sampler, one run.

  python benchmarks/old_log_probs.py [--layers 4 --hidden 256 --response 128 --n 8
                                      --prompts 8 --mini 2 --repeats 3] [--quick]

The trainer's own code on both sides (fipo_jax.rl.trainer): one rollout batch is collected
once (`rollout.collect`, a random tiny_cpu-shaped model on the synthetic copy task, dynamic
sampling off so every group is kept), then the step's training half, `_log_probs` +
`_updates` (old-log-prob pass, mismatch metrics, every mini-batch update), is timed with
rl.old_log_prob_source='trainer' (today: a forward pass over the batch first) and 'sampler'
(the engine's log-probs, no pass; rl.mismatch_metrics_every=0), alternating, best of
`--repeats` after a compile run, each from a copy of the same params. The sampling time of the
collect is reported too, so the saving on a whole RL step follows. Last line, JSON:
{"trainer_s", "sampler_s" (best totals), "ratio" (sampler / trainer), "saving" (1 - ratio),
 "pass_s", "updates_s" (best of each part; "updates_s_by_source" per source), "pass_share"
 (pass / (pass + updates): the saving from the parts, steadier on a loaded host), "gen_s",
 "step_ratio" ((gen + sampler) / (gen + trainer)), "tokens", "updates"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny_cpu  # noqa: E402
from fipo_jax import config as config_lib  # noqa: E402
from fipo_jax import models  # noqa: E402
from fipo_jax.rl import log_probs, updates  # noqa: E402
from fipo_jax.rl import rollout as rollout_lib  # noqa: E402
from fipo_jax.rl import setup as setup_lib  # noqa: E402
from fipo_jax.rl import steps as steps_lib  # noqa: E402


def run_config(args) -> config_lib.RunConfig:
  """tiny_cpu with a bigger model and response budget, no warm start, no filtering."""
  c = tiny_cpu.get_config()
  o = c.model.overrides
  o.num_layers, o.hidden_size, o.intermediate_size = args.layers, args.hidden, 2 * args.hidden
  o.num_heads, o.num_kv_heads, o.head_dim = 4, 2, args.hidden // 4
  o.max_position_embeddings = 16 + args.response
  c.sft.steps = 0  # a random model answers with the full budget: T tokens per response
  c.eval_every = 0
  c.rl.filter_groups_enable = False  # all responses score alike: keep every group
  c.rl.n, c.rl.train_batch_size, c.rl.gen_batch_size = args.n, args.prompts, args.prompts
  c.rl.ppo_mini_batch_size = args.mini
  c.rl.max_response_length = args.response
  c.rl.overlong_buffer_len = args.response // 4
  c.rl.ppo_micro_batch_size_per_device = args.n * args.mini  # one micro-batch per mini-batch
  c.sampling.num_slots = args.n * args.prompts
  c.data.synthetic.num_train = 64
  return config_lib.validate(c, num_devices=jax.device_count())


def with_source(rc: config_lib.RunConfig, source: str) -> config_lib.RunConfig:
  rl = dataclasses.replace(rc.rl, old_log_prob_source=source, mismatch_metrics_every=0)
  return dataclasses.replace(rc, rl=rl)


def train_half(rc, env, steps, state, batches) -> tuple[float, float]:
  """One timed training half of an RL step, from a copy of `state` (the updates donate it).
  Returns (seconds of the old-log-prob part, seconds of the updates)."""
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  state = setup_lib.TrainState(copy(state.params), copy(state.opt_state), state.step)
  jax.block_until_ready(state.params)
  metrics: dict = {}
  t0 = time.perf_counter()
  logp_batches, _ = log_probs.compute(rc, env, steps, state, batches, metrics)
  jax.block_until_ready([b.old_log_probs for b in logp_batches])
  t1 = time.perf_counter()
  state, _ = updates.run(rc, env, steps, state, logp_batches, [])
  jax.block_until_ready(state.params)
  return t1 - t0, time.perf_counter() - t1


def measure(args) -> dict:
  rc = run_config(args)
  with tempfile.TemporaryDirectory() as workdir:
    env, state = setup_lib.build(rc, workdir)
    steps = steps_lib.jit_steps(env.graphdef, cfg=env.update_cfg, tx=env.tx,
                                param_sharding=env.param_sharding,
                                opt_sharding=env.opt_sharding)  # the trainer's own builder
    rollout_lib.collect(
      rc, env.train_sampler(), env.train_data, state.params, 0, mesh=env.mesh,
      update_cfg=env.update_cfg, pad_id=env.pad_id)  # compiles the sampler
    t0 = time.perf_counter()
    batches, collect_metrics = rollout_lib.collect(
      rc, env.train_sampler(), env.train_data, state.params, 0, mesh=env.mesh,
      update_cfg=env.update_cfg, pad_id=env.pad_id)
    gen_s = time.perf_counter() - t0
    tokens = float(sum(jnp.sum(b.response_mask) for b in batches))
    print(
      f"model: {args.layers} layers, d {args.hidden}, "
      f"{models.count_params(state.params) / 1e6:.2f}M params; {len(batches)} mini-batches, "
      f"{tokens:.0f} response tokens (T = {args.response}); sampling {gen_s:.2f} s; "
      f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}",
      flush=True,
    )
    rcs = {s: with_source(rc, s) for s in ("trainer", "sampler")}
    for s in rcs:  # compile runs
      train_half(rcs[s], env, steps, state, batches)
    runs = {s: [] for s in rcs}
    for _ in range(args.repeats):  # alternating, so a burst of load hurts both alike
      for s in rcs:
        runs[s].append(train_half(rcs[s], env, steps, state, batches))
  best = {s: min(a + b for a, b in r) for s, r in runs.items()}
  ratio = best["sampler"] / best["trainer"]
  pass_s = min(a for a, _ in runs["trainer"])
  upd = {s: min(b for _, b in r) for s, r in runs.items()}  # the same updates in both modes
  updates_s = min(upd.values())
  return {
    "trainer_s": best["trainer"],
    "sampler_s": best["sampler"],
    "ratio": ratio,
    "saving": 1.0 - ratio,
    "pass_s": pass_s,
    "updates_s": updates_s,
    "pass_share": pass_s / (pass_s + updates_s),  # the saving, from the parts' best times
    "updates_s_by_source": upd,
    "gen_s": gen_s,
    "step_ratio": (gen_s + best["sampler"]) / (gen_s + best["trainer"]),
    "tokens": tokens,
    "updates": len(batches) * rc.rl.ppo_epochs,
    "sampler_tokens_per_s": collect_metrics.get("perf/sampler_tokens_per_s"),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--response", type=int, default=128, help="T, max response tokens")
  ap.add_argument("--n", type=int, default=8, help="responses per prompt")
  ap.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
  ap.add_argument("--mini", type=int, default=2, help="prompts per mini-batch")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, 1 repeat")
  args = ap.parse_args(argv)
  if args.quick:
    args.layers, args.hidden, args.response, args.n, args.prompts = 1, 32, 8, 2, 2
    args.mini, args.repeats = 1, 1
  r = measure(args)
  print(
    f"old-log-prob pass {r['pass_s']:.3f} s, {r['updates']} updates {r['updates_s']:.3f} s "
    f"(best of each): the pass is {r['pass_share']:.0%} of the training half",
    flush=True,
  )
  print(
    f"training half of the RL step: trainer old log-probs {r['trainer_s']:.3f} s, sampler "
    f"old log-probs {r['sampler_s']:.3f} s: ratio {r['ratio']:.2f} (saving "
    f"{r['saving']:.0%}); whole step with sampling ({r['gen_s']:.2f} s): ratio "
    f"{r['step_ratio']:.2f}",
    flush=True,
  )
  print(json.dumps(r))


if __name__ == "__main__":
  main()
