"""The package's command lines share one rule for bad input: one line on stderr, exit 2.

`Parser("compare", description=...)` is argparse under that rule: a wrong flag prints
`compare: <message> (see --help)` instead of argparse's usage block, and `fail` says an error
found after parsing (a missing file, a bad value) the same way.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
  """argparse for `python -m fipo_jax.NAME`, failing in one line with exit status 2."""

  def __init__(self, name: str, **kwargs):
    super().__init__(prog=f"python -m fipo_jax.{name}", **kwargs)
    self.name = name

  def error(self, message: str) -> NoReturn:
    self.fail(f"{message} (see --help)")

  def fail(self, message: object) -> NoReturn:
    sys.stderr.write(f"{self.name}: {message}\n")
    sys.exit(2)
