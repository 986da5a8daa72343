"""fipo_jax.aot's FLOPs per RL step: the packed layout's count follows the real tokens.

Traced on the CPU (no libtpu, nothing compiled): the recipe's packed train and old-log-prob
steps at the layout a mini-batch of sequences with the given mean lengths fills, beside the
padded ones.
"""

import jax
import pytest

from configs import fipo_qwen2_5_32b
from fipo_jax import aot, policy, sharding
from fipo_jax import config as config_lib


def _run():
  c = fipo_qwen2_5_32b.get_config("runlocal")  # P 256, T 32, budget 288 tokens
  c.rl.n, c.rl.ppo_mini_batch_size, c.rl.train_batch_size, c.rl.gen_batch_size = 4, 4, 8, 8
  return config_lib.validate(c, check_paths=False)


@pytest.mark.slow
def test_packed_flops_per_rl_step_follow_the_real_tokens():
  run = _run()
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  mcfg = policy.model_config(run)
  m = run.rl.ppo_mini_batch_size * run.rl.n  # 16 sequences of 16 + 8 tokens: 2 rows of 288
  out = aot.rl_step_flops(run, mcfg, mesh, mean_prompt=16, mean_response=8)
  assert out["shape"] == {"num_micro": 2, "num_shards": 1, "rows": 1, "slots": 16, "row_len": 288}
  tokens_padded, tokens_packed = m * 288, 2 * 288
  assert out["padded"] > out["packed"] > 0
  # Matmuls dominate this model, so FLOPs follow the tokens the model runs on (the packed
  # step's logits cover every position, the padded one's only the responses).
  ratio = out["padded"] / out["packed"]
  assert 0.5 * tokens_padded / tokens_packed < ratio <= tokens_padded / tokens_packed
  # Longer responses fill more micro-batches: more FLOPs, the padded count unchanged.
  longer = aot.rl_step_flops(run, mcfg, mesh, mean_prompt=16, mean_response=32)
  assert longer["shape"]["num_micro"] == 3 and longer["packed"] > out["packed"]
  assert longer["padded"] == out["padded"]
