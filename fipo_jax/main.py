"""python -m fipo_jax.main --config configs/<name>.py[:arg] --workdir DIR [--config.a.b=v].

Parses flags and the config, validates it against the device count and calls
`trainer.run(config, workdir)` (with --validate_only: prints the validated config and exits).
Every failure a user can fix ends in one clear line on stderr:

  exit 2  a bad flag or config (unknown key, wrong type, bad value, mesh vs devices, missing
          path) or unreadable data/model files -- all before anything is compiled;
  exit 2  the run cannot learn: the warm start missed sft.loss_threshold, or no group of mixed
          accuracy at the step-0 eval or in rl.max_empty_steps RL steps in a row;
  exit 3  training diverged (too many consecutive non-finite updates; last good state saved).
"""

from __future__ import annotations

import json
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fipo_jax import config_schema, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file: configs/<name>.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_VALIDATE_ONLY = flags.DEFINE_bool(
  "validate_only", False, "Validate the config, print it (JSON, as the trainer reads it), exit.")
# Multi-host (fipo_jax.distributed.initialize; unset: its FIPO_* environment variables).
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0's coordinator (env FIPO_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in the run, one per host (env FIPO_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in [0, num_processes) (env FIPO_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(kind: str, message: str, code: int) -> None:
  print(f"{kind}: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with flag/override errors turned into one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. --config.rl.n=abc: wrong type, or a missing required flag
    _fail("config error", _list_field_hint(str(e)) or e, 2)
  except (AttributeError, KeyError) as e:  # config_flags: --config.<unknown key>=...
    _fail("config error", _unknown_key(e, argv), 2)
  return []  # unreachable


def _overrides(argv: list[str]) -> list[str]:
  """['rl.n', ...]: the dotted keys of argv's --config.<key>=value overrides."""
  return [a[2:].split("=", 1)[0].removeprefix("config.") for a in argv
          if a.startswith("--config.")]


def _unknown_key(e: Exception, argv: list[str]) -> str:
  """config_flags' KeyError (the bare key, a repr with a newline and a 'Did you mean') ->
  'rl.decay_rat: unknown key (not in the schema); did you mean rl.decay_rate?'."""
  while isinstance(e, AttributeError) and e.args and isinstance(e.args[0], Exception):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  if (lookup := re.search(r"Attempting to lookup: (\S+)", text)) is not None:
    return f"{lookup.group(1)}: unknown key (a value, not a section, is indexed)"
  quoted = re.search(r"'([^']+)'", text)
  name = quoted.group(1) if quoted else text.strip("\"' ")
  field = name
  for key in _overrides(argv):  # the override that names it, up to the unknown part
    parts = key.split(".")
    if name in parts:
      field = ".".join(parts[: parts.index(name) + 1])
      break
  hint = re.search(r'Did you mean "([^"]+)"', text)
  prefix = field.rpartition(".")[0]
  close = f"; did you mean {prefix + '.' if prefix else ''}{hint.group(1)}?" if hint else ""
  return f"{field}: unknown key (not in the schema){close}"


def _list_field_hint(message: str) -> str | None:
  """config_flags cannot override list fields: say which, and what to write instead."""
  m = re.search(r"Type <class '(\w+)'> of field config\.(\S+) is not supported", message)
  if m is None:
    return None
  return (f"{m.group(2)}: the config file sets a {m.group(1)}, which a --config override cannot "
          f"replace; make it a tuple there, e.g. ('a.parquet',)")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and absl INFO logs drown the progress bar
  import jax  # after flag parsing: keeps --help fast

  from fipo_jax import config as config_lib

  try:  # the fields first: a bad value fails before a device (or an absent TPU's plugin) starts
    config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    _fail("config error", e, 2)
  # Multi-host: before anything touches a device.
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:  # a coordinator without num_processes / process_id
    _fail("config error", e, 2)

  try:
    run_config = config_lib.validate(  # the paths were checked above
      _CONFIG.value, num_devices=jax.device_count(), num_processes=jax.process_count(),
      check_paths=False)
  except config_lib.ConfigError as e:
    _fail("config error", e, 2)
  if _VALIDATE_ONLY.value:
    print(json.dumps(config_schema.as_dict(run_config), indent=2))
    return
  from fipo_jax import wandb_backend
  from fipo_jax.rl import trainer

  logging.info("config validated; starting in %s", _WORKDIR.value)
  try:
    trainer.run(_CONFIG.value, _WORKDIR.value, run_config=run_config)
  except (trainer.SetupError, wandb_backend.WandbError) as e:
    _fail("setup error", e, 2)
  except trainer.CannotLearn as e:
    _fail("cannot learn", e, 2)
  except trainer.TrainingDiverged as e:
    _fail("training diverged", e, 3)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
