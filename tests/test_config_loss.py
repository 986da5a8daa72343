"""One home per setting: rl.loss_mode is checked against the loss registry, a registered loss's
own hyperparameters are config keys, the loss defaults live in PolicyLossConfig, enum tuples
agree with the modules that own them, and recipes take typed args (`:runlocal,seed=1`)."""

import dataclasses
import importlib
import json
import os
import pathlib

import conftest
import pytest

from fipo_jax import config as config_lib
from fipo_jax import config_rl, recipes
from fipo_jax.algo import aggregation, kl, losses, rollout_correction
from fipo_jax.rl import rewards, rollout, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS_FIELDS = [f.name for f in dataclasses.fields(losses.PolicyLossConfig)
               if f.name not in ("clip_ratio", "hparams")]


def _tiny(arg=None):
  return importlib.import_module("configs.tiny_cpu").get_config(arg)


@pytest.fixture
def scaled_loss(monkeypatch):
  """Registers 'scaled_dapo' with its own hyperparameter pg_scale, for this test only."""
  monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
  monkeypatch.setattr(losses, "_HPARAMS", dict(losses._HPARAMS))

  @losses.register_policy_loss("scaled_dapo", hparams={"pg_scale": 1.0})
  def scaled(log_prob, old_log_prob, advantages, mask, cfg, rollout_is_weights=None):
    loss, m = losses.dapo_loss(log_prob, old_log_prob, advantages, mask, cfg, rollout_is_weights)
    return cfg.pg_scale * loss, m

  return scaled


def test_enum_tuples_come_from_or_agree_with_their_owners():
  rl = config_lib.RLSection
  for name in losses.loss_modes():  # every registered loss is a valid rl.loss_mode
    assert rl(loss_mode=name).loss_mode == name
  assert {"fipo", "future_kl", "dapo", "vanilla", "grpo"} <= set(losses.loss_modes())
  with pytest.raises(config_lib.ConfigError, match="rl.loss_mode: must be one of"):
    rl(loss_mode="ppo2")
  for mode in aggregation.AGG_MODES:
    assert rl(loss_agg_mode=mode).loss_agg_mode == mode
  for kind in kl.KL_TYPES:
    assert rl(kl_loss_type=kind).kl_loss_type == kind
  for mode in rollout_correction.MODES:
    assert rl(rollout_is=mode).rollout_is == mode
  # FILTER_METRICS is restated (its owner sits above the config): they must agree. Every
  # reward function the config accepts has a verifier.
  assert config_rl.FILTER_METRICS == tuple(rollout.FILTER_METRICS)
  for name in config_rl.REWARD_FNS:
    cfg = rewards.RewardConfig(max_response_length=8, reward_fn=name)
    assert rewards.verifier(cfg) is not None
  with pytest.raises(ValueError, match="unknown reward function"):
    rewards.verifier(rewards.RewardConfig(max_response_length=8, reward_fn="nope"))


def test_loss_defaults_have_one_home():
  want = losses.PolicyLossConfig()
  base, section, update = recipes.base().rl, config_lib.RLSection(), steps.UpdateConfig()
  for name in LOSS_FIELDS:
    assert base[name] == getattr(section, name) == getattr(want, name), name
  assert base.loss_mode == section.loss_mode == update.loss_mode == losses.DEFAULT_LOSS_MODE
  assert base.kl_loss_type == section.kl_loss_type == update.kl_loss_type == kl.DEFAULT_KL_TYPE
  assert losses.PolicyLossConfig.from_config(section) == update.policy_loss == want


@pytest.mark.parametrize("mode", ["vanilla", "future_kl", "dapo", "grpo", "fipo"])
def test_every_registered_name_validates(mode):
  c = _tiny()
  c.rl.loss_mode = mode
  assert config_lib.validate(c, check_paths=False).rl.loss_mode == mode


def test_a_registered_losss_hyperparameter_is_a_config_key(scaled_loss):
  c = recipes.base()
  assert c.rl.pg_scale == 1.0 and config_lib.schema()["rl"]["pg_scale"] == 1.0
  c = _tiny()
  c.rl.loss_mode, c.rl.pg_scale = "scaled_dapo", 0.5
  rc = config_lib.validate(c, check_paths=False)
  assert rc.rl.loss_hparams == {"pg_scale": 0.5}
  pl = losses.PolicyLossConfig.from_config(rc.rl)
  assert pl.pg_scale == 0.5 and hash(pl) == hash(losses.PolicyLossConfig.from_config(rc.rl))
  assert losses.PolicyLossConfig().pg_scale == 1.0  # its default when not set
  assert losses.PolicyLossConfig.from_config({"pg_scale": 2}).pg_scale == 2.0
  raw = c.to_dict()
  raw["rl"]["pg_scale"] = "big"  # a plain dict: ConfigDict would refuse it itself
  with pytest.raises(config_lib.ConfigError, match="rl.pg_scale: expected float"):
    config_lib.validate(raw, check_paths=False)
  with pytest.raises(ValueError, match="shadows"):
    losses.register_policy_loss("x", hparams={"decay_rate": 1.0})
  with pytest.raises(ValueError, match="already declared"):
    losses.register_policy_loss("y", hparams={"pg_scale": 2.0})


def test_recipe_args_are_typed():
  args = recipes.parse_arg("runlocal,seed=1", **recipes.RECIPE_ARGS)
  assert args.runlocal is True and args.seed == 1
  assert recipes.parse_arg(None, **recipes.RECIPE_ARGS).runlocal is False
  assert recipes.parse_arg("runlocal=false", runlocal=True).runlocal is False
  assert recipes.parse_arg("lr=0.5,name=x", lr=1.0, name="").to_dict() == {"lr": 0.5, "name": "x"}
  with pytest.raises(ValueError, match="unknown config arg 'runglobal'"):
    recipes.parse_arg("runglobal", **recipes.RECIPE_ARGS)
  with pytest.raises(ValueError, match="config arg seed: expected int"):
    recipes.parse_arg("seed=one", **recipes.RECIPE_ARGS)
  full, small, seeded = _tiny(), _tiny("runlocal"), _tiny("runlocal,seed=1")
  assert (full.seed, small.seed, seeded.seed) == (0, 0, 1)
  assert small.total_steps == seeded.total_steps == 2 < full.total_steps
  for name in ("fipo_qwen2_5_32b", "grpo_qwen2_5_7b_math"):
    c = importlib.import_module(f"configs.{name}").get_config("seed=3,runlocal")
    assert c.seed == 3 and c.total_steps == 2


def _cli(warm_server, *args, cwd=ROOT):
  """`python -m fipo_jax.main ARGS`, forked from the warm server (tests/warm_python.py): the
  recipe module, and the loss it registers, load in the run's own process."""
  env = conftest.child_env(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(
    None, [os.environ.get("PYTHONPATH")])]))
  return warm_server.run("-m", "fipo_jax.main", *args, cwd=cwd, env=env)


def test_typed_recipe_args_on_the_command_line():
  """`--config configs/tiny_cpu.py:runlocal,seed=1 --config.rl.loss_mode=vanilla` parsed as
  fipo_jax.main parses it (its --config flag, on fresh flag values), then validated."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["fipo_jax.main", "--config", str(ROOT / "configs/tiny_cpu.py:runlocal,seed=1"),
          "--config.rl.loss_mode=vanilla"]
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  rc = config_lib.validate(config.value, num_devices=8)
  assert (rc.seed, rc.total_steps, rc.rl.loss_mode) == (1, 2, "vanilla")


_RECIPE = '''
"""tiny_cpu with a loss of its own: DAPO's loss times pg_scale, which it logs."""
import jax.numpy as jnp

from configs import tiny_cpu
from fipo_jax.algo import losses


@losses.register_policy_loss("scaled_dapo", hparams={"pg_scale": 1.0})
def scaled_dapo(log_prob, old_log_prob, advantages, mask, cfg, rollout_is_weights=None):
  loss, m = losses.dapo_loss(log_prob, old_log_prob, advantages, mask, cfg, rollout_is_weights)
  return cfg.pg_scale * loss, {**m, "actor/pg_scale": jnp.float32(cfg.pg_scale)}


def get_config(arg=None):
  return tiny_cpu.get_config(arg)
'''


@pytest.mark.slow
def test_a_registered_loss_trains_one_step_chosen_from_the_command_line(tmp_path, warm_server):
  """One registered function, its hyperparameter a config key: chosen by --config flags."""
  (tmp_path / "my_recipe.py").write_text(_RECIPE)
  w = tmp_path / "w"
  res = _cli(warm_server, "--config", f"{tmp_path / 'my_recipe.py'}:runlocal", "--workdir", str(w),
             "--config.rl.loss_mode=scaled_dapo", "--config.rl.pg_scale=0.25",
             "--config.total_steps=1", "--config.sft.steps=0", "--config.eval_every=0",
             "--config.checkpoint_every=0", "--config.rl.filter_groups_enable=False")
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  (step,) = [m for m in rows if m["step"] == 1]
  assert step["actor/pg_scale"] == 0.25 and "actor/pg_loss" in step
  assert json.loads((w / "config.json").read_text())["rl"]["pg_scale"] == 0.25
