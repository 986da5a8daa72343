r"""DAPO baseline on Qwen2.5-Math-7B (docs/fipo_spec.md §5.3, Table 3).

G = 16, max response 8192 with a 4096 buffer, mini-batch 32 prompts. gen_batch_size 3 x 512 as
in the DAPO 32B launcher [INFERRED]; context extended to 32768 as in the FIPO 7B recipe.

  python -m fipo_jax.main --config configs/dapo_qwen2_5_7b_math.py --workdir gs://BUCKET/dapo7b \
    --config.model.hf_dir=/models/Qwen2.5-Math-7B \
    --config.data.train_files=data/dapo-math-17k.parquet \
    --config.data.val_files=data/aime-2024.parquet

  python -m fipo_jax.main --config configs/dapo_qwen2_5_7b_math.py:runlocal --workdir /tmp/dapo7b
"""

from fipo_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  c = recipes.base()  # the FIPO 32B run, but:
  c.model.preset = "qwen2.5-math-7b"
  c.model.overrides.max_position_embeddings = 32768  # extended context
  c.rl.loss_mode = "dapo"
  c.rl.gen_batch_size = 3 * 512  # [INFERRED] as in the DAPO 32B launcher
  c.rl.ppo_mini_batch_size = 32  # -> 16 updates per step
  c.rl.max_response_length = 8192  # overlong penalty from 4096 to 8192 tokens
  c.rl.ppo_max_token_len_per_device = 2048 + 8192  # [INFERRED] one full sequence
  return recipes.finish(c, args)
