"""The FIPO algorithm, pure jax and numpy: what a paper's equations say, and nothing else.

  fkl                 the discounted Future-KL sum F[t] = sum_{k>=t} gamma^(k-t) delta[k]
  losses              policy losses chosen by name (`register_policy_loss`), the KL penalty
  aggregation         loss aggregation modes, micro-batch scaling, masked statistics
  advantages          GRPO group advantages, DAPO's dynamic-sampling group filter
  rollout_correction  sampler-trainer mismatch metrics, truncated importance weights
  rewards             verifier scores (math_dapo) and DAPO's soft overlong penalty

This package imports only jax, numpy and the standard library: no config, sharding, models
or I/O (tests/test_algo_imports.py fails otherwise). The training system (`fipo_jax.rl`)
builds on it; nothing here knows it exists.
"""

from fipo_jax.algo.advantages import filter_groups, grpo_outcome_advantages
from fipo_jax.algo.aggregation import agg_loss, microbatch_scale
from fipo_jax.algo.fkl import future_kl
from fipo_jax.algo.losses import (
  PolicyLossConfig,
  compute_policy_loss,
  get_policy_loss,
  kl_penalty,
  register_policy_loss,
)
from fipo_jax.algo.rewards import math_dapo_score, overlong_penalty

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
