"""The `rollout` section of the run config: synchronous or partial (carried-over) rollouts.

`rollout.mode='partial'` is stage A of asynchronous rollouts (fipo_jax/rl/partial.py): sampling
for RL step k stops once the step's batch is full, and the unfinished groups resume under the
next policy. FIPO stays exact: the old (proximal) log-probs are the trainer's recompute at step
start, and the staleness is corrected by a truncated importance weight on each token's loss.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fipo_jax.config_schema import ConfigError, Section

MODES = ("sync", "partial", "disaggregated")
STALENESS_IS = ("token", "sequence", "none")  # rollout_correction's modes


@dataclasses.dataclass(frozen=True)
class RolloutSection(Section):
  SECTION: ClassVar[str] = "rollout"
  mode: str = "sync"
  max_staleness: int = 1
  staleness_is: str = "token"

  def __post_init__(self):
    self._one_of("mode", MODES)
    if self.mode == "disaggregated":
      self._fail("mode", "'disaggregated' (separate sampler and trainer meshes) is not built "
                 "yet; use 'sync' or 'partial'")
    self._require(self.max_staleness >= 0, "max_staleness", "must be >= 0 (policy versions)")
    self._one_of("staleness_is", STALENESS_IS)

  @property
  def resumes(self) -> bool:
    """Whether unfinished requests carry over and resume (partial with max_staleness >= 1): the
    sampler must then take a prompt plus a generated prefix as its prompt."""
    return self.mode == "partial" and self.max_staleness >= 1


def check(rc) -> None:
  """Cross-section checks of a RunConfig: rollout.mode='partial' corrects staleness with
  rollout.staleness_is (rl.rollout_is stays 'none'); with the sampler's log-probs as the old
  ones ("bypass", wrong for FIPO under staleness) there is nothing to weight."""
  if rc.rollout.mode != "partial":
    return
  if rc.rl.rollout_is != "none":
    raise ConfigError("rl.rollout_is", "must be 'none' with rollout.mode='partial' (its "
                      f"correction is rollout.staleness_is), got {rc.rl.rollout_is!r}")
  if rc.rl.old_log_prob_source == "sampler" and rc.rollout.staleness_is != "none":
    raise ConfigError("rollout.staleness_is", "must be 'none' with rl.old_log_prob_source="
                      f"'sampler' (bypass: every weight is 1), got {rc.rollout.staleness_is!r}")
