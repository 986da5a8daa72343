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
  """The recipe base is this run (recipe/fipo/run_fipo_qwen2.5_32b.sh): nothing to change."""
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  return recipes.finish(recipes.base(), args)
