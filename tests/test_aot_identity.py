"""What the trainer runs is what fipo_jax.aot compiles (8 CPU devices, the tiny recipe).

The trainer's Env (fipo_jax.rl.setup.build) and aot's programs (fipo_jax.aot_phases.build, here
on the CPU devices instead of a TPU topology) lower to the same HLO for a decode call and for
the train step; the decode step on the trainer's sampler layout gathers no weights, where the
same engine on the FSDP train mesh does; the handover casts to the sampler's dtype.
"""

import jax
import jax.numpy as jnp
import pytest

from configs import tiny_cpu
from fipo_jax import aot, aot_phases, perf_model, policy
from fipo_jax import config as config_lib
from fipo_jax.rl import setup as setup_lib
from fipo_jax.rl import steps as steps_lib


def _run(**sampler_mesh):
  c = tiny_cpu.get_config("runlocal")
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.model.dtype = "bfloat16"  # compute in bf16: the sampler holds bf16 weights
  c.sampler_mesh.update(**sampler_mesh)
  return config_lib.validate(c, num_devices=jax.device_count())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """(the trainer's Env and state, aot's Programs) for the same recipe."""
  rc = _run()
  env, state = setup_lib.build(rc, str(tmp_path_factory.mktemp("trainer")))
  progs = aot_phases.build(rc, aot.model_config(rc, platform="cpu"), jax.devices())
  return rc, env, state, progs


def _sds(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.mark.slow
def test_the_trainers_decode_and_aots_lower_to_the_same_hlo(both):
  rc, env, state, progs = both
  assert dict(env.engine.mesh.shape) == dict(progs.engine.mesh.shape) == {
    "data": 4, "fsdp": 1, "tensor": 2}  # the layout rule: TP over the 2 KV heads
  sampler = env.sampler_params(state.params)
  assert {x.dtype for x in jax.tree.leaves(sampler)} == {jnp.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}  # masters
  assert jax.tree.structure(_sds(sampler)) == jax.tree.structure(progs.sampler_params)
  for x, y in zip(jax.tree.leaves(_sds(sampler)), jax.tree.leaves(progs.sampler_params),
                  strict=True):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
    assert x.sharding.is_equivalent_to(y.sharding, len(x.shape))
  trainer = env.engine.trace_generate(_sds(sampler), sampling=env.train_sampling).lower()
  ours = aot_phases.traced(progs, "decode").lower()
  assert trainer.as_text() == ours.as_text()
  handover = env.engine.handover(state.params).trace(_sds(state.params)).lower()
  assert handover.as_text() == aot_phases.traced(progs, "handover").lower().as_text()


@pytest.mark.slow
def test_the_trainers_train_step_and_aots_lower_to_the_same_hlo(both):
  rc, env, state, progs = both
  steps = steps_lib.jit_steps(env.graphdef, cfg=env.update_cfg, tx=env.tx,
                              param_sharding=env.param_sharding,
                              opt_sharding=env.opt_sharding)  # what trainer.run calls
  batch, _, _ = aot_phases.train_batch(progs, 16, 16)
  trainer = steps.train.trace(_sds(state.params), _sds(state.opt_state), batch).lower()
  ours = aot_phases.traced(progs, "train_step", batch).lower()
  assert trainer.as_text() == ours.as_text()
  # The old-log-prob pass leaves its output sharded like the batch, not replicated.
  out = aot_phases.traced(progs, "old_log_prob", batch).out_info
  for x in jax.tree.leaves(out):
    assert x.sharding.spec[1] == ("data", "fsdp")


def _weight_gathers(progs) -> float:
  compiled = aot_phases.traced(progs, "decode").lower().compile()
  cost = perf_model.program_cost(compiled.as_text(), (1, 2))
  shapes = [x.shape for x in jax.tree.leaves(progs.params)]
  return perf_model.weight_allgather_bytes(cost.all_gathers, shapes)


@pytest.mark.slow
def test_decode_on_the_trainers_sampler_layout_gathers_no_weights(both):
  *_, progs = both
  assert _weight_gathers(progs) == 0
  # The same engine on the FSDP train mesh (sampler_mesh = mesh) gathers its weights per step.
  rc = _run(data=1, fsdp=8, tensor=1)
  fsdp = aot_phases.build(rc, aot.model_config(rc, platform="cpu"), jax.devices())
  assert fsdp.engine.mesh is fsdp.mesh
  assert _weight_gathers(fsdp) > 0


def test_aot_model_config_resolves_attention_for_the_platform():
  rc = _run()
  assert policy.model_config(rc).attention_impl == "auto"
  assert aot.model_config(rc).attention_impl == "splash"
  assert aot.model_config(rc, platform="cpu").attention_impl == "blockwise"
  assert aot.model_config(rc, num_layers=1).num_layers == 1
