"""rollout.mode='disaggregated' (stage B's meshes): the config's device split, the engine taking
weights from a trainer on other devices, and the trainer's run against the synchronous one.

The schedule is partial mode's (stage A); what differs is where things run: each process's
last rollout.sampler_devices devices sample, the others train, and the weights move device to
device after each update (fipo_jax/sampling/staging.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_cpu
from fipo_jax import config as config_lib
from fipo_jax import models, policy, sharding
from fipo_jax.config_schema import ConfigError
from fipo_jax.rl import setup
from fipo_jax.sampling import engine as engine_lib


def _config(**rollout):
  config = tiny_cpu.get_config()
  for key, value in rollout.items():
    config.rollout[key] = value
  return config


def test_the_split_is_validated_in_one_line_before_anything_compiles():
  with pytest.raises(ConfigError, match=r"rollout.sampler_devices: must be >= 1 with "):
    config_lib.validate(_config(mode="disaggregated"), check_paths=False)
  with pytest.raises(ConfigError, match=r"rollout.sampler_devices: applies only to "):
    config_lib.validate(_config(mode="partial", sampler_devices=2), check_paths=False)
  bad = {1: "must be below each process's 1 devices", 3: "must divide the trainer's 5 devices",
         8: "must be below each process's 8 devices"}
  for k, why in bad.items():
    devices = 1 if k == 1 else 8
    with pytest.raises(ConfigError, match=f"rollout.sampler_devices: {why}"):
      config_lib.validate(_config(mode="disaggregated", sampler_devices=k),
                          num_devices=devices, check_paths=False)
  with pytest.raises(ConfigError, match=r"rl.rollout_is: must be 'none' with "
                                        r"rollout.mode='disaggregated'"):
    config = _config(mode="disaggregated", sampler_devices=4)
    config.rl.rollout_is = "token"
    config_lib.validate(config, check_paths=False)


def test_device_counts_and_meshes_follow_the_split():
  rollout = config_lib.validate(_config(mode="disaggregated", sampler_devices=2),
                                check_paths=False).rollout
  assert rollout.device_counts(8) == (6, 2)
  assert rollout.device_counts(8, num_processes=2) == (4, 4)  # 2 of each process's 4 sample
  rc = config_lib.validate(_config(mode="disaggregated", sampler_devices=4), num_devices=8,
                           check_paths=False)
  assert (rc.rollout.carries, rc.rollout.resumes) == (True, True)  # partial's schedule
  trainer_devices, sampler_devices = setup.device_split(rc)
  assert trainer_devices == jax.devices()[:4] and sampler_devices == jax.devices()[4:]
  train = setup.train_mesh(rc, trainer_devices)
  assert train.devices.shape == (1, 4, 1)  # fsdp=-1 over the trainer's 4
  smesh = setup.sampler_mesh(rc, policy.model_config(rc), train, sampler_devices)
  assert list(smesh.devices.flat) == sampler_devices
  colocated = config_lib.validate(_config(), num_devices=8, check_paths=False)
  assert setup.device_split(colocated) == (jax.devices(), jax.devices())


def _engine(devices, dtype=jnp.bfloat16):
  cfg = models.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32,
                           intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                           head_dim=8, dtype=dtype, param_dtype=dtype)
  mesh = sharding.make_mesh(len(devices) // 2, 1, 2, devices=devices)
  graphdef, _ = nnx.split(models.abstract_model(cfg))
  return engine_lib.Engine(cfg, graphdef, engine_lib.EngineConfig(num_slots=2), mesh=mesh), cfg


def test_the_engine_takes_weights_from_a_trainer_on_other_devices_as_a_colocated_one():
  """Float32 masters on devices 0-3 (FSDP): an engine on devices 4-7 holds the same bfloat16
  weights, in the same layout, as an engine on devices 0-3 (the colocated handover)."""
  devices = jax.devices()
  colocated, cfg = _engine(devices[:4])
  disjoint, _ = _engine(devices[4:])
  f32 = models.ModelConfig(**{**cfg.__dict__, "dtype": jnp.float32, "param_dtype": jnp.float32})
  masters = sharding.shard_params(nnx.split(models.init_model(f32, seed=0))[1],
                                  sharding.make_mesh(1, 4, 1, devices=devices[:4]))
  want, got = colocated.load_params(masters), disjoint.load_params(masters)
  abstract = disjoint.abstract_params(masters)
  for w, g, a in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(abstract),
                     strict=True):
    assert g.sharding.device_set == set(devices[4:]) and g.dtype == w.dtype == a.dtype
    assert g.sharding.spec == w.sharding.spec == a.sharding.spec and g.shape == a.shape
    np.testing.assert_array_equal(np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16))
  disjoint.load_params(jax.tree.map(lambda x: x + 1, masters))  # a second step: no recompile
  assert disjoint.handover(masters)._cache_size() == 1


def test_overlap_calls_are_validated_in_one_line_before_anything_compiles():
  """rollout.overlap_calls > 0 needs the sampler's own devices and eta >= 1."""
  with pytest.raises(ConfigError, match=r"^rollout.overlap_calls: must be >= 0 \(decode calls\), "
                                        r"got -1$"):
    config_lib.validate(_config(mode="disaggregated", sampler_devices=4, overlap_calls=-1),
                        check_paths=False)
  with pytest.raises(ConfigError, match=r"^rollout.overlap_calls: needs rollout.mode="
                                        r"'disaggregated' .*got mode 'partial'; leave it 0$"):
    config_lib.validate(_config(mode="partial", overlap_calls=2), check_paths=False)
  with pytest.raises(ConfigError, match=r"^rollout.overlap_calls: needs rollout.max_staleness "
                                        r">= 1 .*got 0; leave it 0$"):
    config_lib.validate(_config(mode="disaggregated", sampler_devices=4, max_staleness=0,
                                overlap_calls=2), check_paths=False)
  rc = config_lib.validate(_config(mode="disaggregated", sampler_devices=4, overlap_calls=2),
                           num_devices=8, check_paths=False)
  assert rc.rollout.overlap_calls == 2
