"""The FIPO trainer loop (docs/fipo_spec.md §4): rollouts, advantages, updates, checkpoints.

`run(config, workdir)` is what `python -m fipo_jax.main` calls. Per RL step, `rl_step`:

  rollout.collect (gen_batch_size prompts x n sampled and scored, dynamic sampling until
  train_batch_size prompts are kept, group advantages, mini-batches on the mesh: layouts.py)
  -> log_probs.compute: old log-probs (the actor's, or the sampler's with
     rl.old_log_prob_source='sampler'; the sampler-trainer mismatch metrics and rollout IS
     weights; the frozen reference's with the KL term; jit)
  -> updates: train_batch_size / ppo_mini_batch_size x ppo_epochs optimizer updates (jit,
     micro-batch accumulation, steps.py), dispatched; with rollout.overlap_calls > 0 the
     sampler decodes an overlap round meanwhile (rl/partial_sampling.py); then fetched
  -> metrics;

then `_Loop.end_step` evaluates, logs (jsonl, TensorBoard, plots) and checkpoints. The loop
threads a `setup.TrainState` (params, optimizer state, step) through `rl_step`; the `setup.Env`
around it never changes. Each step samples with the params of the step before (no recompiles).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import tqdm
from flax import nnx

from fipo_jax import checkpoints as ckpt_lib
from fipo_jax import config as config_lib
from fipo_jax import metrics as metrics_lib
from fipo_jax import paths
from fipo_jax import policy as policy_lib
from fipo_jax.models import attention
from fipo_jax.rl import evaluation, log_probs, optimizer, partial_sampling, updates, warmstart
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.rl import setup as setup_lib
from fipo_jax.rl import steps as steps_lib


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


CannotLearn = warmstart.CannotLearn  # the warm start missed its threshold, or no mixed group


class SetupError(RuntimeError):
  """Missing or unreadable data/model files found while building the run (before compiling)."""


def run(config, workdir: str, *, run_config: config_lib.RunConfig | None = None,
        devices=None) -> dict:
  """Trains per `config` in `workdir` on `devices` (default: all), resuming from its latest
  checkpoint. Returns the last metrics."""
  rc = run_config or config_lib.validate(
    config, num_devices=None if devices is None else len(devices))
  paths.makedirs(workdir)  # local or gs://: every write below goes through fipo_jax.paths
  stop = _StopRequested()
  stop.install()
  env, state = build(rc, workdir, devices)
  policy_lib.save_run_config(config, workdir)
  _warn_accepted_mismatch(rc)
  loop = _Loop.open(rc, env, stop)
  state = loop.initial_state(state)
  steps = steps_lib.jit_steps(env.graphdef, cfg=env.update_cfg, tx=env.tx,
                              param_sharding=env.param_sharding,
                              opt_sharding=env.opt_sharding)  # the builder fipo_jax.aot compiles
  last: dict[str, Any] = {}
  if state.step == 0 and rc.eval_every > 0:
    last = evaluation.evaluate(rc, env.eval_sampler(), env.val_examples, state.params, step=0)
    loop.writer.write(0, last)
    _check_mixed_eval(rc, last, probe=lambda: evaluation.evaluate(
      rc, env.train_sampler(), env.val_examples, state.params, step=0, n=rc.rl.n,
      stream="eval_probe"))
  for _ in loop.progress_bar(state.step):
    state, last = rl_step(rc, env, steps, state)
    if loop.end_step(state, last):
      break
  loop.close()
  return last


def build(rc: config_lib.RunConfig, workdir: str, devices=None
          ) -> tuple[setup_lib.Env, setup_lib.TrainState]:
  """`setup.build` (on `devices`, default all), then with the KL term and sft.steps > 0 the
  reference warm-started: the policy RL starts from (a fresh run and a resumed one get the
  same one)."""
  try:
    env, state = setup_lib.build(rc, workdir, devices)
    if env.ref_params is not None and rc.sft.steps > 0:
      env.ref_params = _warm_start(rc, env, env.ref_params)
  except (OSError, ValueError) as e:  # data/tokenizer/model files: raised with their path
    raise SetupError(f"{type(e).__name__}: {e}") from e
  return env, state


def _warm_start(rc: config_lib.RunConfig, env: setup_lib.Env, params: nnx.State) -> nnx.State:
  """`params` after the SFT warm start (from its WORKDIR/sft cache when there is one)."""
  return warmstart.sft_warm_start(rc, params, env.workdir, graphdef=env.graphdef,
                                  update_cfg=env.update_cfg, mesh=env.mesh,
                                  tokenizer=env.tokenizer, pad_id=env.pad_id)


def _has_mixed_prompt(metrics: dict[str, Any], n: int) -> bool:
  """A prompt with c of n right adds c/n to avg@n and 1 to pass@n when c > 0, so a mixed
  prompt exists iff pass@n > avg@n."""
  return metrics[f"eval/pass@{n}"] - metrics["eval/acc_mean"] > 1e-9


def _check_mixed_eval(rc: config_lib.RunConfig, metrics: dict[str, Any],
                      probe: Callable[[], dict[str, Any]] | None = None) -> None:
  """Raises CannotLearn when the step-0 eval has no prompt with mixed accuracy (each one all
  right or all wrong: every group advantage would be 0) and neither has `probe` (when given):
  rl.n samples per held-out prompt at the rollout's sampling settings, what RL's groups will
  see (the eval's top-p can cut a form the rollouts sample). Checked when empty steps stop the
  run (rl.max_empty_steps > 0) and eval.n >= 2."""
  n = rc.eval.n
  if rc.rl.max_empty_steps == 0 or not rc.rl.filter_groups_enable or n < 2:
    return
  if _has_mixed_prompt(metrics, n):
    return
  if probe is not None and _has_mixed_prompt(probe(), rc.rl.n):
    logging.info("the step-0 eval has no prompt with mixed accuracy, but rollout sampling does")
    return
  acc, passed = metrics["eval/acc_mean"], metrics[f"eval/pass@{n}"]
  raise CannotLearn(
    f"the step-0 eval has no prompt with mixed accuracy (eval/acc_mean {acc:.3f}, pass@{n} "
    f"{passed:.3f}), nor has sampling at the rollout's settings: every group advantage would be "
    f"0, so RL cannot start; train the warm start longer (sft.*) or use an easier task")


def _warn_accepted_mismatch(rc: config_lib.RunConfig) -> None:
  """Says so when rl.accept_sampler_mismatch lets the sampler's log-probs be the old ones
  although the sampler computes differently (validation refuses it without the flag)."""
  if rc.rl.old_log_prob_source != "sampler" or not rc.rl.accept_sampler_mismatch:
    return
  why = attention.sampler_mismatch(rc.model.dtype, rc.rl.sampler_dtype,
                                   rc.model.attention_impl)
  if why:
    logging.warning("rl.old_log_prob_source='sampler' with rl.accept_sampler_mismatch: %s, so "
                    "the old log-probs are not the trainer's", why)


@dataclasses.dataclass
class _Loop:
  """The loop's bookkeeping around rl_step: logs, evals, checkpoints, divergence, signals."""

  rc: config_lib.RunConfig
  env: setup_lib.Env
  stop: _StopRequested
  writer: metrics_lib.MetricsWriter
  ckpt: ckpt_lib.CheckpointManager
  bad_steps: int = 0  # consecutive steps with a non-finite update
  empty_steps: int = 0  # consecutive steps with no group of mixed accuracy
  skipped_total: int = 0  # non-finite updates of the run
  checkpoints_skipped: int = 0  # unreadable checkpoints resumes fell back past, over the run
  bar: tqdm.tqdm | None = None

  @classmethod
  def open(cls, rc: config_lib.RunConfig, env: setup_lib.Env, stop: _StopRequested) -> _Loop:
    writer = metrics_lib.writer_for(rc, env.workdir, is_primary=jax.process_index() == 0)
    ckpt = ckpt_lib.CheckpointManager(paths.join(env.workdir, "checkpoints"),
                                      keep=rc.keep_checkpoints, best_metric="eval/acc_mean")
    return cls(rc, env, stop, writer, ckpt)

  def initial_state(self, state: setup_lib.TrainState) -> setup_lib.TrainState:
    """The latest checkpoint's state (and counters), else `state` after the SFT warm start."""
    env = self.env
    try:
      restored = self.ckpt.restore_latest(params=state.params, opt_state=state.opt_state)
    except ckpt_lib.CheckpointUnreadable as e:  # never a silent restart from step 0
      self.ckpt.close()
      self.writer.close()
      raise SetupError(str(e)) from e
    if restored is not None:
      extra = restored.extra
      env.train_data.set_state(extra["data_state"])
      self.bad_steps = int(extra.get("consecutive_bad_steps", 0))
      self.skipped_total = int(extra.get("skipped_steps", 0))
      self.checkpoints_skipped = int(extra.get("checkpoints_skipped", 0)) + len(restored.skipped)
      self.writer.truncate_after(restored.step)  # steps logged after the checkpoint are redone
      logging.warning("resumed from step %d", restored.step)  # visible at the CLI's WARNING level
      return setup_lib.TrainState(restored.params, restored.opt_state, restored.step)
    if self.rc.sft.steps > 0:
      try:
        params = _warm_start(self.rc, env, state.params)
      except warmstart.CacheMismatch as e:  # one line, as an unreadable checkpoint
        self.ckpt.close()
        self.writer.close()
        raise SetupError(str(e)) from e
      # jit with the state's shardings: eager init would leave it on one device (one host).
      opt_state = jax.jit(env.tx.init, out_shardings=env.opt_sharding)(params)
      return setup_lib.TrainState(params, opt_state, 0)
    return state

  def progress_bar(self, start: int) -> tqdm.tqdm:
    total = self.rc.total_steps
    self.bar = tqdm.tqdm(range(start, total), initial=start, total=total, desc="fipo",
                         unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
    return self.bar

  def end_step(self, state: setup_lib.TrainState, metrics: dict[str, Any]) -> bool:
    """Counts, evaluates, logs and checkpoints RL step `state.step`; True: stop the run."""
    rc, done = self.rc, state.step
    # Non-finite updates count towards divergence; steps with no mixed group (nothing to
    # learn from after dynamic sampling) towards rl.max_empty_steps, unless most sampled
    # responses were right: then the groups are all right, a solved batch, not a stuck run.
    skipped = int(metrics.pop("train/nonfinite_updates"))
    self.skipped_total += skipped
    self.bad_steps = self.bad_steps + 1 if skipped else 0
    stuck = metrics.get("train/empty_steps") and metrics.get("train/acc_mean", 0.0) < 0.5
    self.empty_steps = self.empty_steps + 1 if stuck else 0
    metrics["train/skipped_steps"] = self.skipped_total
    if self.checkpoints_skipped:  # only in runs that fell back past an unreadable checkpoint
      metrics["train/checkpoints_skipped"] = self.checkpoints_skipped
    metrics.update(self.env.train_data.metrics())
    evaluated = rc.eval_every > 0 and (done % rc.eval_every == 0 or done == rc.total_steps)
    if evaluated:
      metrics.update(evaluation.evaluate(rc, self.env.eval_sampler(), self.env.val_examples,
                                         state.params, step=done))
    diverged = self.bad_steps >= rc.max_consecutive_bad_steps > 0
    starved = self.empty_steps >= rc.rl.max_empty_steps > 0
    stopping = diverged or starved or self.stop.signum is not None
    if logs_step(rc, done, evaluated=evaluated, stopping=stopping):
      self.writer.write(done, metrics)
      self.bar.set_postfix(metrics_lib.progress_postfix(self.writer.history))  # last eval
    if stopping or partial_sampling.checkpoint_follows(rc, done):
      self.ckpt.save(done, params=state.params, opt_state=state.opt_state, metrics=metrics,
                     extra={"data_state": self.env.train_data.get_state(),
                            "consecutive_bad_steps": self.bad_steps,
                            "skipped_steps": self.skipped_total,
                            "checkpoints_skipped": self.checkpoints_skipped})
      if self.env.carry is not None:  # partial rollouts: in-flight groups are not checkpointed,
        self.env.carry.clear()  # so they are dropped here too (a resume equals no interruption)
    if diverged:
      self.ckpt.wait()
      raise TrainingDiverged(
        f"{self.bad_steps} consecutive steps with a non-finite loss or gradient (limit "
        f"max_consecutive_bad_steps={rc.max_consecutive_bad_steps}); the last good state is "
        f"checkpointed at step {done} in {self.env.workdir}/checkpoints"
      )
    if starved:
      self.ckpt.wait()
      raise CannotLearn(
        f"{self.empty_steps} RL step(s) in a row found no group of mixed accuracy (most "
        f"responses wrong) in "
        f"rl.max_num_gen_batches={rc.rl.max_num_gen_batches} generation rounds (limit "
        f"rl.max_empty_steps={rc.rl.max_empty_steps}): the policy has nothing to learn from; "
        f"checkpointed at step {done} in {self.env.workdir}/checkpoints"
      )
    if self.stop.signum is not None:
      logging.warning("stopping after step %d on signal %d (checkpoint written)", done,
                      self.stop.signum)
    return stopping

  def close(self) -> None:
    self.ckpt.wait()
    self.ckpt.close()
    self.writer.close()
    if self.bar is not None:
      self.bar.close()
    if jax.process_index() == 0:
      print(self.writer.outputs(self.ckpt.directory), flush=True)


def logs_step(rc, done: int, *, evaluated: bool, stopping: bool) -> bool:
  """Whether RL step `done` (1-based) writes its metrics: every `log_every` steps, and always
  at an eval step, at the last step and at the step the run stops on (signal, divergence)."""
  return done % rc.log_every == 0 or evaluated or stopping or done == rc.total_steps


def rl_step(rc: config_lib.RunConfig, env: setup_lib.Env, steps: steps_lib.CompiledSteps,
            state: setup_lib.TrainState) -> tuple[setup_lib.TrainState, dict[str, Any]]:
  """RL step `state.step`: collect -> old (and reference) log-probs -> updates -> metrics."""
  t0 = time.perf_counter()
  kept: list = []  # the kept rollouts, for the dump
  batches, metrics = rollout_lib.collect(
    rc, env.train_sampler(), env.train_data, state.params, state.step, mesh=env.mesh,
    update_cfg=env.update_cfg, pad_id=env.pad_id, kept=kept, carry=env.carry)
  if not batches:
    logging.warning("step %d: no prompt group with mixed accuracy; update skipped", state.step)
    metrics.update({"train/nonfinite_updates": 0, "train/empty_steps": 1})
    return state.replace(step=state.step + 1), metrics
  batches, num_tokens = log_probs.compute(rc, env, steps, state, batches, metrics)
  t_update = time.perf_counter()
  pending = updates.dispatch(rc, env, steps, state, batches)
  if env.carry is not None:  # the sampler decodes while the update runs (overlap_calls > 0)
    metrics.update(env.carry.overlap(rc, env.train_sampler(), env.train_data,
                                     pending.state.params, state.step))
  state, per_mb = updates.finish(rc, env, pending, batches, kept)
  t_update = time.perf_counter() - t_update  # with an overlap round: spans it
  metrics.update(updates.metrics(per_mb))
  metrics.update({
    "actor/lr": optimizer.last_update_lr(env.lr_schedule, state.opt_state),  # the last update's
    "train/empty_steps": 0,
    "timing_s/update_actor": t_update,
    "timing_s/step": time.perf_counter() - t0,
    "perf/train_tokens_per_s": num_tokens * rc.rl.ppo_epochs / max(t_update, 1e-9),
  })
  return state, metrics
