"""python -m fipo_jax.main --config configs/<name>.py[:arg] --workdir DIR [--config.a.b=v].

Parses flags and the config, validates it against the device count and calls
`trainer.run(config, workdir)`. Every failure a user can fix ends in one clear line on stderr:

  exit 2  a bad flag or config (unknown key, wrong type, bad value, mesh vs devices, missing
          path) or unreadable data/model files -- all before anything is compiled;
  exit 3  training diverged (too many consecutive non-finite updates; last good state saved).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fipo_jax import distributed  # defines --coordinator_address etc.; imports no jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file: configs/<name>.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(kind: str, message: str, code: int) -> None:
  print(f"{kind}: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with flag/override errors turned into one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. --config.rl.n=abc: wrong type, or a missing required flag
    _fail("config error", e, 2)
  except (AttributeError, KeyError) as e:  # config_flags: --config.<unknown key>=...
    name = str(e).strip("\"' ")
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    field = next((o.removeprefix("config.") for o in overrides if name in o.split(".")), name)
    _fail("config error", f"{field}: unknown key (not in the schema)", 2)
  return []  # unreachable


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and absl INFO logs drown the progress bar
  import jax  # after flag parsing: keeps --help fast

  distributed.initialize()  # multi-host: before anything touches a device

  from fipo_jax import config as config_lib
  from fipo_jax.rl import trainer

  try:
    run_config = config_lib.validate(_CONFIG.value, num_devices=jax.device_count())
  except config_lib.ConfigError as e:
    _fail("config error", e, 2)
  logging.info("config validated; starting in %s", _WORKDIR.value)
  try:
    trainer.run(_CONFIG.value, _WORKDIR.value, run_config=run_config)
  except trainer.SetupError as e:
    _fail("setup error", e, 2)
  except trainer.TrainingDiverged as e:
    _fail("training diverged", e, 3)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
