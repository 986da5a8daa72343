"""The optimizer factory: schedules count optimizer updates, the tx uses the logged lr."""

import json

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fipo_qwen2_5_32b
from fipo_jax import config as config_lib
from fipo_jax.rl import optimizer


def _recipe(**overrides) -> config_lib.RunConfig:
  c = fipo_qwen2_5_32b.get_config()
  c.optim.schedule = "cosine"
  for key, value in overrides.items():
    section, name = key.split(".")
    setattr(getattr(c, section), name, value)
  return config_lib.validate(c, check_paths=False)


@pytest.mark.parametrize("epochs", [1, 2])
def test_cosine_reaches_its_floor_at_the_last_update_of_the_last_rl_step(epochs):
  rc = _recipe(**{"rl.ppo_epochs": epochs})
  # 512 prompts / 64 per mini-batch = 8 updates per epoch and RL step.
  assert rc.total_updates == rc.total_steps * 8 * epochs == 600 * 8 * epochs
  _, schedule = optimizer.make_optimizer(rc.optim, total_updates=rc.total_updates)
  lr = np.asarray(jax.vmap(schedule)(jnp.arange(rc.total_updates)))
  last = rc.total_updates - 1  # count of the last update of RL step total_steps
  assert lr[last] == 0.0
  assert np.all(lr[:last][rc.optim.warmup_steps :] > 0.0)  # not before
  # The last RL step's first update still has a (small) positive lr; one step earlier it is
  # larger: the decay spans the whole run, not total_steps updates.
  assert 0.0 < lr[last - 8 * epochs + 1] < lr[last - 8 * epochs]
  # Where a decay over total_steps counts would end, an eighth of the run in, it has barely begun.
  assert lr[rc.total_steps] > 0.95 * rc.optim.lr
  # Warmup in updates: lr 0 on the first update (verl), the peak after warmup_steps updates.
  assert lr[0] == 0.0
  np.testing.assert_allclose(lr[rc.optim.warmup_steps], rc.optim.lr, rtol=1e-6)


def test_the_tx_applies_the_schedule_it_returns():
  """Adam without moment decay (b1 = b2 = 0) moves each param by lr x g / (|g| + eps) = lr per
  update: the applied step sizes are the schedule's values, the last one exactly 0, and
  last_update_lr reads them back."""
  optim = config_lib.OptimSection(
    lr=0.1, warmup_steps=2, schedule="cosine", weight_decay=0.0, grad_clip=0.0, b1=0.0, b2=0.0
  )
  total = 12
  tx, schedule = optimizer.make_optimizer(optim, total_updates=total)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  steps, logged = [], []
  for _ in range(total):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    steps.append(-float(updates["w"][0]))
    logged.append(optimizer.last_update_lr(schedule, state))
  expected = [float(schedule(k)) for k in range(total)]
  np.testing.assert_allclose(steps, expected, rtol=1e-6, atol=0)
  np.testing.assert_allclose(logged, expected, rtol=0, atol=0)
  assert steps[-1] == 0.0 and steps[-2] > 0.0
  assert int(optimizer.update_count(state)) == total


def test_constant_schedule_warms_up_over_updates_and_keeps_a_plain_lr_without_warmup():
  optim = config_lib.OptimSection(lr=1e-6, warmup_steps=10)
  _, schedule = optimizer.make_optimizer(optim, total_updates=4800)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.5e-6, rtol=1e-6)
  np.testing.assert_allclose([float(schedule(k)) for k in (10, 4799, 10**6)], 1e-6, rtol=1e-6)
  tx, schedule = optimizer.make_optimizer(
    config_lib.OptimSection(lr=1e-3, warmup_steps=0), total_updates=1
  )
  state = tx.init({"w": jnp.zeros(2)})
  assert optimizer.last_update_lr(schedule, state) == pytest.approx(1e-3)
  assert int(optimizer.update_count(state)) == 0


def test_a_cosine_run_whose_warmup_outlasts_it_is_refused():
  with pytest.raises(config_lib.ConfigError, match="optim.warmup_steps: must be < the run's"):
    _recipe(**{"optim.warmup_steps": 4799})
  assert _recipe(**{"optim.warmup_steps": 4798}).total_updates == 4800




@pytest.mark.slow
def test_a_cosine_trainer_run_logs_the_lr_of_its_last_update(tmp_path):
  """tiny_cpu from its stored warm start, 2 RL steps x 4 updates, cosine: the logged actor/lr
  is the lr of each step's last update, 0 exactly at the run's last one."""
  from configs import tiny_cpu  # noqa: PLC0415
  from fipo_jax.rl import trainer  # noqa: PLC0415

  conftest.write_tiny_cpu_sft_cache(tmp_path)
  c = tiny_cpu.get_config()
  c.total_steps, c.eval_every, c.checkpoint_every = 2, 0, 0
  c.optim.schedule, c.optim.warmup_steps = "cosine", 1
  rc = config_lib.validate(c, check_paths=False)
  assert rc.total_updates == 8
  trainer.run(c, str(tmp_path), devices=jax.devices()[:1])
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/num_prompts_kept"] for r in rows] == [16, 16]  # 4 updates per step
  _, schedule = optimizer.make_optimizer(rc.optim, total_updates=rc.total_updates)
  assert [r["actor/lr"] for r in rows] == [float(schedule(3)), float(schedule(7))]
  assert rows[0]["actor/lr"] > 0.0 and rows[1]["actor/lr"] == 0.0
