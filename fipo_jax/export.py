"""python -m fipo_jax.export --checkpoint WORKDIR --out HF_DIR [--step K] [--dtype bfloat16]

Writes a trainer checkpoint as an HF directory (config.json, sharded safetensors + index, and the
run's tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="Trainer workdir.")
  p.add_argument("--out", required=True, help="Output HF directory.")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  p.add_argument("--dtype", default=None, help="Tensor dtype on disk (default: param dtype).")
  args = p.parse_args(argv)
  from flax import nnx  # noqa: PLC0415 (keeps --help fast)

  from fipo_jax import models  # noqa: PLC0415
  from fipo_jax.rl import setup as setup_lib  # noqa: PLC0415

  try:
    policy = setup_lib.load_policy(checkpoint_dir=args.checkpoint, step=args.step)
  except FileNotFoundError as e:
    sys.exit(f"export: {e}")
  tok = policy.tokenizer_dir if os.path.isdir(policy.tokenizer_dir) else None
  models.save_pretrained(nnx.merge(policy.graphdef, policy.params), args.out, tokenizer_dir=tok,
                         dtype=args.dtype)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
