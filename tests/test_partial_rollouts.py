"""Partial rollouts (rollout.mode='partial') in the real trainer, on tiny_cpu's stored warm start.

eta = 0 is the synchronous run bit for bit; with eta in {1, 2} groups carry over (staleness > 0
is logged) while FIPO's raw influence weights stay exactly 1 on mini-batch 1, because the old
log-probs are the trainer's recompute at step start; under bypass (the sampler's log-probs as
the old ones) they are not. Disaggregated with an overlap round (rollout.overlap_calls) keeps
those weights exact and reproduces bit for bit.
"""

import json
import pathlib
import subprocess
import sys

import conftest
import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny_cpu
from fipo_jax import config as config_lib
from fipo_jax.rl import steps as steps_lib
from fipo_jax.rl import trainer

MB1 = "actor/influence_weights_mean_raw/mb1"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(workdir, steps: int, devices=None, **rollout) -> tuple[dict, list[dict]]:
  """`steps` tiny_cpu RL steps from the stored warm start on `devices` (default: the 8 of the
  test mesh): (params as numpy, per-step metrics). `rollout`: rollout.* values, plus
  `bypass=True` for rl.old_log_prob_source='sampler'."""
  devices = jax.devices() if devices is None else devices
  conftest.write_tiny_cpu_sft_cache(workdir)
  config = tiny_cpu.get_config()
  config.eval_every = 0
  config.checkpoint_every = 0
  if rollout.pop("bypass", False):
    config.rl.old_log_prob_source = "sampler"
    config.rl.mismatch_metrics_every = 0
    config.rollout.staleness_is = "none"
  for key, value in rollout.items():
    config.rollout[key] = value
  rc = config_lib.validate(config, num_devices=len(devices))
  env, state = trainer.build(rc, str(workdir), devices)
  split = rc.rollout.mode == "disaggregated"  # the sampler on devices of its own
  assert set(env.engine.mesh.devices.flat).isdisjoint(env.mesh.devices.flat) == split
  # a run that resumes prefixes sizes the sampler's inserts by their prefix (one shape each)
  assert env.engine.cfg.insert_bucket == ("prefix" if rc.rollout.resumes else "count")
  loop = trainer._Loop.open(rc, env, trainer._StopRequested())
  state = loop.initial_state(state)
  loop.ckpt.close()
  loop.writer.close()
  jitted = steps_lib.jit_steps(env.graphdef, cfg=env.update_cfg, tx=env.tx,
                               param_sharding=env.param_sharding, opt_sharding=env.opt_sharding)
  history = []
  for _ in range(steps):
    state, metrics = trainer.rl_step(rc, env, jitted, state)
    history.append(metrics | {"_compiled": _programs(env, jitted)})
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)), history


def _programs(env, jitted) -> dict[str, int]:
  """Compiled programs so far of the jitted steps the overlap path runs: the update, the
  weights' staging hop and the engine's generate (prefill and insert compile per length
  bucket of resumed prefixes: tests/test_partial_engine.py)."""
  stager = env.engine._stager
  return {"train": jitted.train._cache_size(), "generate": env.engine._generate._cache_size(),
          "stage": stager.program(None)._cache_size() if stager is not None else 0}


@pytest.fixture(scope="module")
def sync_on_first4(tmp_path_factory) -> dict:
  """The synchronous run's params after 3 steps on the first 4 devices: what eta = 0 must give
  bit for bit, partial on those devices and disaggregated with them as its trainer."""
  return _run(tmp_path_factory.mktemp("sync"), 3, devices=jax.devices()[:4])[0]


@pytest.mark.slow  # a 3-step tiny_cpu run (and the module's synchronous one)
def test_eta0_partial_is_the_sync_run_bit_for_bit(tmp_path, sync_on_first4):
  part, hist = _run(tmp_path / "partial", 3, devices=jax.devices()[:4], mode="partial",
                    max_staleness=0)
  assert all(m["rollout/staleness_max"] == 0 for m in hist)
  assert all(m[MB1] == 1.0 for m in hist)
  flat_sync, flat_part = jax.tree.leaves(sync_on_first4), jax.tree.leaves(part)
  assert len(flat_sync) == len(flat_part)
  for a, b in zip(flat_sync, flat_part, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a 3-step tiny_cpu run (and the module's synchronous one)
def test_eta0_disaggregated_is_the_sync_run_on_its_trainer_devices_bit_for_bit(
    tmp_path, sync_on_first4):
  """Stage B's meshes on the 8 devices: the last 4 sample, the first 4 train, and the weights
  move device to device after each update. With eta = 0 that is the synchronous run on the
  first 4 devices (the same trainer mesh; a sampler mesh of the same shape), bit for bit. (The
  synchronous run on all 8 trains on fsdp=8: its float32 sums run in another order.)"""
  split, hist = _run(tmp_path / "split", 3, mode="disaggregated", max_staleness=0,
                     sampler_devices=4)
  assert all(m["rollout/staleness_max"] == 0 and m[MB1] == 1.0 for m in hist)
  for a, b in zip(jax.tree.leaves(sync_on_first4), jax.tree.leaves(split), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two 3-step tiny_cpu runs on split devices
def test_overlap_round_trains_with_exact_mb1_weights_and_reproduces(tmp_path):
  """Disaggregated, eta = 1, rollout.overlap_calls = 2: after each step's updates are
  dispatched the sampler decodes 2 calls with the batch's weights; what it leaves unfinished
  resumes next step under the new ones. Every step logs the round, the lag stays <= 1, FIPO's
  mini-batch-1 weights stay exactly 1, nothing new compiles after step 1 on the overlap path,
  and a second run gives the same params bit for bit (the swap point is a call count)."""
  overlap = dict(mode="disaggregated", max_staleness=1, sampler_devices=4, overlap_calls=2)
  first, hist = _run(tmp_path / "a", 3, **overlap)
  assert all(m["rollout/overlap_calls"] == 2 and m["rollout/overlap_tokens"] > 0 for m in hist)
  assert all(m["timing_s/overlap"] > 0 for m in hist)
  assert all(m["rollout/staleness_max"] <= 1 and m[MB1] == 1.0 for m in hist), hist
  assert any(m["rollout/resumed_requests"] > 0 for m in hist[1:])  # the round's tokens resumed
  assert hist[0]["_compiled"] == hist[-1]["_compiled"], [m["_compiled"] for m in hist]
  second, _ = _run(tmp_path / "b", 3, **overlap)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a 3-step tiny_cpu run (eta = 1: the README command's test below)
def test_influence_weights_are_one_on_mb1_under_staleness(tmp_path):
  eta = 2
  _, hist = _run(tmp_path, 3, devices=jax.devices()[:1], mode="partial", max_staleness=eta)
  assert max(m["rollout/staleness_max"] for m in hist) >= 1  # groups really carried over
  assert all(m["rollout/staleness_max"] <= eta for m in hist)
  assert all(m[MB1] == 1.0 for m in hist), [m[MB1] for m in hist]
  assert any(m["rollout/abs_log_ratio_mean"] > 0 for m in hist)
  assert all(0.0 <= m["rollout/is_truncated_frac"] <= 1.0 for m in hist)


@pytest.mark.slow  # a 2-step tiny_cpu run
def test_bypass_moves_mb1_weights_under_staleness(tmp_path):
  _, hist = _run(tmp_path, 2, devices=jax.devices()[:1], mode="partial", max_staleness=1,
                 bypass=True)
  stale = [m for m in hist if m["rollout/staleness_max"] >= 1]
  assert stale, "no step trained on carried-over groups"
  assert all(m[MB1] != 1.0 for m in stale), [m[MB1] for m in stale]


def _cli(workdir, *overrides: str, warm=None) -> list[dict]:
  """`python -m fipo_jax.main --config configs/tiny_cpu.py --config.rollout.mode=partial
  --config.rollout.max_staleness=1` (the README's command) from the stored warm start, on one
  device (bitwise reproducible across processes), no evals, in a fresh interpreter or forked
  from `warm` (tests/warm_python.py); returns metrics.jsonl's rows."""
  if not (workdir / "sft").exists():  # a resumed run finds it there
    conftest.write_tiny_cpu_sft_cache(workdir)
  args = ["-m", "fipo_jax.main", "--config", str(ROOT / "configs/tiny_cpu.py"),
          "--config.rollout.mode=partial", "--config.rollout.max_staleness=1",
          "--workdir", str(workdir), "--config.eval_every=0", *overrides]
  if warm is None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=conftest.child_env(),
                          capture_output=True, text=True)
  else:
    proc = warm.run(*args, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 3 + 2 + 1 CLI steps
def test_readme_partial_command_trains_and_resumes_as_the_uninterrupted_run(tmp_path,
                                                                            warm_server):
  """The README's command trains with staleness <= 1 and exact mini-batch-1 weights; in-flight
  groups are dropped at every checkpoint, in the uninterrupted and the resumed run alike. The
  uninterrupted run is a fresh interpreter; the cut run and its resumption fork from the warm
  server (so the two sides share no interpreter state)."""
  whole = _cli(tmp_path / "whole", "--config.total_steps=3", "--config.checkpoint_every=2")
  assert [r["step"] for r in whole] == [1, 2, 3]
  assert all(r["rollout/staleness_max"] <= 1 for r in whole)
  assert any(r["rollout/staleness_max"] == 1 for r in whole)
  assert all(r[MB1] == 1.0 for r in whole), [r[MB1] for r in whole]
  assert whole[2]["rollout/carried_groups"] == 0  # step 3 starts after the step-2 checkpoint
  warm = warm_server.with_env(conftest.child_env())
  _cli(tmp_path / "cut", "--config.total_steps=2", "--config.checkpoint_every=2", warm=warm)
  cut = _cli(tmp_path / "cut", "--config.total_steps=3", "--config.checkpoint_every=2",
             warm=warm)
  volatile = ("timing_s/", "perf/")
  strip = lambda r: {k: v for k, v in r.items() if not k.startswith(volatile)}
  assert [strip(r) for r in cut] == [strip(r) for r in whole]
