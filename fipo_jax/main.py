"""Entry point: python -m fipo_jax.main --config configs/<name>.py --workdir DIR."""

import sys


def main() -> int:
  print("fipo_jax.main: the trainer is not built yet (see issue 'The FIPO trainer end to end').")
  return 1


if __name__ == "__main__":
  sys.exit(main())
