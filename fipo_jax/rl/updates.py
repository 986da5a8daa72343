"""Stage 3 of an RL step: rl.ppo_epochs passes over the mini-batches, one optimizer update each,
and the step's influence dump (rl.dump_influence).

`run(rc, env, steps, state, batches, kept) -> (state, per-update metrics)` is `dispatch` (the
updates queued on the devices; returns at once, JAX dispatch being asynchronous) then `finish`
(waits for their metrics); the trainer runs the overlap round between the two.
`metrics(per_update) -> the step's actor metrics`, averaged as verl averages them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fipo_jax import config as config_lib
from fipo_jax import distributed
from fipo_jax.rl import rollout_dump as dump_lib
from fipo_jax.rl import setup
from fipo_jax.rl import steps as steps_lib


@dataclasses.dataclass
class Pending:
  """A step's dispatched updates: the state after them and each update's metrics, on device."""

  state: setup.TrainState
  per_mb: list[dict[str, Any]]
  dumps: list  # rc.dump_influence: each update's FIPO weights and log-ratios, before it


def run(rc: config_lib.RunConfig, env: setup.Env, steps: steps_lib.CompiledSteps,
        state: setup.TrainState, batches: list[steps_lib.Batch], kept: list
        ) -> tuple[setup.TrainState, list[dict[str, Any]]]:
  """rl.ppo_epochs passes over the mini-batches, one optimizer update each. With
  rc.dump_influence, each update's FIPO weights and log-ratios are taken first, and once more
  after the last update, for the step's dump (rl/rollout_dump.py).
  Returns (the state after the step, each update's metrics on the host)."""
  return finish(rc, env, dispatch(rc, env, steps, state, batches), batches, kept)


def dispatch(rc: config_lib.RunConfig, env: setup.Env, steps: steps_lib.CompiledSteps,
             state: setup.TrainState, batches: list[steps_lib.Batch]) -> Pending:
  """Queues `run`'s updates and returns without waiting for them (unless rc.dump_influence:
  the dump fetches each update's weights before the update)."""
  params, opt_state = state.params, state.opt_state
  per_mb, dumps = [], []
  for _ in range(rc.rl.ppo_epochs):
    for b in batches:
      if env.influence_fn is not None:
        dumps.append(distributed.fetch(env.influence_fn(params, b)))  # all hosts gather
      params, opt_state, m = steps.train(params, opt_state, b)
      per_mb.append(m)
  return Pending(setup.TrainState(params, opt_state, state.step + 1), per_mb, dumps)


def finish(rc: config_lib.RunConfig, env: setup.Env, pending: Pending,
           batches: list[steps_lib.Batch], kept: list
           ) -> tuple[setup.TrainState, list[dict[str, Any]]]:
  """Waits for `pending`'s updates: (the state after them, each update's metrics on the host);
  writes the step's influence dump."""
  per_mb = jax.device_get(pending.per_mb)
  if pending.dumps:
    _dump_influence(rc, env, pending.state, pending.dumps, batches, kept)
  return pending.state, per_mb


def metrics(per_mb: list[dict[str, Any]]) -> dict[str, Any]:
  """verl averages every actor metric over the step's updates; FIPO's influence weights and
  the PPO KL also per mini-batch (the weights are 1 on the first and move on the later ones)."""
  keys = per_mb[0].keys() if per_mb else []
  metrics: dict[str, Any] = {k: float(np.mean([float(m[k]) for m in per_mb])) for k in keys
                             if k != "train/skipped_step"}
  metrics["train/nonfinite_updates"] = int(sum(m["train/skipped_step"] for m in per_mb))
  for key in ("actor/influence_weights_mean_raw", "actor/influence_weights_mean", "actor/ppo_kl"):
    for i, m in enumerate(per_mb):
      if key in m:
        metrics[f"{key}/mb{i + 1}"] = float(m[key])
  return metrics


def _dump_influence(rc: config_lib.RunConfig, env: setup.Env, state: setup.TrainState, dumps,
                    batches, kept: list) -> None:
  """RL step `state.step`'s rollout dump (WORKDIR/rollout_data/{step}.jsonl and the .npz): the
  weights and log-ratios before each update (`dumps`) and after the last one."""
  after = [env.influence_fn(state.params, b) for b in batches]
  after, host_batches = distributed.fetch((after, batches))  # collective: every host calls it
  step = state.step
  if jax.process_index() != 0:
    return
  (rollouts, advantages), = kept
  dump_lib.write_step(env.workdir, step, before=dumps, after=after, batches=host_batches,
                          rollouts=rollouts, advantages=advantages, tokenizer=env.tokenizer,
                          max_rows=rc.dump_max_rows, loss_mode=rc.rl.loss_mode)
