"""The optimizer of the RL updates: AdamW and its learning-rate schedule, built in one place.

`make_optimizer(optim, total_updates=...)` returns `(tx, lr_schedule)`: `tx` steps the schedule
at its own update count, and the trainer logs `lr_schedule` at that same count
(`last_update_lr`), so the lr that is logged is the lr that was used.

Schedules count OPTIMIZER UPDATES, as optax does: an RL step makes
`rl.num_mini_batches x rl.ppo_epochs` of them (8 in the 32B recipe), so a run makes
`RunConfig.total_updates = total_steps x num_mini_batches x ppo_epochs`, and `optim.warmup_steps`
is in updates too. (verl advances its torch scheduler once per RL step, after all of the step's
mini-batches; here the warmup and the cosine move with every update.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fipo_jax import config as config_lib


def lr_schedule(optim: config_lib.OptimSection, total_updates: int) -> optax.Schedule:
  """The learning rate at each update count 0, 1, ... (count = updates applied before it).

  constant: linear warmup from 0 (lr 0 on the first update, as verl's
    `get_constant_schedule_with_warmup`) over `warmup_steps` updates, then `lr`.
  cosine: the same warmup, then a half cosine from `lr` that reaches its floor 0 (verl's
    `min_lr_ratio=0`) exactly at count `total_updates - 1`, the run's last update.
  """
  lr, warmup = optim.lr, optim.warmup_steps
  if optim.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    last = total_updates - 1
    if last <= warmup:
      raise ValueError(
        f"optim.schedule='cosine' needs optim.warmup_steps ({warmup}) < the run's "
        f"last update index ({last}, of {total_updates} updates)"
      )
    decay = optax.cosine_decay_schedule(lr, last - warmup, alpha=0.0)
  else:
    raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r} (constant|cosine)")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(
  optim: config_lib.OptimSection, *, total_updates: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay) after global-norm clipping, on `lr_schedule`.

  Args:
    optim: the validated `optim` section.
    total_updates: optimizer updates of the whole run (`RunConfig.total_updates`); only the
      cosine schedule reads it.

  Returns:
    (tx, lr_schedule). A constant lr without warmup is passed to adamw as a number, which
    keeps the optimizer state free of a schedule counter (the state of earlier checkpoints).
  """
  schedule = lr_schedule(optim, total_updates)
  constant = optim.schedule == "constant" and not optim.warmup_steps
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  parts.append(
    optax.adamw(
      optim.lr if constant else schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
    )
  )
  return optax.chain(*parts), schedule


def update_count(opt_state: Any) -> jax.Array:
  """Updates applied so far: Adam's step count (a skipped non-finite update does not count)."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
  if len(adam) != 1:
    raise ValueError(f"expected one Adam state in the optimizer state, found {len(adam)}")
  return adam[0].count


def last_update_lr(schedule: optax.Schedule, opt_state: Any) -> float:
  """The lr the most recent update used: the schedule at count - 1 (count 0: the first's)."""
  count = jnp.maximum(jnp.asarray(update_count(opt_state)) - 1, 0)
  return float(schedule(count))


def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)
