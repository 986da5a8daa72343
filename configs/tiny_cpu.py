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
  c = recipes.base()  # the FIPO 32B run, but:
  c.total_steps = 40  # RL steps
  c.checkpoint_every = 10
  c.keep_checkpoints = 2

  c.model.preset = "qwen2.5-0.5b"  # Qwen2 architecture (qkv bias, RMSNorm, SwiGLU) ...
  c.model.overrides = recipes.tiny_model()  # ... shrunk to ~0.1M parameters
  c.model.dtype = "float32"  # CPU: no bfloat16 speed-up
  c.model.remat_policy = "none"

  c.data.task = "synthetic"  # rows written in the verl schema to WORKDIR/data, read as real data
  c.data.train_files = ()
  c.data.val_files = ()
  c.data.max_prompt_length = 16  # "Q: copy 4831=" is 13 tokens
  c.data.apply_chat_template = False  # plain prompts: half the tokens, a warm start 2x faster
  c.data.synthetic.kind = "copy"
  c.data.synthetic.min_digits = 4
  c.data.synthetic.max_digits = 4

  c.rl.n = 8  # G
  c.rl.train_batch_size = 16  # prompts per step
  c.rl.gen_batch_size = 32  # prompts per generation round
  c.rl.ppo_mini_batch_size = 4  # -> 4 updates per step: FIPO active on mini-batches 2-4
  c.rl.max_response_length = 20  # "Answer: 4831" + EOS is 13 tokens
  c.rl.overlong_buffer_len = 4  # penalty only past 16 tokens
  c.rl.chunk_size = 16
  c.rl.future_kl_clip_high_only = False  # small model: symmetric [0.8, 1.2] as at 7B
  c.rl.safety_thresh = 3.0
  c.rl.use_dynamic_bsz = False
  c.rl.ppo_micro_batch_size_per_device = 32  # responses per micro-batch (one per mini-batch)
  c.rl.ppo_max_token_len_per_device = 64

  c.sampling.num_slots = 64
  c.sampling.decode_steps_per_call = 16

  c.eval.n = 4  # eval/acc_mean = avg@4 over the held-out prompts

  c.optim.lr = 1e-3  # held-out accuracy over 40 steps: README's Measured table
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0

  # Supervised warm start (cached in WORKDIR/sft) until its loss is <= 0.15, at most 1000
  # steps: on the copy plateau (nothing copied yet) it is ~0.71, and the slip leaves ~0.05.
  c.sft.steps = 1000
  c.sft.loss_threshold = 0.15
  c.sft.warmup_steps = 20
  c.sft.lr = 3e-3
  c.sft.batch_size = 64
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
