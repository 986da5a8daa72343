r"""The main job: FIPO grows a chain of thought on a laptop (parity of 14 bits, 2 CPU cores).

  python -m fipo_jax.main --config configs/reasoning_cpu.py --workdir /tmp/fipo_reasoning

The task (data.synthetic.kind='parity'): "Q: parity 10110010111001=" is answered "Answer: 0"
and scored by the math_dapo "Answer: ..." verifier, as real math data. Two right responses
exist: the direct answer (10 tokens with EOS) and a chain of thought, the running parity with
the bit it reads, digit 2*bit + parity per step: "31231120323112 Answer: 0" (25 tokens). Why
parity with a running-parity chain (Tsilivis et al., ICLR 2026): length buys accuracy and
nothing else does. A tiny transformer cannot compute the parity of 14 bits in one token, so
direct answers stay at chance on held-out prompts, while each chain step copies the bit at a
fixed offset and XORs it with the parity in the token it reads, which it learns. The bit in
each digit matters: with parities alone ("11011100101110") the fixed-offset attention got no
gradient until the XOR worked, and the warm start of seeds 1 and 2 sat on its plateau (loss
0.42) past 700 steps; with the bit, seeds 0-4 reach loss 0.01 in 148-303 steps (0.003 in 212-339).

The supervised warm start (the "base model", sft.*) first learns the chain (to
sft.loss_threshold), then sees it in a share sft.chain_fraction of its examples and the direct
answer otherwise, so it samples the short form most of the time. The direct answer's bit is
asked for without being named (loss -log(p('0') + p('1'))), a batch of chains without their
first token is trained alongside (the chain stays learnt while its sampled share moves), and
the lr anneals to 0 over the mix: trained on the true bit, which it cannot compute in one
token, the model learnt to guess at the answer step the chain shares (seeds 1 and 4 then
answered after a right chain at chance). RL rewarded only by the verifier must move it to the
long form: the response length grows and accuracy follows. The decision is the first response
token, early in a long response, which is where FIPO's Future-KL weights act (4 mini-batch
updates per rollout batch: the weights are 1 on the first and move on the others).

Eval uses the official val_kwargs (temperature 1.0, top-p 0.7), so at step 0 top-p keeps mostly
the base model's dominant short form; response_length/mean is the sampling policy's own.
"""

from fipo_jax import recipes


def get_config(arg=None):
  c = recipes.base()
  c.total_steps = 20  # RL steps
  c.eval_every = 5  # eval on the held-out prompts (and at step 0)
  c.checkpoint_every = 10
  c.keep_checkpoints = 2

  c.model.preset = "qwen2.5-0.5b"  # Qwen2 architecture (qkv bias, RMSNorm, SwiGLU) ...
  c.model.overrides = recipes.tiny_model()  # ... shrunk to ~0.1M parameters
  # Measured (with the parity-only chain): at 1e4 the warm start stayed on its plateau for 400+
  # steps; at 300 the fixed-offset attention formed within ~260 on seed 0 (more positional
  # frequencies resolve 14 tokens).
  c.model.overrides.rope_theta = 300.0
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # CPU: no bfloat16 speed-up
  c.model.remat_policy = "none"
  c.model.tokenizer_dir = None  # None: the synthetic tokenizer is built into WORKDIR/tokenizer

  c.data.task = "synthetic"  # rows written in the verl schema to WORKDIR/data, read as real data
  c.data.train_files = ()
  c.data.val_files = ()
  c.data.max_prompt_length = 25  # "Q: parity " + 14 bits + "=" is 25 tokens
  c.data.apply_chat_template = False  # plain prompts: half the tokens
  c.data.synthetic.kind = "parity"
  c.data.synthetic.num_train = 4000  # of 16384 bit strings
  c.data.synthetic.num_val = 64  # held out: no val string appears in train
  c.data.synthetic.min_digits = 14  # bits
  c.data.synthetic.max_digits = 14
  c.data.synthetic.seed = 0

  c.rl.loss_mode = "fipo"
  c.rl.n = 8  # G
  c.rl.train_batch_size = 16  # prompts per step
  c.rl.gen_batch_size = 32  # prompts per generation round
  c.rl.ppo_mini_batch_size = 4  # -> 4 updates per step: FIPO active on mini-batches 2-4
  c.rl.max_response_length = 28  # the chain is 25 tokens with EOS
  c.rl.overlong_buffer_len = 2  # penalty only past 26 tokens
  c.rl.max_num_gen_batches = 4  # rounds per step; a step with no mixed group stops the run
  c.rl.decay_rate = 32.0
  c.rl.chunk_size = 16
  c.rl.future_kl_clip_ratio = 0.2
  c.rl.future_kl_clip_high_only = False  # small model: symmetric [0.8, 1.2] as at 7B
  c.rl.safety_thresh = 3.0
  c.rl.use_dynamic_bsz = False
  c.rl.ppo_micro_batch_size_per_device = 32  # responses per micro-batch (one per mini-batch)
  c.rl.ppo_max_token_len_per_device = 64

  c.sampling.num_slots = 64
  c.sampling.decode_steps_per_call = 16

  c.eval.n = 4  # eval/acc_mean = avg@4 over the held-out prompts
  c.eval.max_prompts = -1

  # Measured (seeds 1 and 4, same warm starts): at 1e-3 RL adopted the chain and then broke it
  # (chain digits at 0.5-0.7 teacher-forced by step 10, held-out accuracy 0.58 and 0.42 at
  # step 20); at 3e-4 both reached 1.00.
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # Warm start (cached in WORKDIR/sft): chains only until the loss is <= sft.loss_threshold
  # (at most sft.steps steps; a short plateau of seed-dependent length comes first), then
  # sft.mix_steps steps on the base model's mix.
  c.sft.steps = 1500
  # 0.003, not 0.01: RL needs chains sampled at temperature 1 to be right (at 0.01 seed 2's
  # sampled chains scored below direct answers and RL left it on the short form).
  c.sft.loss_threshold = 0.003
  c.sft.warmup_steps = 50
  c.sft.lr = 3e-3
  c.sft.batch_size = 64
  # Measured (seed 0, parity-only chain): at 0.2 RL moved the policy to the chain within ~10
  # steps; at 0.1 it stayed on direct answers (held-out length 10.0 at steps 0 and 5). Above
  # ~0.3 top-p 0.7 keeps the chain at step 0 and the 2x length growth has no room.
  c.sft.chain_fraction = 0.25  # the base model writes the chain 1 time in 4
  c.sft.mix_steps = 150
  if arg:
    raise ValueError(f"unknown config arg {arg!r} (expected nothing)")
  return c
