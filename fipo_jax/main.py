"""python -m fipo_jax.main --config configs/<name>.py[:arg] --workdir DIR [--config.a.b=v].

Parses flags and the config, validates it (exit code 2 with one clear line on a bad config,
before anything is compiled), and calls `trainer.run(config, workdir)`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file: configs/<name>.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and absl INFO logs drown the progress bar
  from fipo_jax import config as config_lib  # after flag parsing: keeps --help fast
  from fipo_jax.rl import trainer

  try:
    run_config = config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("config validated; starting in %s", _WORKDIR.value)
  trainer.run(_CONFIG.value, _WORKDIR.value, run_config=run_config)


if __name__ == "__main__":
  app.run(main)
