"""python -m fipo_jax.export --checkpoint WORKDIR --out HF_DIR [--step K] [--dtype bfloat16]

Writes a trainer checkpoint as an HF directory (config.json with bos/eos/pad ids,
generation_config.json with the ids the trainer stops on, sharded safetensors + index, and the
run's tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load. config.json also records the run's prompt format,
lengths and reward function (key `fipo_jax_run`), which `eval --hf_dir` and `generate --hf_dir`
default to. The
export is checked: AutoTokenizer on the written directory must encode a probe prompt (spaces,
digits, chat template) to the trainer's ids.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

# Spaces, a newline, digits and punctuation: what a tokenizer that drops or merges them gets wrong.
PROBE = "Q: copy 4831=\nWhat is 3 + 4? Answer: 7."


def _fail(message: Any) -> None:
  """One line on stderr, exit code 2 (a bad input, not a crash)."""
  print(f"export: {' '.join(str(message).split())}", file=sys.stderr)
  ckpt = sys.modules.get("fipo_jax.checkpoints")  # imported only when a checkpoint was read
  if ckpt is not None:
    ckpt.exit_if_unreadable(message)
  sys.exit(2)


def tokenizer_mismatch(src_dir: str, out_dir: str) -> str | None:
  """Why the exported tokenizer encodes differently from the trainer's, or None when it agrees.

  The trainer loads `src_dir`; a user of the export loads `out_dir`, where transformers also
  reads config.json (and picks the tokenizer class from its model_type).
  """
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415 (slow import)

  ours, theirs = tokenizer_lib.load_tokenizer(src_dir), tokenizer_lib.load_tokenizer(out_dir)
  messages = [{"role": "user", "content": PROBE}]
  for chat in (False, True) if ours.chat_template else (False,):
    want = tokenizer_lib.encode_prompt(ours, messages, chat)
    got = tokenizer_lib.encode_prompt(theirs, messages, chat)
    if got != want:
      return (f"AutoTokenizer on the export ({type(theirs).__name__}) encodes {PROBE!r} "
              f"{'with' if chat else 'without'} the chat template to {len(got)} ids, the "
              f"trainer's tokenizer ({type(ours).__name__}) to {len(want)}")
  if tokenizer_lib.eos_token_ids(theirs) != tokenizer_lib.eos_token_ids(ours):
    return (f"stop ids differ: export {tokenizer_lib.eos_token_ids(theirs)}, trainer "
            f"{tokenizer_lib.eos_token_ids(ours)}")
  return None


def _rebuild_hint(tok_dir: str) -> str:
  """How to fix a character tokenizer written before it was byte-level ('' for others)."""
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  if not tokenizer_lib.is_character_tokenizer(tok_dir):
    return ""
  return (" (a character tokenizer from before fipo_jax wrote byte-level ones: rebuild it, same "
          "ids, with python -c \"from fipo_jax.data import tokenizer; "
          f"tokenizer.build_tokenizer('{tok_dir}')\")")


def run_defaults(policy: Any) -> dict[str, Any]:
  """The run's prompt format, lengths and reward function (rl.reward_fn), so eval/generate of
  the export default to them."""
  rc = policy.run_config
  if rc is None:
    return {}
  return {"apply_chat_template": rc.data.apply_chat_template,
          "max_prompt_length": rc.data.max_prompt_length,
          "max_response_length": rc.rl.max_response_length, "reward_fn": rc.rl.reward_fn}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="Trainer workdir.")
  p.add_argument("--out", required=True, help="Output HF directory.")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  p.add_argument("--dtype", default=None, help="Tensor dtype on disk (default: param dtype).")
  args = p.parse_args(argv)
  from flax import nnx  # noqa: PLC0415 (keeps --help fast)

  from fipo_jax import models, paths  # noqa: PLC0415
  from fipo_jax import policy as policy_lib  # noqa: PLC0415
  from fipo_jax.models import config as model_config  # noqa: PLC0415

  try:
    dtype = args.dtype and model_config.dtype_name(args.dtype, "--dtype")
    policy = policy_lib.load_policy(checkpoint_dir=args.checkpoint, step=args.step)
  except (FileNotFoundError, ValueError) as e:
    _fail(e)
  tok = policy.tokenizer_dir if os.path.isdir(policy.tokenizer_dir) else None
  # A gs:// destination is written locally (and checked there), then copied up.
  out = tempfile.mkdtemp(prefix="fipo_jax_export_") if paths.is_remote(args.out) else args.out
  try:
    models.save_pretrained(nnx.merge(policy.graphdef, policy.params), out,
                           tokenizer_dir=tok, dtype=dtype, run_defaults=run_defaults(policy))
    mismatch = tok and tokenizer_mismatch(tok, out)
    if out != args.out:
      paths.upload(out, args.out)
  except (OSError, ValueError) as e:  # an unloadable tokenizer, one larger than the vocabulary
    _fail(e)
  finally:
    if out != args.out:
      shutil.rmtree(out, ignore_errors=True)
  if mismatch:
    _fail(f"{args.out} was written but its tokenizer is wrong: {mismatch}{_rebuild_hint(tok)}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
