"""The `rl` and `sft` (the supervised warm start before RL) sections of the run config: validated
once, frozen.

Its loss settings take their defaults from `fipo_jax.algo.losses.PolicyLossConfig` and their
allowed values from the algorithm package (the registered losses, aggregation modes, KL types,
rollout-correction modes), so that a loss added with `register_policy_loss` is a valid
`rl.loss_mode`, and its own hyperparameters are valid `rl.<name>` keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from collections.abc import Mapping
from typing import Any, ClassVar

from fipo_jax import config_schema
from fipo_jax.algo import aggregation, kl, losses, rollout_correction
from fipo_jax.algo import rewards as algo_rewards
from fipo_jax.config_schema import DTYPES, Section

# Owned by a module above the config (fipo_jax.rl.rollout): tests/test_config_loss.py checks
# that they agree.
FILTER_METRICS = ("acc", "score", "seq_reward", "seq_final_reward")
REWARD_FNS = tuple(algo_rewards.WRONG_SCORES)
OLD_LOG_PROB_SOURCES = ("trainer", "sampler")  # this section owns it: rl.old_log_prob_source

_LOSS = losses.PolicyLossConfig()


def loss_hparams() -> dict[str, Any]:
  """{name: default} of the registered losses' own hyperparameters (flat rl keys)."""
  return losses.loss_hparams()


def gather_loss_hparams(raw: dict[str, Any]) -> dict[str, Any]:
  """The config dict with the registered losses' hyperparameters moved from `rl.<name>` into
  `rl.loss_hparams` (the field that holds them); other keys are left to the schema."""
  rl = raw.get("rl")
  if not isinstance(rl, Mapping):
    return raw
  rl = dict(rl)
  given = {k: rl.pop(k) for k in loss_hparams() if k in rl}
  if given:
    rl["loss_hparams"] = {**dict(rl.get("loss_hparams") or {}), **given}
  return {**raw, "rl": rl}


@dataclasses.dataclass(frozen=True)
class RLSection(Section):
  SECTION: ClassVar[str] = "rl"
  # The loss settings' defaults are PolicyLossConfig's (their one home).
  loss_mode: str = losses.DEFAULT_LOSS_MODE
  clip_ratio_low: float = _LOSS.clip_ratio_low
  clip_ratio_high: float = _LOSS.clip_ratio_high
  clip_ratio_c: float = _LOSS.clip_ratio_c
  loss_agg_mode: str = _LOSS.loss_agg_mode
  decay_rate: float = _LOSS.decay_rate
  chunk_size: int = _LOSS.chunk_size
  future_kl_clip_ratio: float = _LOSS.future_kl_clip_ratio
  future_kl_clip_high_only: bool = _LOSS.future_kl_clip_high_only
  safety_thresh: float = _LOSS.safety_thresh
  # A registered loss's own hyperparameters, given as flat rl.<name> keys (gathered here by
  # validation; every registered one, with its default when not given).
  loss_hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  n: int = 16
  train_batch_size: int = 512
  gen_batch_size: int = 2048
  ppo_mini_batch_size: int = 64
  ppo_epochs: int = 1
  use_remove_padding: bool = True
  use_dynamic_bsz: bool = True
  ppo_max_token_len_per_device: int = 22528
  ppo_micro_batch_size_per_device: int = 8
  max_response_length: int = 20480
  filter_groups_enable: bool = True
  filter_groups_metric: str = "acc"
  max_num_gen_batches: int = 10
  max_empty_steps: int = 1
  norm_adv_by_std_in_grpo: bool = True
  use_kl_loss: bool = False
  kl_loss_coef: float = 0.0
  kl_loss_type: str = kl.DEFAULT_KL_TYPE
  entropy_coeff: float = 0.0
  reward_fn: str = "math_dapo"
  reward_workers: int = 0
  overlong_buffer_enable: bool = True
  overlong_buffer_len: int = 4096
  overlong_penalty_factor: float = 1.0
  rollout_is: str = "none"
  rollout_is_threshold: float = 2.0
  old_log_prob_source: str = "trainer"
  mismatch_metrics_every: int = 10
  sampler_dtype: str | None = None
  accept_sampler_mismatch: bool = False

  def __post_init__(self):
    self._check_loss()
    self._check_rollout_correction()
    self._check_batches()
    self._one_of("filter_groups_metric", FILTER_METRICS)
    self._one_of("reward_fn", REWARD_FNS)
    if self.reward_fn == "math_verify" and importlib.util.find_spec("math_verify") is None:
      self._fail("reward_fn", "'math_verify' needs the math-verify package: "
                 "pip install 'fipo_jax[math_verify]'")
    self._require(self.reward_workers >= 0, "reward_workers",
                  "must be >= 0 (verifier processes; 0 scores in the trainer's process)")
    if self.overlong_buffer_enable:
      self._require(0 < self.overlong_buffer_len < self.max_response_length, "overlong_buffer_len",
                    f"must be in (0, rl.max_response_length={self.max_response_length})")
      self._require(self.overlong_penalty_factor >= 0.0, "overlong_penalty_factor",
                    "must be >= 0")

  def _check_loss(self) -> None:
    self._one_of("loss_mode", losses.loss_modes())
    self._one_of("loss_agg_mode", aggregation.AGG_MODES)
    self._one_of("kl_loss_type", kl.KL_TYPES)
    self._require(0.0 <= self.clip_ratio_low < 1.0, "clip_ratio_low", "must be in [0, 1)")
    self._require(self.clip_ratio_high >= 0.0, "clip_ratio_high", "must be >= 0")
    self._require(self.clip_ratio_low <= self.clip_ratio_high, "clip_ratio_low",
                  f"must be <= rl.clip_ratio_high ({self.clip_ratio_high})")
    # verl asserts c > 1: the dual clip bounds the loss of ratios far above 1.
    self._require(self.clip_ratio_c > 1.0, "clip_ratio_c", "must be > 1.0")
    self._require(self.decay_rate > 0.0, "decay_rate", "must be > 0 (a half-life in tokens)")
    self._require(self.chunk_size > 0, "chunk_size", "must be > 0")
    self._require(self.future_kl_clip_ratio >= 0.0, "future_kl_clip_ratio", "must be >= 0")
    if not self.future_kl_clip_high_only:
      self._require(self.future_kl_clip_ratio < 1.0, "future_kl_clip_ratio",
                    "must be < 1 with symmetric clipping (lower bound 1 - ratio must be > 0)")
    self._require(self.safety_thresh > 0.0, "safety_thresh", "must be > 0")
    self._require(self.kl_loss_coef >= 0.0, "kl_loss_coef", "must be >= 0")
    declared = losses.loss_hparams()
    given = dict(self.loss_hparams)
    for key, value in given.items():
      if key not in declared:
        self._fail(key, f"not a registered loss hyperparameter; known: {sorted(declared)}")
      given[key] = config_schema.coerce(value, type(declared[key]), f"{self.SECTION}.{key}")
    object.__setattr__(self, "loss_hparams", types.MappingProxyType({**declared, **given}))

  def _check_batches(self) -> None:
    self._require(self.n >= 2, "n", "must be >= 2 (group-normalised advantages need a group)")
    self._require(self.train_batch_size > 0, "train_batch_size", "must be > 0")
    self._require(self.ppo_mini_batch_size > 0, "ppo_mini_batch_size", "must be > 0")
    self._require(self.train_batch_size % self.ppo_mini_batch_size == 0, "train_batch_size",
                  f"must be divisible by rl.ppo_mini_batch_size ({self.ppo_mini_batch_size})")
    self._require(self.gen_batch_size >= self.train_batch_size, "gen_batch_size",
                  f"must be >= rl.train_batch_size ({self.train_batch_size})")
    self._require(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
    self._require(self.max_response_length > 0, "max_response_length", "must be > 0")
    self._require(self.ppo_max_token_len_per_device > 0, "ppo_max_token_len_per_device",
                  "must be > 0")
    self._require(self.ppo_micro_batch_size_per_device > 0, "ppo_micro_batch_size_per_device",
                  "must be > 0")
    self._require(self.max_num_gen_batches >= 0, "max_num_gen_batches", "must be >= 0 (0 = no cap)")
    self._require(self.max_empty_steps >= 0, "max_empty_steps", "must be >= 0 (0 = never stop)")

  def _check_rollout_correction(self) -> None:
    self._one_of("rollout_is", rollout_correction.MODES)
    self._one_of("old_log_prob_source", OLD_LOG_PROB_SOURCES)
    self._require(self.rollout_is_threshold > 0.0, "rollout_is_threshold", "must be > 0")
    self._require(self.mismatch_metrics_every >= 0, "mismatch_metrics_every",
                  "must be >= 0 (0 = never with old_log_prob_source='sampler')")
    if self.sampler_dtype is not None:
      self._one_of("sampler_dtype", DTYPES)
    if self.old_log_prob_source == "sampler" and self.rollout_is != "none":
      self._fail("rollout_is", f"{self.rollout_is!r} needs rl.old_log_prob_source='trainer': "
                 "with the sampler's log-probs as old log-probs every weight is 1")

  @property
  def num_mini_batches(self) -> int:
    """Optimizer steps per rollout batch and epoch (8 in the 32B FIPO recipe)."""
    return self.train_batch_size // self.ppo_mini_batch_size


@dataclasses.dataclass(frozen=True)
class SFTSection(Section):
  SECTION: ClassVar[str] = "sft"
  steps: int = 0
  lr: float = 1e-3
  batch_size: int = 32
  wrong_fraction: float = 0.0
  loss_threshold: float = 0.0
  warmup_steps: int = 0
  chain_fraction: float = 0.0
  mix_steps: int = 0

  def __post_init__(self):
    self._require(self.steps >= 0, "steps", "must be >= 0 (0 = no warm start)")
    self._require(self.loss_threshold >= 0.0, "loss_threshold", "must be >= 0 (0 = none)")
    self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    self._require(0.0 <= self.chain_fraction <= 1.0, "chain_fraction", "must be in [0, 1]")
    self._require(self.mix_steps >= 0, "mix_steps", "must be >= 0")
    self._require(0.0 <= self.wrong_fraction <= 1.0, "wrong_fraction", "must be in [0, 1]")
    self._require(self.lr > 0.0, "lr", "must be > 0")
    self._require(self.batch_size > 0, "batch_size", "must be > 0")
