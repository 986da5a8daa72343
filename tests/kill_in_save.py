"""`python tests/kill_in_save.py STEP ARGS...`: `python -m fipo_jax.main ARGS...`, SIGKILLed right
after the save of checkpoint STEP has started, i.e. while orbax is still writing it.

A test-only entry point (tests/test_reliability_process.py): it wraps the checkpoint manager's
`save` before running the trainer, so production code carries no kill switch.
"""

import os
import runpy
import signal
import sys

from fipo_jax import checkpoints


def _kill_after_save(step: int) -> None:
  save = checkpoints.CheckpointManager.save

  def save_then_die(self, at: int, **kwargs) -> bool:
    started = save(self, at, **kwargs)
    if int(at) == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return started

  checkpoints.CheckpointManager.save = save_then_die


if __name__ == "__main__":
  _kill_after_save(int(sys.argv.pop(1)))
  sys.argv[0] = "fipo_jax.main"
  runpy.run_module("fipo_jax.main", run_name="__main__", alter_sys=True)
