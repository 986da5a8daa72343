"""Jitted steps keep their own names in profiles and HLO dumps (jit_train_step, not jit_wrapped)."""

import functools

import jax
import jax.numpy as jnp
import optax

from fipo_jax.rl import steps as steps_lib


def _scaled(x, *, k):
  return x * k


def test_a_step_traced_under_a_mesh_keeps_its_name():
  mesh = jax.make_mesh((1,), ("data",))
  fn = steps_lib.under_mesh(mesh, functools.partial(_scaled, k=2.0))
  text = jax.jit(fn).lower(jnp.ones(2)).as_text()
  assert "module @jit__scaled " in text


def test_jit_steps_are_named_after_their_steps():
  # The run's mesh axes: the log-prob pass pins its output to the (data, fsdp) batch axes.
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  steps = steps_lib.jit_steps(None, cfg=steps_lib.UpdateConfig(), tx=optax.sgd(0.1),
                              param_sharding={"w": shard}, opt_sharding=None)
  assert (steps.train.__name__, steps.log_prob.__name__) == ("train_step", "log_prob_step")
