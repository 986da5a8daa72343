r"""The embedded default: FIPO on a tiny Qwen2-architecture model and a synthetic copy task.

Runs on 2 CPU cores with no download. Prompts "Q: copy 4831=" are answered "Answer: 4831" + EOS
and scored by the same math_dapo "Answer: ..." verifier as real math data. A random model cannot
learn by RL alone, so a short supervised warm start (sft.*, cached in WORKDIR/sft) plays the base
model's part: like a real base model it has a systematic failure mode, because
`sft.wrong_fraction` of its supervised answers swap the middle two digits. The warm-started
policy samples the right answer only ~45% of the time; RL rewarded by the verifier alone must
fix it. FIPO runs with 4 mini-batches per step so that the Future-KL influence weights are
active on mini-batches 2-4 (they are exactly 1 on the first), as in the paper.

  python -m fipo_jax.main --config configs/tiny_cpu.py --workdir /tmp/fipo_tiny

Smaller still, a smoke test of the whole loop (1-2 minutes on 2 cores): a warm start just
long enough to give groups of mixed accuracy (to loss 0.3), then 2 RL steps that update.

  python -m fipo_jax.main --config configs/tiny_cpu.py:runlocal --workdir /tmp/fipo_tiny_smoke

Every recipe takes typed args (fipo_jax.recipes.parse_arg): `:runlocal`, `:seed=1`, both as
`:runlocal,seed=1`.
"""

from fipo_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, **recipes.RECIPE_ARGS)
  c = recipes.tiny_cpu()  # the tiny model on CPU, 4 updates per rollout batch, but:
  c.total_steps = 40  # RL steps

  c.data.max_prompt_length = 16  # "Q: copy 4831=" is 13 tokens
  c.data.synthetic.kind = "copy"
  c.data.synthetic.min_digits = 4
  c.data.synthetic.max_digits = 4

  c.rl.max_response_length = 20  # "Answer: 4831" + EOS is 13 tokens
  c.rl.overlong_buffer_len = 4  # penalty only past 16 tokens

  c.optim.lr = 1e-3  # held-out accuracy over 40 steps: README's Measured table

  # Supervised warm start (cached in WORKDIR/sft) until its loss is <= 0.15, at most 1000
  # steps: on the copy plateau (nothing copied yet) it is ~0.71, and the slip leaves ~0.05.
  c.sft.steps = 1000
  c.sft.loss_threshold = 0.15
  c.sft.warmup_steps = 20
  c.sft.wrong_fraction = 0.6  # the "base model" swaps the middle digits 60% of the time
  return recipes.finish(c, args, shrink=_runlocal)


def _runlocal(c):
  """A smoke test of the whole loop: just long enough a warm start to give mixed groups."""
  c.total_steps = 2
  c.eval_every = 1
  c.checkpoint_every = 1
  c.sft.steps = 600  # at most: it stops once it copies (loss <= 0.3; the plateau is ~0.71)
  c.sft.loss_threshold = 0.3
  c.data.synthetic.num_train = 128
  c.data.synthetic.num_val = 8
  c.rl.n = 4
  c.rl.train_batch_size = 4
  c.rl.gen_batch_size = 8
  c.rl.ppo_mini_batch_size = 2
  c.rl.ppo_micro_batch_size_per_device = 8
  c.eval.n = 2
