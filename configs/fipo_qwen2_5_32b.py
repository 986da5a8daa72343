r"""FIPO on Qwen2.5-32B base: the official run (docs/fipo_spec.md §4, §5.1, Table 2).

Launch (TPU VM pod or GPU cluster; data as verl parquet files, weights as an HF directory):

  python -m fipo_jax.main --config configs/fipo_qwen2_5_32b.py --workdir gs://BUCKET/fipo32b \
    --config.model.hf_dir=/models/Qwen2.5-32B \
    --config.data.train_files=data/dapo-math-17k.parquet \
    --config.data.val_files=data/aime-2024.parquet

Laptop check that the recipe's loop runs (tiny model, synthetic task; see recipes.runlocal):

  python -m fipo_jax.main --config configs/fipo_qwen2_5_32b.py:runlocal --workdir /tmp/fipo32b

Eval: the paper reports avg@32 / cons@32 / pass@32 on AIME-2024 (temperature 1.0, top-p 0.7).
verl used n=1 on a parquet that (likely) repeats each problem 32 times; here eval.n=32 on the 30
problems gives the same estimators. Use --config.eval.n=1 with the repeated file.
"""

from fipo_jax import recipes


def get_config(arg=None):
  c = recipes.base()
  c.model.preset = "qwen2.5-32b"  # Qwen2.5-32B base (no long-CoT SFT)
  c.data.max_prompt_length = 2048  # Table 2
  c.rl.loss_mode = "fipo"  # policy_loss.loss_mode=future_kl
  c.rl.n = 16  # G
  c.rl.train_batch_size = 512  # prompts per step
  c.rl.gen_batch_size = 4 * 512  # prompts per generation round
  c.rl.ppo_mini_batch_size = 64  # -> 8 updates per step (FIPO active on mini-batches 2-8)
  c.rl.max_response_length = 20480
  c.rl.overlong_buffer_len = 4096  # penalty from 16384 to 20480 tokens
  c.rl.clip_ratio_low, c.rl.clip_ratio_high = 0.2, 0.28  # policy clip
  c.rl.clip_ratio_c = 10.0  # dual clip
  c.rl.decay_rate = 32.0  # tau
  c.rl.future_kl_clip_ratio = 0.2  # weights in [1.0, 1.2] ...
  c.rl.future_kl_clip_high_only = True  # ... high only
  c.rl.safety_thresh = 10.0  # S
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
