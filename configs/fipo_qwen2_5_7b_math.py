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
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  c = recipes.base()  # the FIPO 32B run, but:
  c.model.preset = "qwen2.5-math-7b"
  c.model.overrides.max_position_embeddings = 32768  # extended context (paper §5, 7B)
  c.rl.n = 32  # G
  c.rl.max_response_length = 10240
  c.rl.overlong_buffer_len = 2048  # penalty from 8192 to 10240 tokens
  c.rl.future_kl_clip_high_only = False  # weights in [0.8, 1.2]: symmetric
  c.rl.safety_thresh = 3.0  # S ("stricter advantage clipping threshold of 3.0")
  c.rl.ppo_max_token_len_per_device = 2048 + 10240  # [INFERRED] one full sequence
  return recipes.finish(c, args)
