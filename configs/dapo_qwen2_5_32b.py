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
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  c = recipes.base()  # the FIPO 32B run, but:
  c.rl.loss_mode = "dapo"  # verl 'vanilla': clip-higher + dual clip, token-mean
  c.rl.gen_batch_size = 3 * 512  # prompts per generation round
  c.rl.ppo_mini_batch_size = 32  # -> 16 updates per step
  return recipes.finish(c, args)
