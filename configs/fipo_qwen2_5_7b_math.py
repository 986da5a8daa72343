r"""FIPO on Qwen2.5-Math-7B (docs/fipo_spec.md §5.3, Table 3).

Differences from 32B: G = 32, max response 10240 with a 2048 buffer, symmetric influence-weight
clip [0.8, 1.2] ("works better for smaller models") and safety threshold 3.0. Qwen2.5-Math-7B
ships a 4096-token context; the paper extends it to 32768 "following the DAPO verl scripts"
(edit max_position_embeddings in the HF config.json; the RoPE base is taken from that file).
gen_batch_size and the micro-batch token budget are not given for 7B; the 32B launcher's rules
(4 x train_batch_size; max_prompt + max_response) are used [INFERRED].

  python -m fipo_jax.main --config configs/fipo_qwen2_5_7b_math.py --workdir gs://BUCKET/fipo7b \
    --config.model.hf_dir=/models/Qwen2.5-Math-7B \
    --config.data.train_files=data/dapo-math-17k.parquet \
    --config.data.val_files=data/aime-2024.parquet

Several files: a comma-separated list (a,b) or a list literal ('["a", "b"]'). `:runlocal` shrinks
the recipe to a laptop-sized check that its loop runs, on a tiny random model and a synthetic
task, or on a given model directory (its architecture kept) and data files:

  python -m fipo_jax.main --config configs/fipo_qwen2_5_7b_math.py:runlocal --workdir /tmp/fipo7b
  python -m fipo_jax.main --config configs/fipo_qwen2_5_7b_math.py:runlocal --workdir /tmp/r7b \
    --config.model.hf_dir=/models/Qwen2.5-0.5B \
    --config.data.train_files=data/dapo-math-17k.parquet \
    --config.data.val_files=data/aime-2024.parquet
"""

from fipo_jax import recipes


def get_config(arg=None):
  c = recipes.base()
  c.model.preset = "qwen2.5-math-7b"
  c.model.overrides.max_position_embeddings = 32768  # extended context (paper §5, 7B)
  c.data.max_prompt_length = 2048
  c.rl.loss_mode = "fipo"
  c.rl.n = 32  # G
  c.rl.train_batch_size = 512  # prompts per step
  c.rl.gen_batch_size = 4 * 512  # [INFERRED] as in the 32B launcher
  c.rl.ppo_mini_batch_size = 64  # -> 8 updates per step
  c.rl.max_response_length = 10240
  c.rl.overlong_buffer_len = 2048  # penalty from 8192 to 10240 tokens
  c.rl.clip_ratio_low, c.rl.clip_ratio_high = 0.2, 0.28  # policy clip
  c.rl.clip_ratio_c = 10.0  # dual clip
  c.rl.decay_rate = 32.0  # tau
  c.rl.future_kl_clip_ratio = 0.2  # weights in [0.8, 1.2] ...
  c.rl.future_kl_clip_high_only = False  # ... symmetric
  c.rl.safety_thresh = 3.0  # S ("stricter advantage clipping threshold of 3.0")
  c.rl.use_dynamic_bsz = True
  c.rl.ppo_max_token_len_per_device = 2048 + 10240  # [INFERRED] one full sequence
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  if arg == "runlocal":
    recipes.runlocal(c)
  elif arg:
    raise ValueError(f"unknown config arg {arg!r} (expected 'runlocal' or nothing)")
  return c
