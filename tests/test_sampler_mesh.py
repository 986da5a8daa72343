"""The sampler on its own mesh layout: validation, the layout rule, on-device handover, parity.

Train mesh fsdp=8 (ZeRO-3 weights) on the suite's 8 CPU devices. With `c.sampler_mesh` unset
the trainer derives the sampler's layout (`sharding.sampler_mesh_sizes`): tensor-parallel over
the tiny model's 2 KV heads, slots over the other 4 devices. The handover reshards on device,
the engine's params carry the rules table's shardings for the sampler mesh, and greedy
rollouts match a sampler set to the train mesh (`sampler_mesh` = (1, 8, 1)).
"""

import jax
import numpy as np
import pytest

from configs import tiny_cpu
from fipo_jax import config as config_lib
from fipo_jax import sharding
from fipo_jax.rl import setup as setup_lib
from fipo_jax.sampling import driver
from fipo_jax.sampling import params as params_lib


def _config(**sampler_mesh):
  c = tiny_cpu.get_config("runlocal")
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.sampler_mesh.update(**sampler_mesh)
  return c


def _err(config, num_devices=8) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, num_devices=num_devices)
  return str(e.value)


def test_sampler_mesh_validation():
  assert config_lib.validate(_config(), num_devices=8).sampler_mesh.resolve(8) is None  # unset
  rc = config_lib.validate(_config(data=-1, tensor=2, fsdp=1), num_devices=8)
  assert rc.sampler_mesh.resolve(8) == (4, 1, 2)
  assert _err(_config(data=4, tensor=2)) == (
    "sampler_mesh.fsdp: must be set with the other axes (-1 = the rest), or all 0 = the train "
    "mesh, got 0"
  )
  assert _err(_config(data=-2, fsdp=1, tensor=1)).startswith("sampler_mesh.data: must be -1")
  assert _err(_config(data=2, fsdp=2, tensor=1)) == (
    "sampler_mesh.data: mesh (2, 2, 1) has 4 devices but 8 are available"
  )
  assert "do not divide the 8 devices" in _err(_config(data=3, fsdp=-1, tensor=1))


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
  """((env, state) on the train mesh, (env, state) with a sampler mesh): the same seed, so the
  same initial params."""
  out = []
  for name, sm in (("same", dict(data=1, fsdp=8, tensor=1)), ("tp", {})):
    rc = config_lib.validate(_config(**sm), num_devices=jax.device_count())
    out.append(setup_lib.build(rc, str(tmp_path_factory.mktemp(name))))
  return tuple(out)


def test_sampler_layout_rule():
  devices = jax.devices()
  assert sharding.sampler_mesh_sizes(4, 2, devices) == (4, 1, 2)  # the tiny model: K = 2
  assert sharding.sampler_mesh_sizes(40, 8, devices) == (1, 1, 8)  # Qwen2.5-32B: K = 8
  assert sharding.sampler_mesh_sizes(28, 4, devices) == (2, 1, 4)  # Qwen2.5-7B: K = 4
  assert sharding.sampler_mesh_sizes(40, 8, devices[:4]) == (1, 1, 4)  # a host of 4 chips
  assert sharding.sampler_mesh_sizes(14, 2, devices[:1]) == (1, 1, 1)


def test_handover_reshards_on_device_into_the_rules_table_layout(envs):
  (same, same_state), (tp, tp_state) = envs
  assert same.engine.mesh is same.mesh
  assert same.sampler_params(same_state.params) is same_state.params
  assert dict(tp.engine.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  # On CPU a device-to-host copy is free and unguarded, so the guard watches the host-to-device
  # leg, which every host round trip ends with ("disallow_explicit" also catches device_put).
  with jax.transfer_guard("disallow_explicit"):
    params = tp.sampler_params(tp_state.params)
    jax.block_until_ready(params)
  with jax.transfer_guard("disallow_explicit"), pytest.raises(Exception, match="host-to-device"):
    jax.block_until_ready(sharding.shard_params(tp_state.params, tp.engine.mesh))  # staged via host

  want = sharding.state_shardings(params, tp.engine.mesh)
  got_leaves, want_leaves = jax.tree.leaves(params), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for x, s in zip(got_leaves, want_leaves, strict=True):
    assert x.sharding.mesh == tp.engine.mesh
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding.spec, s.spec)
  assert any("tensor" in jax.tree.leaves(tuple(x.sharding.spec)) for x in got_leaves)
  for x, y in zip(got_leaves, jax.tree.leaves(tp_state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The trainer's params keep the train layout (fsdp=8).
  assert all(x.sharding.mesh == tp.mesh for x in jax.tree.leaves(tp_state.params))


@pytest.mark.slow
def test_tensor_parallel_sampler_matches_the_train_mesh_sampler(envs):
  (same, same_state), (tp, tp_state) = envs
  prompts = [e["prompt_ids"] for e in same.val_examples[:6]]
  kw = dict(n=2, max_new_tokens=16, sampling=params_lib.Greedy(), eos_ids=same.eos_ids, seed=3)
  want = driver.run(same.engine, same.sampler_params(same_state.params), prompts, **kw).samples
  got = driver.run(tp.engine, tp.sampler_params(tp_state.params), prompts, **kw).samples
  assert [s.response_ids.tolist() for s in got] == [s.response_ids.tolist() for s in want]
  assert sum(len(s.response_ids) for s in got) > len(got)  # real responses, not only EOS
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(x.response_logprobs, y.response_logprobs, rtol=1e-5, atol=1e-5)
