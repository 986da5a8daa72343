"""The `rollout` section of the run config: synchronous, partial or disaggregated rollouts.

`rollout.mode='partial'` is stage A of asynchronous rollouts (fipo_jax/rl/partial.py): sampling
for RL step k stops once the step's batch is full, and the unfinished groups resume under the
next policy. FIPO stays exact: the old (proximal) log-probs are the trainer's recompute at step
start, and the staleness is corrected by a truncated importance weight on each token's loss.

`rollout.mode='disaggregated'` runs the same schedule on two disjoint meshes in one program:
each process gives its last `rollout.sampler_devices` devices to the sampler and keeps the rest
for the trainer; the weights move device to device after each update
(fipo_jax/sampling/staging.py). With `rollout.overlap_calls` = c > 0 (and eta >= 1) the sampler
decodes while the trainer updates: after each step's updates are dispatched, an overlap round runs
c decode calls with the weights the batch was sampled with; its unfinished requests resume
under the next weights (docs/async_rollouts.md).
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
  sampler_devices: int = 0  # disaggregated: each process's devices given to the sampler
  overlap_calls: int = 0  # disaggregated, eta >= 1: decode calls run while the update runs

  def __post_init__(self):
    self._one_of("mode", MODES)
    self._require(self.max_staleness >= 0, "max_staleness", "must be >= 0 (policy versions)")
    self._one_of("staleness_is", STALENESS_IS)
    if self.mode == "disaggregated":
      self._require(self.sampler_devices >= 1, "sampler_devices",
                    "must be >= 1 with rollout.mode='disaggregated' (each process's devices "
                    "given to the sampler)")
    else:
      self._require(self.sampler_devices == 0, "sampler_devices",
                    "applies only to rollout.mode='disaggregated'; leave it 0")
    self._require(self.overlap_calls >= 0, "overlap_calls", "must be >= 0 (decode calls)")
    if self.overlap_calls > 0 and self.mode != "disaggregated":
      self._fail("overlap_calls", f"needs rollout.mode='disaggregated' (a sampler on devices of "
                 f"its own), got mode {self.mode!r}; leave it 0")
    if self.overlap_calls > 0 and self.max_staleness < 1:
      self._fail("overlap_calls", "needs rollout.max_staleness >= 1 (an overlap round's tokens "
                 "are one version stale when admitted), got 0; leave it 0")

  @property
  def carries(self) -> bool:
    """Whether stage A's scheduler samples (partial, and disaggregated on its own meshes)."""
    return self.mode in ("partial", "disaggregated")

  @property
  def resumes(self) -> bool:
    """Whether unfinished requests carry over and resume (max_staleness >= 1 in a carrying
    mode): the sampler must then take a prompt plus a generated prefix as its prompt."""
    return self.carries and self.max_staleness >= 1

  def device_counts(self, num_devices: int, num_processes: int = 1) -> tuple[int, int]:
    """(trainer devices, sampler devices) over all processes: every device for both when
    colocated. Raises ConfigError when the split does not fit the processes' devices."""
    if self.mode != "disaggregated":
      return num_devices, num_devices
    local, k = num_devices // num_processes, self.sampler_devices
    self._require(k < local, "sampler_devices",
                  f"must be below each process's {local} devices (the trainer keeps the rest)")
    self._require((local - k) % k == 0, "sampler_devices",
                  f"must divide the trainer's {local - k} devices per process (the weights move "
                  f"device to device, each sampler device from its own trainer devices)")
    return (local - k) * num_processes, k * num_processes


def check(rc) -> None:
  """Cross-section checks of a RunConfig: the carrying modes correct staleness with
  rollout.staleness_is (rl.rollout_is stays 'none'); with the sampler's log-probs as the old
  ones ("bypass", wrong for FIPO under staleness) there is nothing to weight."""
  if not rc.rollout.carries:
    return
  if rc.rl.rollout_is != "none":
    raise ConfigError("rl.rollout_is", f"must be 'none' with rollout.mode={rc.rollout.mode!r} "
                      f"(its correction is rollout.staleness_is), got {rc.rl.rollout_is!r}")
  if rc.rl.old_log_prob_source == "sampler" and rc.rollout.staleness_is != "none":
    raise ConfigError("rollout.staleness_is", "must be 'none' with rl.old_log_prob_source="
                      f"'sampler' (bypass: every weight is 1), got {rc.rollout.staleness_is!r}")
