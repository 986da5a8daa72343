"""The chip table, the roofline, and the RL step predicted from each program's roofline time.

The step half of the performance model (fipo_jax.perf_model reads the programs' costs): pure
functions of numbers. Times in seconds, bytes per chip.
"""

from __future__ import annotations

import dataclasses
import math

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int  # what the compiler lets one program use (its RESOURCE_EXHAUSTED limit)
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s out of one chip, all links


# HBM as libtpu reports it when a program does not fit (95.74G / 31.25G / 15.75G GiB); peaks,
# HBM and ICI bandwidth (4,800 / 3,584 / 1,600 Gbps per chip) from the Cloud TPU
# system-architecture pages.
CHIPS = {
  "v5p": Chip(int(95.74 * GiB), 459e12, 2765e9, 600e9),
  "v6e": Chip(int(31.25 * GiB), 918e12, 1640e9, 448e9),
  "v5e": Chip(int(15.75 * GiB), 197e12, 819e9, 200e9),
}


def roofline_seconds(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip) -> float:
  """The slowest of compute at peak, HBM at full bandwidth, collectives over all ICI links."""
  return max(
    flops / chip.bf16_flops, hbm_bytes / chip.hbm_bandwidth, collective_bytes / chip.ici_bandwidth
  )


# verl's measured share of an RL step (generate / old log-probs / update), DAPO-style runs.
VERL_SPLIT = {"generate": (0.41, 0.50), "old_log_prob": (0.12, 0.19), "update": (0.32, 0.38)}


@dataclasses.dataclass(frozen=True)
class RLStep:
  """The work of one RL step, in calls of each compiled program."""

  prompts: int  # rl.train_batch_size (dynamic sampling's extra rounds not counted)
  responses: int  # prompts x rl.n
  mean_prompt: int
  mean_response: int
  num_slots: int  # concurrent decode slots, all busy (the long tail not counted)
  prefill_rows: int  # prompts per prefill call
  insert_rows: int  # requests per insert call
  updates: int  # rl.num_mini_batches x rl.ppo_epochs train_step calls
  log_prob_passes: int  # rl.num_mini_batches x (1, or 2 with the KL term's reference pass)


def rl_step_seconds(step: RLStep, seconds: dict[str, float], chips: int) -> dict:
  """The predicted RL step from each program's roofline seconds per call.

  seconds: train_step, old_log_prob, handover, prefill, insert, and `decode` = one decode step
  of all slots at the mean fill. Returns the step's seconds, its split, tokens/s per chip.
  """
  decode_steps = math.ceil(step.responses * step.mean_response / step.num_slots)
  generate = (
    decode_steps * seconds["decode"]
    + seconds["handover"]
    + math.ceil(step.prompts / step.prefill_rows) * seconds["prefill"]
    + math.ceil(step.responses / step.insert_rows) * seconds["insert"]
  )
  parts = {
    "generate": generate,
    "old_log_prob": step.log_prob_passes * seconds["old_log_prob"],
    "update": step.updates * seconds["train_step"],
  }
  total = sum(parts.values())
  tokens = step.responses * (step.mean_prompt + step.mean_response)
  return dict(
    rl_step_seconds=total,
    rl_step_seconds_by_phase=parts,
    rl_step_split={k: v / total for k, v in parts.items()},
    verl_split=VERL_SPLIT,
    decode_steps_per_rl_step=decode_steps,
    rl_tokens_per_s_per_chip=tokens / total / chips,
  )
