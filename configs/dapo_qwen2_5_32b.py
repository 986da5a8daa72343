r"""DAPO baseline on Qwen2.5-32B base (docs/fipo_spec.md §5.1 last line, Table 2).

`recipe/dapo/run_dapo_qwen2.5_32b.sh` differs from the FIPO run only in gen_batch_size = 3 x 512,
ppo_mini_batch_size = 32 and the vanilla (DAPO) loss, with the same dual clip c = 10.

  python -m fipo_jax.main --config configs/dapo_qwen2_5_32b.py --workdir gs://BUCKET/dapo32b \
    --config.model.hf_dir=/models/Qwen2.5-32B \
    --config.data.train_files=data/dapo-math-17k.parquet \
    --config.data.val_files=data/aime-2024.parquet

  python -m fipo_jax.main --config configs/dapo_qwen2_5_32b.py:runlocal --workdir /tmp/dapo32b
"""

from fipo_jax import recipes


def get_config(arg=None):
  c = recipes.base()
  c.model.preset = "qwen2.5-32b"  # Qwen2.5-32B base
  c.data.max_prompt_length = 2048
  c.rl.loss_mode = "dapo"  # verl 'vanilla': clip-higher + dual clip, token-mean
  c.rl.n = 16  # G
  c.rl.train_batch_size = 512  # prompts per step
  c.rl.gen_batch_size = 3 * 512  # prompts per generation round
  c.rl.ppo_mini_batch_size = 32  # -> 16 updates per step
  c.rl.max_response_length = 20480
  c.rl.overlong_buffer_len = 4096
  c.rl.clip_ratio_low, c.rl.clip_ratio_high = 0.2, 0.28  # policy clip
  c.rl.clip_ratio_c = 10.0  # dual clip
  c.rl.use_dynamic_bsz = True
  c.rl.ppo_max_token_len_per_device = 22528  # 2048 + 20480
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  if arg == "runlocal":
    recipes.runlocal(c)
  elif arg:
    raise ValueError(f"unknown config arg {arg!r} (expected 'runlocal' or nothing)")
  return c
