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
asked for without being named (loss -log(p('0') + p('1'))), a batch of chains is trained
alongside, its first digit given that the response is a chain (loss -log(p(digit) / (1 -
p('A')))): the chain stays learnt while its sampled share moves. With the first token left out
of that batch, seed 5's first digit drifted to chance in the mix (teacher-forced 0.51 given a
chain, against 0.94 on seeds 1 and 4), its chains were right as often as direct answers, and RL
left it on the short form for 17 of 20 steps. The lr anneals to 0 over the mix. Trained on
the true bit, which it cannot compute in one token, the model learnt to guess at the answer step
the chain shares (seeds 1 and 4 then answered after a right chain at chance). RL rewarded only
by the verifier must move it to the long form: the response length grows and accuracy follows.
The decision is the first response token, early in a long response, which is where FIPO's
Future-KL weights act (4 mini-batch updates per rollout batch: the weights are 1 on the first
and move on the others).

Eval uses the official val_kwargs (temperature 1.0, top-p 0.7), so at step 0 top-p keeps mostly
the base model's dominant short form; response_length/mean is the sampling policy's own.
"""

from fipo_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, seed=-1)  # `:seed=1`
  c = recipes.tiny_cpu()  # the tiny model on CPU, 4 updates per rollout batch, but:
  # RL steps. Measured: on seed 8 the base model answered after a right chain only ~0.73 of
  # the time (teacher-forced), so RL had the answer step to fix after adopting the chain: 0.83
  # at step 20, 0.99 at step 30; seeds 0-7 and 9 end at 1.00 too. Steps 21-40 took 50-118 s of wall
  # (a resumed run, loaded 2-core host).
  c.total_steps = 40

  # Measured (with the parity-only chain): at 1e4 the warm start stayed on its plateau for 400+
  # steps; at 300 the fixed-offset attention formed within ~260 on seed 0 (more positional
  # frequencies resolve 14 tokens).
  c.model.overrides.rope_theta = 300.0

  c.data.max_prompt_length = 25  # "Q: parity " + 14 bits + "=" is 25 tokens
  c.data.synthetic.kind = "parity"
  c.data.synthetic.num_train = 4000  # of 16384 bit strings; 64 more held out
  c.data.synthetic.min_digits = 14  # bits
  c.data.synthetic.max_digits = 14

  c.rl.max_response_length = 28  # the chain is 25 tokens with EOS
  c.rl.overlong_buffer_len = 2  # penalty only past 26 tokens
  c.rl.max_num_gen_batches = 4  # rounds per step; a step with no mixed group stops the run

  # Measured (seeds 1 and 4, same warm starts): at 1e-3 RL adopted the chain and then broke it
  # (chain digits at 0.5-0.7 teacher-forced by step 10, held-out accuracy 0.58 and 0.42 at
  # step 20); at 3e-4 both reached 1.00.
  c.optim.lr = 3e-4

  # Warm start (cached in WORKDIR/sft): chains only until the loss is <= sft.loss_threshold
  # (at most sft.steps steps; a short plateau of seed-dependent length comes first), then
  # sft.mix_steps steps on the base model's mix.
  c.sft.steps = 1500
  # 0.003, not 0.01: RL needs chains sampled at temperature 1 to be right (at 0.01 seed 2's
  # sampled chains scored below direct answers and RL left it on the short form).
  c.sft.loss_threshold = 0.003
  c.sft.warmup_steps = 50
  # Measured (seed 0, parity-only chain): at 0.2 RL moved the policy to the chain within ~10
  # steps; at 0.1 it stayed on direct answers (held-out length 10.0 at steps 0 and 5). Above
  # ~0.3 top-p 0.7 keeps the chain at step 0 and the 2x length growth has no room.
  c.sft.chain_fraction = 0.25  # the base model writes the chain 1 time in 4
  c.sft.mix_steps = 150
  return recipes.finish(c, args)
