"""python -m fipo_jax.eval --checkpoint WORKDIR [--step K]|--hf_dir DIR --data FILE [--n 32] [...]

avg@k, pass@k (unbiased estimator), cons@k (majority vote on the extracted answer) and
response-length statistics on a verl-schema parquet/jsonl set, printed as a table and written as
JSON. Official eval sampling: temperature 1.0, top-p 0.7 (docs/fipo_spec.md §4). Prompt format
and lengths default to the run's (a workdir, or an export of one). Bad inputs (a missing
directory or file, data with no usable row, a checkpoint that cannot be read: pick another with
--step) exit 2 with one line on stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_CKPT = flags.DEFINE_string("checkpoint", None, "A trainer workdir (its latest checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "With --checkpoint: its step (default: the latest).")
_HF = flags.DEFINE_string("hf_dir", None, "An HF model directory (config, safetensors, tokenizer).")
_DATA = flags.DEFINE_list("data", None, "Eval parquet/jsonl file(s) in the verl schema.")
_N = flags.DEFINE_integer("n", 32, "Samples per prompt (k of avg@k, pass@k, cons@k).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 0.7, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", -1, "Top-k (-1 = off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: the run's max_response_length.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", None,
                                   "Prompt tokens (left-truncated); default: the run's, or 2048.")
_CHAT = flags.DEFINE_boolean("chat", None, "Apply the chat template; default: the run's, or True.")
_SLOTS = flags.DEFINE_integer("num_slots", 64, "Concurrent decode slots.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("output", None, "JSON results path (default: stdout table only).")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", -1, "Evaluate only the first k prompts.")
_WORKERS = flags.DEFINE_integer("reward_workers", 0, "Verifier processes scoring at once "
                                "(0: in this process; docs/reward_pool.md).")


def _fail(message) -> None:
  """One line on stderr, exit code 2 (a bad input, not a crash)."""
  print(f"eval: {' '.join(str(message).split())}", file=sys.stderr)
  ckpt = sys.modules.get("fipo_jax.checkpoints")  # imported only when a checkpoint was read
  if ckpt is not None:
    ckpt.exit_if_unreadable(message)
  sys.exit(2)


def _load(data_files):
  """(policy, tokenizer, examples, skipped, max_prompt, the run's defaults: {} or its
  max_response_length, reward_fn, ...) of the flags; bad inputs exit 2."""
  from fipo_jax import export, paths  # noqa: PLC0415 (keeps --help fast)
  from fipo_jax import policy as policy_lib  # noqa: PLC0415
  from fipo_jax.data import pipeline  # noqa: PLC0415
  from fipo_jax.data import tokenizer as tok_lib  # noqa: PLC0415
  from fipo_jax.models import hf_io  # noqa: PLC0415

  if bool(_CKPT.value) == bool(_HF.value):
    _fail("give exactly one of --checkpoint or --hf_dir")
  if not data_files:
    _fail("--data is required")
  if _STEP.value is not None and not _CKPT.value:
    _fail("--step needs --checkpoint")
  for path in data_files:
    if not paths.isfile(path):  # local or gs://
      _fail(f"data file not found: {path}")
  try:
    policy = policy_lib.load_policy(checkpoint_dir=_CKPT.value, hf_dir=_HF.value,
                                    step=_STEP.value)
    tokenizer = tok_lib.load_tokenizer(policy.tokenizer_dir)
    # The run's prompt format and lengths: from its workdir, or as an export recorded them.
    run = export.run_defaults(policy) if policy.run_config else hf_io.run_defaults(_HF.value)
    max_prompt = _MAX_PROMPT.value or run.get("max_prompt_length") or 2048
    chat = _CHAT.value if _CHAT.value is not None else run.get("apply_chat_template", True)
    dataset = pipeline.PromptDataset(data_files, tokenizer, max_prompt_length=max_prompt,
                                     apply_chat_template=chat)
    examples, skipped = dataset.examples(_MAX_PROMPTS.value)
  except (OSError, ValueError) as e:  # missing dirs, bad configs, DataError (no rows, columns),
    # a checkpoint that cannot be read (CheckpointUnreadable)
    _fail(e)
  if not examples:
    _fail(f"no usable rows in {', '.join(data_files)} ({skipped} skipped; see the warnings)")
  return policy, tokenizer, examples, skipped, max_prompt, run


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines drown the table
  from fipo_jax.data import tokenizer as tok_lib
  from fipo_jax.eval import cli
  from fipo_jax.rl import evaluation, rewards
  from fipo_jax.sampling import engine as engine_lib
  from fipo_jax.sampling import params as sampling_params

  try:
    method = sampling_params.from_flags(_TEMP.value, _TOP_P.value, _TOP_K.value)
  except ValueError as e:  # e.g. --top_k 0 (off is -1)
    _fail(e)
  if _WORKERS.value < 0:
    _fail(f"--reward_workers must be >= 0 (verifier processes), got {_WORKERS.value}")
  policy, tokenizer, examples, skipped, max_prompt, run = _load(_DATA.value)
  max_new = _MAX_NEW.value or run.get("max_response_length") or 1024
  engine = engine_lib.Engine(
    policy.model_cfg, policy.graphdef,
    engine_lib.EngineConfig(num_slots=_SLOTS.value, max_prompt_len=max_prompt,
                            max_new_tokens=max_new),
  )
  metrics, records = evaluation.evaluate_examples(
    engine, policy.params, examples, tokenizer=tokenizer,
    eos_ids=tok_lib.eos_token_ids(tokenizer),
    reward_cfg=rewards.RewardConfig(max_response_length=max_new, overlong_buffer_enable=False,
                                        reward_fn=run.get("reward_fn", "math_dapo"),  # the run's
                                        reward_workers=_WORKERS.value),
    n=_N.value, sampling=method,
    seed=_SEED.value, max_new_tokens=max_new, progress=True,
  )
  metrics["eval/skipped_rows"] = skipped
  print(cli.format_table(metrics))
  if _OUT.value:
    cli.write_json(_OUT.value, {"metrics": metrics, "samples": records})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
