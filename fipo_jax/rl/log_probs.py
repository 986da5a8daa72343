"""Stage 2 of an RL step: the old (and, with the KL term, the reference) log-probs of the
step's mini-batches, before any update (as verl), with the sampler-trainer mismatch metrics.

`compute(rc, env, steps, state, batches, metrics) -> (batches, response tokens)`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax.algo import rollout_correction
from fipo_jax.rl import partial_sampling, sampler_policy, setup
from fipo_jax.rl import steps as steps_lib


def compute(rc: config_lib.RunConfig, env: setup.Env, steps: steps_lib.CompiledSteps,
            state: setup.TrainState, batches: list[steps_lib.Batch],
            metrics: dict[str, Any]) -> tuple[list[steps_lib.Batch], float]:
  """The step's old log-probs and, with the KL term, the reference's (same jitted pass).

  The batches arrive with the sampler's log-probs as old_log_probs. The actor's pass (before
  any update of the step, as verl) runs when `sampler_policy.metrics_due`: always with
  rl.old_log_prob_source='trainer' (its log-probs replace the sampler's), every
  rl.mismatch_metrics_every steps with 'sampler' (metrics only). Adds the entropy (when the
  pass ran), the mismatch metrics and timings to `metrics`.
  Returns (the batches, the response tokens of all of them)."""
  t0 = time.perf_counter()
  out, tokens = batches, 0.0
  for b in batches:
    tokens += jnp.sum(b.response_mask)
  tokens = float(tokens)
  if sampler_policy.metrics_due(rc.rl, state.step):
    out = _old_log_probs(rc, steps, state.params, batches, metrics, tokens)
  metrics["timing_s/old_log_prob"] = time.perf_counter() - t0
  if env.ref_params is not None:  # the KL term: the frozen reference
    t1 = time.perf_counter()
    out = [b.replace(ref_log_probs=steps.log_prob(env.ref_params, b)[0]) for b in out]
    metrics["timing_s/ref"] = time.perf_counter() - t1
  return out, tokens


def _old_log_probs(rc: config_lib.RunConfig, steps: steps_lib.CompiledSteps, params: nnx.State,
                   batches: list[steps_lib.Batch], metrics: dict[str, Any], tokens: float
                   ) -> list[steps_lib.Batch]:
  """The actor's pass over the batches: entropy, mismatch metrics against the sampler's
  log-probs, and with rl.old_log_prob_source='trainer' its old log-probs (and rl.rollout_is's
  weights) in the batches."""
  rl = rc.rl
  out, ent_sum, stats = [], 0.0, []
  mode, threshold = partial_sampling.correction(rc)  # partial mode: the staleness correction
  for b in batches:
    old_lp, ent = steps.log_prob(params, b)
    weights, st = rollout_correction.correct(old_lp, b.old_log_probs, b.response_mask,
                                             mode=mode, threshold=threshold)
    stats.append(st)
    ent_sum += jnp.sum(ent * b.response_mask)
    if rl.old_log_prob_source == "trainer":
      b = b.replace(old_log_probs=old_lp, rollout_is_weights=weights)
    out.append(b)
  metrics["actor/entropy"] = float(ent_sum / max(tokens, 1.0))
  stats = jax.device_get(stats)
  metrics.update(rollout_correction.combine(stats, mode=mode))
  if rc.rollout.carries:
    metrics.update(partial_sampling.correction_metrics(stats, mode))
  return out
