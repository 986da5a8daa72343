"""Sample from an HF directory (or a checkpoint) on a jsonl file of prompts.

  python -m fipo_jax.generate --hf_dir DIR --prompts_file IN.jsonl --output OUT.jsonl \
      [--n 4] [--max_new_tokens 256] [--temperature 1.0] [--top_p 1.0] [--top_k 0] [--seed 0] \
      [--chat]

Each input line has `prompt` (text; tokenized with the directory's tokenizer, through its chat
template with --chat) or `prompt_ids` (a list of token ids). Each output line is one sample:
`prompt_index`, `sample_index`, `response_ids`, `response_logprobs` (float32 log-probs at the
sampling temperature, before top-p/top-k), `finish_reason` ('stop' | 'length'), `length`, and
`response` (decoded text) when a tokenizer exists. --temperature 0 means greedy.
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
  p.add_argument("--tokenizer_dir", help="Tokenizer directory (default: the model directory).")
  p.add_argument("--prompts_file", required=True, help="Input jsonl: 'prompt' or 'prompt_ids'.")
  p.add_argument("--output", required=True, help="Output jsonl, one line per sample.")
  p.add_argument("--n", type=int, default=4, help="Samples per prompt.")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy.")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0, help="0 = off.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chat", action="store_true", help="Apply the tokenizer's chat template.")
  p.add_argument("--stop_ids", default="", help="Extra comma-separated stop token ids.")
  p.add_argument("--num_slots", type=int, default=32, help="Concurrent decode slots.")
  p.add_argument("--steps_per_call", type=int, default=16, help="Decode steps per jitted call.")
  p.add_argument("--dtype", default="float32", help="Compute dtype (bfloat16 on accelerators).")
  p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
  return p.parse_args(argv)


def load_model(args: argparse.Namespace):
  """The Transformer from --hf_dir, or the latest checkpoint of a trainer workdir."""
  from fipo_jax import models  # noqa: PLC0415 (keeps --help fast)

  if args.checkpoint is not None:
    if not os.path.isdir(args.checkpoint):
      raise SystemExit(f"error: checkpoint directory not found: {args.checkpoint}")
    from flax import nnx  # noqa: PLC0415

    from fipo_jax.rl import setup as setup_lib  # noqa: PLC0415

    try:
      policy = setup_lib.load_policy(checkpoint_dir=args.checkpoint)
    except FileNotFoundError as e:
      raise SystemExit(f"error: --checkpoint {args.checkpoint}: {e}") from e
    if args.tokenizer_dir is None and os.path.isdir(policy.tokenizer_dir):
      args.tokenizer_dir = policy.tokenizer_dir
    return nnx.merge(policy.graphdef, policy.params)
  if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
    raise SystemExit(f"error: {args.hf_dir} has no config.json (not an HF model directory)")
  return models.from_pretrained(args.hf_dir, dtype=args.dtype)


def load_tokenizer(path: str | None) -> Any | None:
  """The directory's tokenizer, or None when it has none."""
  if path is None or not any(
    os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
  ):
    return None
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  return tokenizer_lib.load_tokenizer(path)


def read_prompts(path: str, tokenizer: Any | None, chat: bool) -> list[list[int]]:
  """jsonl lines with 'prompt_ids' or 'prompt' -> token id lists."""
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  out = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      if "prompt_ids" in row:
        ids = [int(i) for i in row["prompt_ids"]]
      elif "prompt" in row:
        if tokenizer is None:
          raise SystemExit(f"error: {path}:{lineno} has 'prompt' text but there is no tokenizer")
        ids = tokenizer_lib.encode_prompt(
          tokenizer, [{"role": "user", "content": row["prompt"]}], chat
        )
      else:
        raise SystemExit(f"error: {path}:{lineno} has neither 'prompt' nor 'prompt_ids'")
      if not ids:
        raise SystemExit(f"error: {path}:{lineno} is an empty prompt")
      out.append(ids)
  if not out:
    raise SystemExit(f"error: no prompts in {path}")
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
  from fipo_jax import sampling  # noqa: PLC0415

  sampling_method = sampling.from_flags(args.temperature, args.top_p, args.top_k)
  model_dir = args.hf_dir or args.checkpoint
  model = load_model(args)  # first: a checkpoint names its tokenizer directory
  tokenizer = load_tokenizer(args.tokenizer_dir or args.hf_dir)
  prompts = read_prompts(args.prompts_file, tokenizer, args.chat)
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
  out_path = pathlib.Path(args.output)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with open(out_path, "w") as f:
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
