"""RL core: future_kl, policy losses, advantages, rewards, train steps, trainer loop.

Note: `fipo_jax.rl.future_kl` is the function (the public API); the module of the same name
is `importlib.import_module("fipo_jax.rl.future_kl")`.
"""

from fipo_jax.rl.aggregation import agg_loss, microbatch_scale
from fipo_jax.rl.future_kl import future_kl
from fipo_jax.rl.losses import (
  PolicyLossConfig,
  compute_policy_loss,
  get_policy_loss,
  register_policy_loss,
)

__all__ = [
  "PolicyLossConfig",
  "agg_loss",
  "compute_policy_loss",
  "future_kl",
  "get_policy_loss",
  "microbatch_scale",
  "register_policy_loss",
]
