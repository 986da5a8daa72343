"""RL core: future_kl, policy losses, advantages, rewards, train steps, trainer loop.

`fipo_jax.rl.future_kl` is the function (the public API); its module is `fipo_jax.rl.fkl`.
"""

from fipo_jax.rl.advantages import filter_groups, grpo_outcome_advantages
from fipo_jax.rl.aggregation import agg_loss, microbatch_scale
from fipo_jax.rl.fkl import future_kl
from fipo_jax.rl.losses import (
  PolicyLossConfig,
  compute_policy_loss,
  get_policy_loss,
  kl_penalty,
  register_policy_loss,
)
from fipo_jax.rl.rewards import math_dapo_score, overlong_penalty

__all__ = [
  "PolicyLossConfig",
  "agg_loss",
  "compute_policy_loss",
  "filter_groups",
  "future_kl",
  "get_policy_loss",
  "grpo_outcome_advantages",
  "kl_penalty",
  "math_dapo_score",
  "microbatch_scale",
  "overlong_penalty",
  "register_policy_loss",
]
