"""The FIPO trainer loop (docs/fipo_spec.md §4): rollouts, advantages, updates, checkpoints.

`run(config, workdir)` is what `python -m fipo_jax.main` calls. Per RL step:

  sample gen_batch_size prompts x n -> rewards -> dynamic sampling (more rounds until
  train_batch_size prompts are kept) -> group advantages -> old log-probs (actor, jit)
  -> train_batch_size / ppo_mini_batch_size optimizer steps (jit, micro-batch accumulation)
  -> metrics (jsonl, TensorBoard, plots) -> checkpoint / eval.

The sampler reads the newest params after every optimizer step (no recompiles).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fipo_jax import checkpoints as ckpt_lib
from fipo_jax import config as config_lib
from fipo_jax import distributed, paths, seeds, sharding
from fipo_jax import metrics as metrics_lib
from fipo_jax import policy as policy_lib
from fipo_jax.rl import advantages as adv_lib
from fipo_jax.rl import evaluation, optimizer, warmstart
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.rl import setup as setup_lib
from fipo_jax.rl import train_step as ts
from fipo_jax.sampling import driver as driver_lib


class _StopRequested:
  """SIGTERM/SIGINT flag: the loop finishes the current step, checkpoints and exits cleanly."""

  def __init__(self):
    self.signum: int | None = None

  def __call__(self, signum, frame):  # noqa: ARG002
    logging.warning("signal %d received: finishing this step, then checkpoint and exit", signum)
    self.signum = signum

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        signal.signal(sig, self)
      except ValueError:  # not the main thread (e.g. a notebook worker)
        pass


class TrainingDiverged(RuntimeError):
  """Raised after `max_consecutive_bad_steps` non-finite updates in a row."""


class SetupError(RuntimeError):
  """Missing or unreadable data/model files found while building the run (before compiling)."""


def run(config, workdir: str, *, run_config: config_lib.RunConfig | None = None) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns last metrics."""
  rc = run_config or config_lib.validate(config)
  paths.makedirs(workdir)  # local or gs://: every write below goes through fipo_jax.paths
  stop = _StopRequested()
  stop.install()
  try:
    env = setup_lib.build(rc, workdir)
  except (OSError, ValueError) as e:  # data/tokenizer/model files: raised with their path
    raise SetupError(f"{type(e).__name__}: {e}") from e
  policy_lib.save_run_config(config, workdir)
  is_primary = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, is_primary=is_primary)
  ckpt = ckpt_lib.CheckpointManager(
    paths.join(workdir, "checkpoints"), keep=rc.keep_checkpoints, best_metric="eval/acc_mean"
  )

  params, opt_state, start_step, extra = env.params, env.opt_state, 0, {}
  restored = ckpt.restore_latest(params=params, opt_state=opt_state)
  if restored is not None:
    start_step, params, opt_state, extra = (
      restored.step, restored.params, restored.opt_state, restored.extra
    )
    env.train_data.set_state(extra["data_state"])
    writer.truncate_after(start_step)  # steps logged after the checkpoint are redone
    logging.warning("resumed from step %d", start_step)  # visible at the CLI's WARNING level
  elif rc.sft.steps > 0:
    params = warmstart.sft_warm_start(rc, env, params, workdir)
    # jit with the state's shardings: eager init would leave it on one device (one host).
    opt_state = jax.jit(env.tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, opt_state))(
      params)

  steps = ts.jit_steps(env.graphdef, cfg=env.update_cfg, tx=env.tx,
                       param_sharding=env.param_sharding,
                       opt_sharding=jax.tree.map(lambda x: x.sharding, opt_state))
  bad_steps = int(extra.get("consecutive_bad_steps", 0))
  skipped_total = int(extra.get("skipped_steps", 0))
  last: dict[str, Any] = {}
  if start_step == 0 and rc.eval_every > 0:
    last = evaluation.evaluate(rc, env, params, step=0)
    writer.write(0, last)

  bar = tqdm.tqdm(range(start_step, rc.total_steps), initial=start_step, total=rc.total_steps,
                  desc="fipo", unit="step", dynamic_ncols=True, disable=not is_primary)
  for step in bar:
    metrics, params, opt_state = rl_step(rc, env, steps, params, opt_state, step)
    # Non-finite updates count towards divergence; a step with no mixed group (nothing to
    # learn from after dynamic sampling) is only logged.
    skipped = int(metrics.pop("train/nonfinite_updates"))
    skipped_total += skipped
    bad_steps = bad_steps + 1 if skipped else 0
    metrics["train/skipped_steps"] = skipped_total
    metrics.update(env.train_data.metrics())
    done = step + 1
    evaluated = rc.eval_every > 0 and (done % rc.eval_every == 0 or done == rc.total_steps)
    if evaluated:
      metrics.update(evaluation.evaluate(rc, env, params, step=done))
    diverged = bad_steps >= rc.max_consecutive_bad_steps > 0
    if logs_step(rc, done, evaluated=evaluated, stopping=diverged or stop.signum is not None):
      writer.write(done, metrics)
      bar.set_postfix(metrics_lib.progress_postfix(writer.history))  # the last eval, not nan
    last = metrics
    want_ckpt = ((rc.checkpoint_every > 0 and done % rc.checkpoint_every == 0)
                 or done == rc.total_steps
                 or stop.signum is not None or diverged)
    if want_ckpt:
      ckpt.save(done, params=params, opt_state=opt_state, metrics=metrics, extra={
        "data_state": env.train_data.get_state(),
        "consecutive_bad_steps": bad_steps,
        "skipped_steps": skipped_total,
      })
    if diverged:
      ckpt.wait()
      raise TrainingDiverged(
        f"{bad_steps} consecutive steps with a non-finite loss or gradient (limit "
        f"max_consecutive_bad_steps={rc.max_consecutive_bad_steps}); the last good state is "
        f"checkpointed at step {done} in {workdir}/checkpoints"
      )
    if stop.signum is not None:
      logging.warning("stopping after step %d on signal %d (checkpoint written)", done, stop.signum)
      break
  ckpt.wait()
  ckpt.close()
  writer.close()
  bar.close()
  if is_primary:
    print(metrics_lib.outputs_summary(workdir, ckpt.directory), flush=True)
  return last


def logs_step(rc, done: int, *, evaluated: bool, stopping: bool) -> bool:
  """Whether RL step `done` (1-based) writes its metrics: every `log_every` steps, and always
  at an eval step, at the last step and at the step the run stops on (signal, divergence)."""
  return done % rc.log_every == 0 or evaluated or stopping or done == rc.total_steps


def rl_step(rc, env, steps: ts.CompiledSteps, params, opt_state, step: int):
  """One RL step: rollouts with dynamic sampling, old log-probs, mini-batch updates."""
  t0 = time.perf_counter()
  result, sampler_tokens, all_acc_mean, scored_here = _rollouts(rc, env, params, step)
  t_rollout = time.perf_counter() - t0
  metrics: dict[str, Any] = {"train/num_gen_batches": result.num_gen_batches}
  r = result.rollouts
  if len(r) == 0:
    logging.warning("step %d: no prompt group with mixed accuracy; update skipped", step)
    metrics.update({"train/nonfinite_updates": 0, "train/empty_steps": 1,
                    "timing_s/gen": t_rollout})
    return metrics, params, opt_state

  adv = adv_lib.grpo_outcome_advantages(
    r.scores, r.group_ids, norm_by_std=rc.rl.norm_adv_by_std_in_grpo
  )
  mini = rc.rl.ppo_mini_batch_size * rc.rl.n
  num_mini = len(r) // mini
  # Each host packs only the rows of every mini-batch that its own devices hold (all of them
  # on one process).
  rows = _local_rows(env.mesh, mini)
  local = np.concatenate([np.arange(i * mini + rows.start, i * mini + rows.stop)
                          for i in range(num_mini)])
  packed = rollout_lib.pack_batch(
    r.select(local), adv[local], max_prompt_length=env.max_prompt_length,
    max_response_length=rc.rl.max_response_length, pad_id=env.pad_id,
  )
  k = rows.stop - rows.start
  batches = [_device_batch(env, {n: v[i * k:(i + 1) * k] for n, v in packed.items()}, mini)
             for i in range(num_mini)]

  # Old log-probs: the actor recomputes them before any update of this step (verl semantics).
  t1 = time.perf_counter()
  entropies, masks = [], []
  for i, b in enumerate(batches):
    old_lp, ent = steps.log_prob(params, b)
    batches[i] = b.replace(old_log_probs=old_lp)
    entropies.append(ent)
    masks.append(b.response_mask)
  ent_mean = float(sum(jnp.sum(e * m) for e, m in zip(entropies, masks, strict=True))
                   / max(float(sum(jnp.sum(m) for m in masks)), 1.0))
  t_logp = time.perf_counter() - t1
  if env.ref_params is not None:  # the KL term: the frozen reference, same jitted pass
    t_ref = time.perf_counter()
    batches = [b.replace(ref_log_probs=steps.log_prob(env.ref_params, b)[0]) for b in batches]
    metrics["timing_s/ref"] = time.perf_counter() - t_ref

  t2 = time.perf_counter()
  per_mb: list[dict[str, Any]] = []
  dumps = []
  for _ in range(rc.rl.ppo_epochs):
    for b in batches:
      if env.dump_influence:
        dumps.append(distributed.fetch(env.influence_fn(params, b)))  # all hosts gather
      params, opt_state, m = steps.train(params, opt_state, b)
      per_mb.append(m)
  per_mb = jax.device_get(per_mb)
  t_update = time.perf_counter() - t2
  if dumps:
    host_batches = distributed.fetch(batches)  # collective: every host calls it
    if jax.process_index() == 0:
      _dump_influence(env.workdir, step + 1, dumps, host_batches)

  metrics.update(_mean_metrics(per_mb))
  metrics["train/nonfinite_updates"] = int(sum(m["train/skipped_step"] for m in per_mb))
  metrics["train/empty_steps"] = 0
  # Per mini-batch: FIPO's weights are 1 on the first and move on the later ones.
  for key in ("actor/influence_weights_mean_raw", "actor/influence_weights_mean", "actor/ppo_kl"):
    for i, m in enumerate(per_mb):
      if key in m:
        metrics[f"{key}/mb{i + 1}"] = float(m[key])
  lengths = np.asarray([len(x) for x in r.response_ids])
  num_tokens, adv_mean = _token_stats(r, adv, packed, rc.rl.max_response_length)
  metrics.update({
    "actor/entropy": ent_mean,
    "actor/lr": optimizer.last_update_lr(env.lr_schedule, opt_state),  # the step's last update
    # Accuracy over every sampled response; the kept (mixed-accuracy) groups are biased.
    "train/acc_mean": all_acc_mean,
    "train/kept_acc_mean": float(np.mean(r.acc)),
    "critic/score/mean": float(np.mean(r.scores)),
    "critic/advantages/mean": adv_mean,
    "reward/errors": int(r.reward_errors),
    "reward/overlong_frac": float(np.mean(r.overlong)),
    "train/num_prompts_kept": result.num_prompts_kept,
    "timing_s/gen": t_rollout,
    "timing_s/old_log_prob": t_logp,
    "timing_s/update_actor": t_update,
    "timing_s/step": time.perf_counter() - t0,
    "perf/sampler_tokens_per_s": sampler_tokens / max(t_rollout, 1e-9),
    "perf/train_tokens_per_s": num_tokens * rc.rl.ppo_epochs / max(t_update, 1e-9),
    "perf/responses_scored_here": scored_here,  # this process's share of the reward scoring
  })
  metrics.update(metrics_lib.response_length_metrics(lengths, rc.rl.max_response_length))
  return metrics, params, opt_state


def _rollouts(rc, env, params, step: int):
  """Dynamic-sampling rounds with the current params.

  Returns (result, tokens sampled, accuracy over every sampled response before filtering,
  responses scored by this process).
  """
  counters = {"tokens": 0, "acc": [], "scored": 0}
  params = env.sampler_params(params)  # once per step: the params do not change while sampling

  def sample_round(round_idx: int) -> rollout_lib.Rollouts:
    examples = env.train_data.next_batch(rc.rl.gen_batch_size)
    res = driver_lib.run(
      env.engine, params, [e["prompt_ids"] for e in examples], n=rc.rl.n,
      max_new_tokens=rc.rl.max_response_length, sampling=env.train_sampling,
      eos_ids=env.eos_ids, seed=seeds.seed_for(rc.seed, "sampling", step, round_idx),
      progress=False,
    )
    counters["tokens"] += res.stats.tokens_generated
    r = env.make_rollouts(examples, res.samples, group_offset=round_idx * rc.rl.gen_batch_size)
    counters["acc"].append(r.acc)
    counters["scored"] += r.scored_here
    return r

  res = rollout_lib.collect_with_dynamic_sampling(
    sample_round, train_batch_size=rc.rl.train_batch_size, n=rc.rl.n,
    filter_groups=rc.rl.filter_groups_enable, max_num_gen_batches=rc.rl.max_num_gen_batches,
    min_prompts=rc.rl.ppo_mini_batch_size, filter_metric=rc.rl.filter_groups_metric,
  )
  all_acc = np.concatenate(counters["acc"]) if counters["acc"] else np.zeros(1)
  return res, counters["tokens"], float(all_acc.mean()), counters["scored"]


def _local_rows(mesh, rows: int) -> slice:
  """Rows [lo, hi) of an [rows, ...] batch that this process's devices hold."""
  held = sharding.process_rows(sharding.batch_sharding(mesh, 1, (rows,)), rows)
  if held is None:  # devices not grouped by process: every host packs every row
    logging.warning("batch rows of this host are not contiguous; packing all %d rows", rows)
    return slice(0, rows)
  return held


def _device_batch(env, arrays: dict[str, np.ndarray], rows: int) -> ts.PolicyBatch:
  """Global [rows, ...] arrays from this process's rows (all rows also work: then global)."""

  def put(x):
    shape = (rows,) + x.shape[1:]
    return jax.make_array_from_process_local_data(
      sharding.batch_sharding(env.mesh, x.ndim, shape), x, shape)

  return ts.PolicyBatch(**{k: put(v) for k, v in arrays.items()})


def _token_stats(r, adv: np.ndarray, packed: dict[str, np.ndarray], max_len: int
                 ) -> tuple[float, float]:
  """(response tokens, token-mean advantage) of the whole batch.

  One process holds every row and reads its packed arrays; on several, each holds a share of
  the rows, so the global numbers come from the [R] rollouts every host has.
  """
  if jax.process_count() == 1:
    mask = packed["response_mask"]
    return float(mask.sum()), float(np.sum(packed["advantages"] * mask) / max(mask.sum(), 1.0))
  lengths = np.asarray([min(len(x), max_len) for x in r.response_ids], np.float64)
  total = float(lengths.sum())
  return total, float(np.sum(np.asarray(adv, np.float64) * lengths) / max(total, 1.0))


def _mean_metrics(per_mb: list[dict[str, Any]]) -> dict[str, float]:
  """verl averages every actor metric over the micro/mini-batches of the step."""
  keys = per_mb[0].keys() if per_mb else []
  return {k: float(np.mean([float(m[k]) for m in per_mb])) for k in keys
          if k != "train/skipped_step"}


def _dump_influence(workdir: str, step: int, dumps, batches) -> None:
  """WORKDIR/influence/step_{k}.npz: per-token weights of every mini-batch of RL step k."""
  stack = lambda key: np.stack([d[key] for d in dumps])
  p = batches[0].input_ids.shape[1] - batches[0].response_mask.shape[1]
  with paths.open_file(paths.join(workdir, "influence", f"step_{step}.npz"), "wb") as f:
    np.savez_compressed(
      f,
      influence_weights=stack("influence_weights"),
      raw_influence_weights=stack("raw_influence_weights"),
      response_mask=np.stack([np.asarray(b.response_mask) for b in batches]),
      advantages=np.stack([np.asarray(b.advantages) for b in batches]),
      response_ids=np.stack([np.asarray(b.input_ids)[:, p:] for b in batches]),
    )
