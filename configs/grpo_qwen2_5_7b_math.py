r"""GRPO baseline on Qwen2.5-Math-7B (the "GRPO" row of docs/fipo_spec.md §7, Table 4).

The paper gives no hyperparameter table for GRPO. This recipe is verl's standard GRPO setup
[INFERRED]: verl's 'vanilla' policy loss (loss_mode 'grpo' is that loss) with a symmetric PPO
clip 0.2 and dual clip c, a low-variance KL-to-reference loss with coefficient 0.001, no dynamic
sampling, no overlong shaping, otherwise the DAPO 7B values (G 16, 512 prompts, mini-batch 32,
lr 1e-6, max response 8192). The reference policy is a frozen copy of the initial params
(model.hf_dir, or the seed), rebuilt on resume rather than checkpointed.

  python -m fipo_jax.main --config configs/grpo_qwen2_5_7b_math.py --workdir gs://BUCKET/grpo7b \
    --config.model.hf_dir=/models/Qwen2.5-Math-7B \
    --config.data.train_files="['data/dapo-math-17k.parquet']" \
    --config.data.val_files="['data/aime-2024.parquet']"

  python -m fipo_jax.main --config configs/grpo_qwen2_5_7b_math.py:runlocal --workdir /tmp/grpo7b
"""

from fipo_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  c = recipes.base()  # the FIPO 32B run, but:
  c.model.preset = "qwen2.5-math-7b"
  c.model.overrides.max_position_embeddings = 32768  # extended context
  c.rl.loss_mode = "grpo"
  c.rl.gen_batch_size = 512  # one generation round, no filtering
  c.rl.ppo_mini_batch_size = 32  # -> 16 updates per step
  c.rl.max_response_length = 8192
  c.rl.clip_ratio_high = 0.2  # symmetric PPO clip (dual clip c = 10 as verl's vanilla loss)
  c.rl.filter_groups_enable = False  # no dynamic sampling
  c.rl.overlong_buffer_enable = False  # no overlong shaping (truncated answers score -1)
  c.rl.use_kl_loss = True  # KL to the reference policy (low_var_kl, k3) ...
  c.rl.kl_loss_coef = 0.001  # ... verl GRPO example value
  c.rl.ppo_max_token_len_per_device = 2048 + 8192  # one full sequence
  return recipes.finish(c, args)
