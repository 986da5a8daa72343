"""Sample from an HF directory (or a checkpoint) on a jsonl file of prompts.

  python -m fipo_jax.generate --hf_dir DIR --prompts_file IN.jsonl --output OUT.jsonl \
      [--n 4] [--max_new_tokens 256] [--temperature 1.0] [--top_p 1.0] [--top_k -1] [--seed 0] \
      [--no_chat]
  python -m fipo_jax.generate --checkpoint WORKDIR [--step K] --prompts_file IN.jsonl ...

Each input row (a jsonl line, or a parquet row) has `prompt_ids` (a list of token ids) or
`prompt`: either text (one user message) or, as in verl-schema data files (what eval and the
trainer read), a list of chat messages {"role", "content"}; other fields are ignored. Prompts go
through the tokenizer's chat template, as in the trainer and eval: by default as the run did
for --checkpoint (and for --hf_dir of its export), otherwise always; --chat / --no_chat force
it on / off. Each output line is one sample: `prompt_index`, `sample_index`, `response_ids`,
`response_logprobs` (float32 log-probs at the sampling temperature, before top-p/top-k),
`finish_reason` ('stop' | 'length'), `length`, and `response` (decoded text) when a tokenizer
exists. --temperature 0 means greedy. Bad inputs
(a missing directory or file, an empty or malformed prompts file, a checkpoint that cannot be
read: pick another with --step) exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m fipo_jax.generate", description=__doc__.split("\n")[0]
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf_dir", help="HF directory: config.json + safetensors (+ tokenizer).")
  src.add_argument("--checkpoint", help="fipo_jax trainer workdir (its latest checkpoint).")
  p.add_argument("--step", type=int, default=None,
                 help="With --checkpoint: the checkpoint step (default: the latest).")
  p.add_argument("--tokenizer_dir", help="Tokenizer directory (default: the model directory).")
  p.add_argument(
    "--prompts_file",
    required=True,
    help="Input jsonl/parquet rows: 'prompt' (text or chat messages) or 'prompt_ids'.",
  )
  p.add_argument("--output", required=True, help="Output jsonl, one line per sample.")
  p.add_argument("--n", type=int, default=4, help="Samples per prompt.")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy.")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=-1, help="-1 = off.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--chat",
    dest="chat",
    action="store_true",
    default=None,
    help="Apply the tokenizer's chat template (default: yes; a run: as it did).",
  )
  p.add_argument("--no_chat", dest="chat", action="store_false", help="Plain prompt text.")
  p.add_argument("--stop_ids", default="", help="Extra comma-separated stop token ids.")
  p.add_argument("--num_slots", type=int, default=32, help="Concurrent decode slots.")
  p.add_argument("--steps_per_call", type=int, default=16, help="Decode steps per jitted call.")
  p.add_argument("--dtype", default="float32", help="Compute dtype (bfloat16 on accelerators).")
  p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
  return p.parse_args(argv)


def _fail(message: Any) -> None:
  """One line on stderr, exit code 2 (a bad input, not a crash)."""
  print(f"generate: {' '.join(str(message).split())}", file=sys.stderr)
  ckpt = sys.modules.get("fipo_jax.checkpoints")  # imported only when a checkpoint was read
  if ckpt is not None:
    ckpt.exit_if_unreadable(message)
  sys.exit(2)


def load_model(args: argparse.Namespace) -> tuple[Any, bool | None]:
  """(Transformer, the run's apply_chat_template or None) of --hf_dir (an export records it)
  or of a trainer workdir's latest (or --step) checkpoint, which also sets args.tokenizer_dir.
  A checkpoint that cannot be read raises checkpoints.CheckpointUnreadable (a ValueError)."""
  from fipo_jax import models, paths  # noqa: PLC0415 (keeps --help fast)
  from fipo_jax.models import hf_io  # noqa: PLC0415

  if args.checkpoint is None:
    if args.step is not None:
      raise ValueError("--step needs --checkpoint")
    chat = hf_io.run_defaults(args.hf_dir).get("apply_chat_template")  # an export's
    return models.from_pretrained(args.hf_dir, dtype=args.dtype), chat
  if not paths.isdir(args.checkpoint):  # local or gs://
    raise FileNotFoundError(f"checkpoint directory not found: {args.checkpoint}")
  from flax import nnx  # noqa: PLC0415

  from fipo_jax import policy as policy_lib  # noqa: PLC0415

  policy = policy_lib.load_policy(checkpoint_dir=args.checkpoint, step=args.step)
  if args.tokenizer_dir is None and os.path.isdir(policy.tokenizer_dir):
    args.tokenizer_dir = policy.tokenizer_dir
  chat = policy.run_config.data.apply_chat_template if policy.run_config else None
  return nnx.merge(policy.graphdef, policy.params), chat


def load_tokenizer(path: str | None) -> Any | None:
  """The directory's tokenizer (local or gs://), or None when it has none."""
  from fipo_jax import paths  # noqa: PLC0415

  if path is None or not any(
    paths.isfile(paths.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
  ):
    return None
  path = paths.local_copy(path)  # transformers reads local files only
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  return tokenizer_lib.load_tokenizer(path)


def prompt_messages(prompt: Any) -> list[dict[str, str]] | None:
  """`prompt` text -> one user message; a verl message list -> itself; None if neither."""
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  if (
    isinstance(prompt, list)
    and prompt
    and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in prompt
    )
  ):
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
  return None


def row_ids(row: Any, tokenizer: Any | None, chat: bool) -> list[int] | str:
  """One input row -> its prompt token ids, or why it has none."""
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  if not isinstance(row, dict):
    return getattr(row, "reason", f"a {type(row).__name__}, not an object")
  if "prompt_ids" in row:
    ids = row["prompt_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
      return "'prompt_ids' is not a list of integers"
  elif "prompt" in row:
    messages = prompt_messages(row["prompt"])
    if messages is None:
      return "'prompt' is neither text nor a list of {'role', 'content'} messages"
    if tokenizer is None:
      return "has 'prompt' text but there is no tokenizer (give --tokenizer_dir or prompt_ids)"
    ids = tokenizer_lib.encode_prompt(tokenizer, messages, chat)
  else:
    return "has neither 'prompt' nor 'prompt_ids'"
  return list(ids) if ids else "is an empty prompt"


def read_prompts(path: str, tokenizer: Any | None, chat: bool) -> list[list[int]]:
  """Rows of a jsonl/parquet file (see the module docstring) -> token id lists.

  Raises ValueError naming the first bad row (outputs are indexed by row: none is skipped).
  """
  from fipo_jax.data import verl  # noqa: PLC0415

  rows = verl.RowSource([path])  # DataError (a ValueError) when empty
  out = []
  for i in range(len(rows)):
    ids = row_ids(rows[i], tokenizer, chat)
    if isinstance(ids, str):
      raise ValueError(f"{path} row {i + 1}: {ids}")
    out.append(ids)
  return out


def stop_token_ids(model_dir: str | None, tokenizer: Any | None, extra: str) -> list[int]:
  """EOS ids from the tokenizer and generation_config.json / config.json, plus --stop_ids."""
  ids = {int(i) for i in extra.split(",") if i.strip()}
  if tokenizer is not None:
    from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

    ids.update(tokenizer_lib.eos_token_ids(tokenizer))
  for name in ("generation_config.json", "config.json"):
    path = pathlib.Path(model_dir or "") / name
    if model_dir and path.is_file():
      eos = json.loads(path.read_text()).get("eos_token_id")
      ids.update([eos] if isinstance(eos, int) else (eos or []))
  return sorted(ids)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  from fipo_jax import paths, sampling  # noqa: PLC0415

  model_dir = args.hf_dir or args.checkpoint
  try:
    sampling_method = sampling.from_flags(args.temperature, args.top_p, args.top_k)
    model, run_chat = load_model(args)  # first: a checkpoint names its tokenizer directory
    tokenizer = load_tokenizer(args.tokenizer_dir or args.hf_dir)
    chat = next(c for c in (args.chat, run_chat, True) if c is not None)
    prompts = read_prompts(args.prompts_file, tokenizer, chat)
  except (OSError, ValueError) as e:  # missing dirs/files, bad configs, bad rows
    _fail(e)
  stops = stop_token_ids(model_dir if args.hf_dir else None, tokenizer, args.stop_ids)
  engine_cfg = sampling.EngineConfig(
    num_slots=min(args.num_slots, len(prompts) * args.n),
    max_prompt_len=max(map(len, prompts)),
    max_new_tokens=args.max_new_tokens,
    steps_per_call=args.steps_per_call,
  )
  engine, params = sampling.Engine.from_model(model, engine_cfg)
  result = sampling.run(
    engine, params, prompts, n=args.n, max_new_tokens=args.max_new_tokens,
    sampling=sampling_method, eos_ids=stops, seed=args.seed, progress=not args.no_progress,
  )  # fmt: skip
  out_path = args.output  # local or gs://
  with paths.open_file(out_path, "w") as f:
    for s in result.samples:
      row = {
        "prompt_index": s.prompt_index,
        "sample_index": s.sample_index,
        "response_ids": s.response_ids.tolist(),
        "response_logprobs": s.response_logprobs.tolist(),
        "finish_reason": s.finish_reason,
        "length": s.length,
      }
      if tokenizer is not None:
        row["response"] = tokenizer.decode(s.response_ids.tolist(), skip_special_tokens=True)
      f.write(json.dumps(row) + "\n")
  st = result.stats
  print(
    f"wrote {len(result.samples)} samples to {out_path}: {st.tokens_generated} tokens in "
    f"{st.wall_time_s:.1f}s ({st.tokens_per_s:.1f} tok/s, slot utilisation "
    f"{st.slot_utilisation:.0%})",
    file=sys.stderr,
  )


if __name__ == "__main__":
  main()
