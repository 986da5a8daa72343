"""The RL training system: collect rollouts, lay them out, jitted steps, the trainer loop.

The algorithm itself (Future-KL, the losses, aggregation, advantages, rollout correction,
verifier scores) is `fipo_jax.algo`. Its public names are re-exported here so that
`fipo_jax.rl.future_kl` and `fipo_jax.rl.compute_policy_loss` keep working.
"""

from fipo_jax.algo import (
  PolicyLossConfig,
  agg_loss,
  compute_policy_loss,
  filter_groups,
  future_kl,
  get_policy_loss,
  grpo_outcome_advantages,
  kl_penalty,
  math_dapo_score,
  microbatch_scale,
  overlong_penalty,
  register_policy_loss,
)

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
