"""The RL training system: collect rollouts, lay them out, jitted steps, the trainer loop.

The algorithm itself (Future-KL, the losses, aggregation, advantages, rollout correction,
verifier scores) is `fipo_jax.algo`. Its public names are re-exported here so that
`fipo_jax.rl.future_kl` and `fipo_jax.rl.compute_policy_loss` keep working.
"""

from fipo_jax import algo
from fipo_jax.algo import *  # noqa: F403  (the names of algo.__all__, restated nowhere else)

__all__ = list(algo.__all__)
