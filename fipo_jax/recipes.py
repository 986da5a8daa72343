"""The recipe base: the full config schema with its defaults, and `runlocal`.

Every recipe in configs/ starts from it (`from fipo_jax import recipes; c = recipes.base()`),
so a recipe file imports the installed package, not a sibling module through `sys.path`.
`base()` lists every key the trainer reads (the schema is checked by `fipo_jax.config.validate`:
an unknown key is an error). Its values are the official FIPO Qwen2.5-32B run
(`recipe/fipo/run_fipo_qwen2.5_32b.sh`, docs/fipo_spec.md §4-§5); each recipe states only what
differs from it (tests/test_configs.py pins every recipe to its paper table). The loss settings'
defaults are `fipo_jax.algo.losses.PolicyLossConfig`'s. Every recipe takes typed args
(`parse_arg`, `finish`): `:runlocal`, `:seed=1`, `:runlocal,seed=1`. Units: "prompts" counts
prompts, "responses" = prompts x rl.n.
"""

import ml_collections

from fipo_jax.algo import kl, losses

_LOSS = losses.PolicyLossConfig()
# What every recipe's `:arg` accepts, typed by these defaults: `:runlocal`, `:seed=3`,
# `:runlocal,seed=1`. seed -1: the recipe's own c.seed.
RECIPE_ARGS = {"runlocal": False, "seed": -1}


def base() -> ml_collections.ConfigDict:
  """Every config key with the official FIPO 32B value (docs/fipo_spec.md §5.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # root PRNG seed (sampling, init); split by name in the trainer
  c.total_steps = 600  # RL steps (rollout batches); the paper's curves run to ~500-600
  c.eval_every = 5  # eval on data.val_files every k RL steps, and at step 0 (verl test_freq=5)
  c.checkpoint_every = 5  # orbax save every k RL steps (verl save_freq=5); 0 = never
  c.log_every = 1  # write metrics every k RL steps, and always at eval steps and the last step
  c.keep_checkpoints = 3  # keep the last k checkpoints (plus the best by eval/acc_mean)
  c.max_consecutive_bad_steps = 3  # stop after k RL steps in a row with a NaN/inf update
  # Per RL step k: WORKDIR/rollout_data/{k}.jsonl (prompt, response, tokens, score, advantage,
  # per update log-ratio and FIPO weights: `python -m fipo_jax.inspect`) and
  # WORKDIR/influence/step_k.npz (the weights of every row as arrays).
  c.dump_influence = False
  c.dump_max_rows = 64  # responses per step in the JSONL dump (the first of each mini-batch)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "qwen2.5-32b"  # architecture name in fipo_jax.models.PRESETS
  c.model.hf_dir = ml_collections.config_dict.placeholder(str)  # HF dir to load weights from
  # ModelConfig field overrides, on the preset or on hf_dir's config.json; with hf_dir only those
  # that keep its architecture (e.g. max_position_embeddings; not vocab/hidden/layers/heads).
  c.model.overrides = ml_collections.ConfigDict()
  c.model.preset_overrides = ml_collections.ConfigDict()  # on the preset only (runlocal's tiny)
  c.model.param_dtype = any_type("float32")  # params and optimizer state: a name or jnp dtype
  c.model.dtype = any_type("bfloat16")  # compute (log-softmax, ratios, losses stay float32)
  c.model.attention_impl = "auto"  # 'auto' | 'plain' | 'blockwise' | 'splash' | 'cudnn'
  c.model.remat_policy = "full"  # gradient checkpointing (official: enabled)
  c.model.tokenizer_dir = ml_collections.config_dict.placeholder(str)  # default: model.hf_dir

  c.data = ml_collections.ConfigDict()
  # 'verl' (parquet/jsonl files) | 'synthetic' (arithmetic, tiny_cpu) | 'auto' (runlocal:
  # 'verl' when train_files are given, else 'synthetic')
  c.data.task = "verl"
  # Tuples, so that --config.data.train_files=a.parquet (or a,b or '["a", "b"]') overrides them.
  c.data.train_files = ("data/dapo-math-17k.parquet",)  # BytedTsinghua-SIA/DAPO-Math-17k
  c.data.val_files = ("data/aime-2024.parquet",)  # BytedTsinghua-SIA/AIME-2024
  c.data.prompt_key = "prompt"  # column holding the chat message list
  c.data.max_prompt_length = 2048  # tokens, after the chat template
  c.data.shuffle = True  # reshuffle the train set every epoch
  c.data.shuffle_seed = 1  # seed of the epoch shuffles
  c.data.apply_chat_template = True  # tokenizer.apply_chat_template(add_generation_prompt=True)
  # Not 'error': DAPO prompts (92-134 tokens) fit 2048, and one outlier must not end a run.
  c.data.truncation = "left"  # 'left' (cuts the user text's head, counted) | 'error' | 'drop'
  c.data.synthetic = synthetic_task()  # only read when task == 'synthetic'

  c.rl = ml_collections.ConfigDict()
  # The loss: defaults from fipo_jax.algo.losses.PolicyLossConfig, their one home.
  c.rl.loss_mode = losses.DEFAULT_LOSS_MODE  # 'fipo' (future_kl) | 'dapo' (vanilla, grpo) | ...
  # ... any registered loss (algo.losses.loss_modes())
  c.rl.clip_ratio_low = _LOSS.clip_ratio_low  # PPO eps_low
  c.rl.clip_ratio_high = _LOSS.clip_ratio_high  # PPO eps_high (clip-higher)
  c.rl.clip_ratio_c = _LOSS.clip_ratio_c  # dual-clip c; also the Future-KL filter threshold
  c.rl.loss_agg_mode = _LOSS.loss_agg_mode  # per micro-batch token mean (verl)
  c.rl.decay_rate = _LOSS.decay_rate  # tau, Future-KL half-life in tokens (gamma = 2^(-1/tau))
  c.rl.chunk_size = _LOSS.chunk_size  # Future-KL chunk K
  c.rl.future_kl_clip_ratio = _LOSS.future_kl_clip_ratio  # eps_f: f in [1(-eps_f), 1+eps_f]
  c.rl.future_kl_clip_high_only = _LOSS.future_kl_clip_high_only  # [1, 1+eps_f]; False: symmetric
  c.rl.safety_thresh = _LOSS.safety_thresh  # S: A<0 tokens with ratio > S: f clamped to [0.8, 1]
  # Every registered loss's own hyperparameters (register_policy_loss(..., hparams=...)).
  for name, default in losses.loss_hparams().items():
    c.rl[name] = default
  c.rl.n = 16  # G, responses per prompt
  c.rl.train_batch_size = 512  # prompts per RL step (after dynamic sampling)
  c.rl.gen_batch_size = 2048  # prompts per generation round (4 x 512)
  c.rl.ppo_mini_batch_size = 64  # prompts per optimizer step -> 8 updates per RL step
  c.rl.ppo_epochs = 1  # passes over the rollout batch
  # Model passes on packed rows (real tokens end to end, no padding; False: padded rows, the
  # reference path), micro-batches cut by the token budget below (verl's use_dynamic_bsz).
  c.rl.use_remove_padding = True
  c.rl.use_dynamic_bsz = True  # pack micro-batches by token budget
  c.rl.ppo_max_token_len_per_device = 22528  # token budget per micro-batch (2048 + 20480)
  c.rl.ppo_micro_batch_size_per_device = 8  # responses per micro-batch when not dynamic
  c.rl.max_response_length = 20480  # T, tokens
  c.rl.filter_groups_enable = True  # dynamic sampling: drop groups with all-equal metric
  # Compared within a group: 'acc' (official) | 'score' (the verifier's) | 'seq_reward' (score +
  # overlong penalty) | 'seq_final_reward' (= seq_reward: no KL in the reward), as verl's DAPO.
  c.rl.filter_groups_metric = "acc"
  c.rl.max_num_gen_batches = 10  # generation rounds per RL step before giving up (0 = no cap)
  # Stop (exit 2, checkpoint kept) after k RL steps in a row whose max_num_gen_batches rounds
  # found no group of mixed accuracy, as verl's "generated too many batches" (0 = never). A
  # step whose sampled responses are mostly right (a solved batch) is skipped, not counted.
  c.rl.max_empty_steps = 1
  c.rl.norm_adv_by_std_in_grpo = True  # (R - mean) / (std + 1e-6), unbiased std
  c.rl.use_kl_loss = False  # KL-to-reference term (needs a reference model)
  c.rl.kl_loss_coef = 0.0  # its coefficient
  c.rl.kl_loss_type = kl.DEFAULT_KL_TYPE  # 'kl' | 'abs' | 'mse' | 'low_var_kl' (verl names)
  c.rl.entropy_coeff = 0.0  # entropy bonus coefficient
  # 'math_dapo' (official): +1/-1 on the last "Answer: ..." | 'math_verify': verl's 1/0 symbolic
  # check on the math-verify package (pip install 'fipo_jax[math_verify]'), in a child process.
  c.rl.reward_fn = "math_dapo"
  # Verifier processes (JAX-free) that score a batch's responses concurrently, each call still
  # time-bounded; 0 = one at a time in this process (math_verify: in one child). For slow
  # verifiers such as math_verify on large batches; each worker is a process (a CPU core).
  c.rl.reward_workers = 0
  c.rl.overlong_buffer_enable = True  # soft overlong penalty
  c.rl.overlong_buffer_len = 4096  # tokens: penalty ramps 0 -> -factor over the last len tokens
  c.rl.overlong_penalty_factor = 1.0  # penalty at max_response_length
  # Rollout correction (docs/fipo_spec.md §11; official FIPO has none): verl's truncated IS
  # weight min(pi_old / pi_sampler, threshold) on the per-token loss: 'none' | 'token' | 'sequence'.
  c.rl.rollout_is = "none"
  c.rl.rollout_is_threshold = 2.0  # TIS truncation (verl's default)
  # Old log-probs: 'trainer' (a forward pass over the rollouts) | 'sampler' (the engine's
  # log-probs, no pass; then the pass runs only every mismatch_metrics_every steps, 0 = never).
  c.rl.old_log_prob_source = "trainer"
  c.rl.mismatch_metrics_every = 10
  c.rl.sampler_dtype = ml_collections.config_dict.placeholder(str)  # sampler compute dtype
  c.rl.accept_sampler_mismatch = False  # allow 'sampler' when the sampler computes differently

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0  # rollout temperature
  c.sampling.top_p = 1.0  # rollout nucleus
  c.sampling.top_k = -1  # rollout top-k (-1 = off)
  c.sampling.num_slots = 256  # concurrent decode slots of the engine
  c.sampling.decode_steps_per_call = 64  # decode steps per jitted generate call
  # with requests waiting, generate returns once this share of the slots finished (refill batch)
  c.sampling.refill_fraction = 0.125

  c.eval = ml_collections.ConfigDict()
  c.eval.n = 32  # samples per val prompt: avg@32/pass@32/cons@32 (see recipe docstrings)
  c.eval.temperature = 1.0  # val_kwargs.temperature
  c.eval.top_p = 0.7  # val_kwargs.top_p
  c.eval.top_k = -1  # val_kwargs.top_k (-1 = off)
  c.eval.max_prompts = -1  # evaluate at most this many val prompts (-1 = all)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6  # AdamW learning rate
  # Linear warmup from 0, in OPTIMIZER UPDATES (rl.num_mini_batches x rl.ppo_epochs per RL step,
  # 8 here; verl's scheduler moves once per RL step, so its lr_warmup_steps=10 spans 10 RL steps).
  c.optim.warmup_steps = 10
  c.optim.schedule = "constant"  # 'constant' | 'cosine': to 0 at the run's last optimizer update
  c.optim.weight_decay = 0.1  # decoupled weight decay
  c.optim.grad_clip = 1.0  # global-norm clip (0 = off)
  c.optim.b1 = 0.9  # Adam beta1 (torch AdamW default, as in verl)
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.eps = 1e-8  # Adam epsilon

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel axis size
  c.mesh.fsdp = -1  # fully sharded axis (-1 = all remaining devices)
  c.mesh.tensor = 1  # tensor-parallel axis size

  # The sampler's layout over the same devices (e.g. tensor-parallel decode, FSDP training);
  # params are resharded on device after every update. All 0 = the train mesh above.
  c.sampler_mesh = ml_collections.ConfigDict()
  c.sampler_mesh.data = 0  # decode slots split over data x fsdp (0 = use c.mesh)
  c.sampler_mesh.fsdp = 0  # -1 = all remaining devices, as in c.mesh
  c.sampler_mesh.tensor = 0  # heads / kv heads / mlp / vocab split over tensor

  # Rollouts: 'sync' (sample the whole batch, then train) | 'partial' (sampling stops once the
  # batch is full; unfinished groups resume under the next policy, fipo_jax/rl/partial.py) |
  # 'disaggregated' (partial's schedule with the sampler on its own devices; with overlap_calls
  # > 0 it decodes while the trainer updates: docs/async_rollouts.md).
  c.rollout = ml_collections.ConfigDict()
  c.rollout.mode = "sync"
  c.rollout.max_staleness = 1  # eta: a group with a token older than this many steps is dropped
  # partial: truncated IS weight min(pi_prox / pi_behav, rl.rollout_is_threshold) on each
  # token's loss, outside Future-KL: 'token' | 'sequence' | 'none'
  c.rollout.staleness_is = "token"
  c.rollout.sampler_devices = 0  # disaggregated: each process's last k devices sample
  # About (update + staging time) / decode-call time (benchmarks/async_rollout.py prints it).
  c.rollout.overlap_calls = 0  # disaggregated, eta >= 1: decode calls while the update runs

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0  # at most this many supervised warm-start steps before RL (synthetic; 0 = none)
  # Stop the warm start once its mean loss over 10 steps is <= this; still above it after
  # sft.steps: the run stops, exit 2 (0 = no threshold: always sft.steps steps).
  c.sft.loss_threshold = 0.0
  c.sft.warmup_steps = 0  # linear lr warmup from 0 over this many warm-start steps
  c.sft.lr = 1e-3  # its AdamW learning rate
  c.sft.batch_size = 32  # its examples per step
  c.sft.wrong_fraction = 0.0  # share of carrying SFT answers given the no-carry slip (tiny_cpu)
  # parity: the warm start trains on chains only to sft.loss_threshold, then sft.mix_steps steps
  # on the base model's mix, this share of chains and direct answers otherwise
  c.sft.chain_fraction = 0.0
  c.sft.mix_steps = 0

  c.metrics = ml_collections.ConfigDict()
  # Any of 'jsonl' (WORKDIR/metrics.jsonl) | 'tensorboard' (WORKDIR/tensorboard) | 'wandb'
  # (pip install 'fipo_jax[wandb]'; WANDB_MODE=offline writes WORKDIR/wandb only). PNG plots
  # (WORKDIR/plots) are always drawn.
  c.metrics.backends = ("jsonl", "tensorboard")
  c.metrics.wandb_project = "fipo_jax"  # W&B project
  c.metrics.wandb_entity = ml_collections.config_dict.placeholder(str)  # team/user (default: yours)
  c.metrics.wandb_name = ml_collections.config_dict.placeholder(str)  # run name (default: workdir)
  c.metrics.wandb_group = ml_collections.config_dict.placeholder(str)  # e.g. 'fipo-vs-dapo'
  c.metrics.wandb_tags = ()  # e.g. ('fipo', '32b'); a,b on the command line
  return c


def synthetic_task() -> ml_collections.ConfigDict:
  """Arithmetic prompts "Q: 37+45=" answered "Answer: 82" (fipo_jax.data.synthetic)."""
  s = ml_collections.ConfigDict()
  # 'arith' ("Q: 37+45=" -> 82) | 'copy' ("Q: copy 4831=" -> 4831) | 'parity' ("Q: parity
  # 1,0,1=" -> 0; min/max_digits count the bits)
  s.kind = "arith"
  s.num_train = 2000  # train prompts
  s.num_val = 64  # held-out prompts (disjoint from train)
  s.min_digits = 1  # digits per operand, lower bound
  s.max_digits = 2  # digits per operand, upper bound (difficulty)
  s.num_operands = 2  # operands per prompt (difficulty)
  s.ops = "+"  # operators drawn from this string, over '+-*'
  s.seed = 0  # generation seed
  return s


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """A recipe's `:arg` as typed values, in big_vision's manner (`big_vision/configs/common.py`).

  `arg` is comma-separated `name=value` pairs; a bare `name` means True. `spec` gives every
  accepted name with its default, whose type (bool, int, float, str) the value is parsed as:
  parse_arg("runlocal,seed=1", runlocal=False, seed=0) -> {runlocal: True, seed: 1}.
  Raises ValueError naming an unknown name or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    name, eq, text = item.partition("=")
    name = name.strip()
    if name not in spec:
      raise ValueError(f"unknown config arg {name!r} (expected some of {sorted(spec)})")
    out[name] = _typed(name, text.strip() if eq else None, spec[name])
  return out


def _typed(name: str, text: str | None, default):
  if isinstance(default, bool):
    if text is None or text.lower() in ("true", "1"):
      return True
    if text.lower() in ("false", "0"):
      return False
  elif text is not None:
    try:
      return type(default)(text)
    except ValueError:
      pass
  raise ValueError(f"config arg {name}: expected {type(default).__name__}, got {text!r}")


def finish(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict, shrink=None):
  """Applies the common recipe args to `c`: `seed` (when given), then `runlocal` with
  `shrink` (default: `runlocal` below). Returns `c`."""
  if args.get("seed", -1) >= 0:
    c.seed = args.seed
  if args.get("runlocal", False):
    (shrink or runlocal)(c)
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a recipe in place into a laptop-sized check that its whole loop runs (data, chat
  template, sampling, rewards, loss, checkpoints, eval) -- not a training run.

  It keeps the recipe's loss, clip and FIPO settings, and >= 2 mini-batches per step so that
  the Future-KL weights are active; it shrinks only lengths, batch sizes and step counts. The
  model and the data are resolved at validation, after command-line overrides:
    - no model.hf_dir: a tiny random Qwen2-architecture model (`preset_overrides`) on the
      synthetic task (a random model scores 0: expect "update skipped"; rl.max_empty_steps=0
      keeps such a run going);
    - --config.model.hf_dir=DIR: that model with the architecture of DIR/config.json;
    - --config.data.train_files=... (and val_files, evaluated every step): those files
      (task 'auto'). 256 prompt tokens fit the Qwen2.5 chat template around DAPO-Math prompts.
  """
  c.total_steps = 2
  c.eval_every = 1
  c.checkpoint_every = 1
  c.model.hf_dir = None
  c.model.tokenizer_dir = None
  c.model.preset = "qwen2.5-0.5b"
  c.model.preset_overrides = tiny_model()  # ignored with model.hf_dir
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.data.task = "auto"
  c.data.train_files = ()
  c.data.val_files = ()
  c.data.max_prompt_length = 256  # DAPO-Math prompts are 92-200 tokens with the chat template
  c.data.synthetic.num_train = 256
  c.data.synthetic.num_val = 16
  c.rl.n = 4
  c.rl.train_batch_size = 8
  c.rl.gen_batch_size = 16
  c.rl.ppo_mini_batch_size = 2
  c.rl.max_response_length = 32
  c.rl.overlong_buffer_len = 8
  c.rl.ppo_max_token_len_per_device = 256 + 32
  c.rl.chunk_size = 8
  c.rl.max_num_gen_batches = 2  # an untrained model gets few mixed groups; keep smoke runs short
  c.rl.max_empty_steps = 0  # a random model gets none: a plumbing check, not a training run
  c.sampling.num_slots = 16
  c.sampling.decode_steps_per_call = 8
  c.eval.n = 2
  c.eval.max_prompts = 8
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c


def tiny_cpu() -> ml_collections.ConfigDict:
  """`base()` on 2 CPU cores: the tiny model, a synthetic task read as real verl data, and
  FIPO's 4 updates per rollout batch. What the laptop recipes (configs/tiny_cpu.py,
  configs/reasoning_cpu.py) share; each states only its task and what it tuned."""
  c = base()
  c.checkpoint_every = 10
  c.keep_checkpoints = 2

  c.model.preset = "qwen2.5-0.5b"  # Qwen2 architecture (qkv bias, RMSNorm, SwiGLU) ...
  c.model.overrides = tiny_model()  # ... shrunk to ~0.1M parameters
  c.model.dtype = "float32"  # CPU: no bfloat16 speed-up
  c.model.remat_policy = "none"

  c.data.task = "synthetic"  # rows written in the verl schema to WORKDIR/data, read as real data
  c.data.train_files = ()
  c.data.val_files = ()
  c.data.apply_chat_template = False  # plain prompts: half the tokens

  c.rl.n = 8  # G
  c.rl.train_batch_size = 16  # prompts per step
  c.rl.gen_batch_size = 32  # prompts per generation round
  c.rl.ppo_mini_batch_size = 4  # -> 4 updates per step: FIPO active on mini-batches 2-4
  c.rl.chunk_size = 16
  c.rl.future_kl_clip_high_only = False  # small model: symmetric [0.8, 1.2] as at 7B
  c.rl.safety_thresh = 3.0
  c.rl.use_dynamic_bsz = False
  c.rl.ppo_micro_batch_size_per_device = 32  # responses per micro-batch (one per mini-batch)
  c.rl.ppo_max_token_len_per_device = 64

  c.sampling.num_slots = 64
  c.sampling.decode_steps_per_call = 16

  c.eval.n = 4  # eval/acc_mean = avg@4 over the held-out prompts

  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0

  c.sft.lr = 3e-3  # the supervised warm start (the "base model"), cached in WORKDIR/sft
  c.sft.batch_size = 64
  return c


def tiny_model() -> ml_collections.ConfigDict:
  """ModelConfig overrides of a ~0.1M-parameter Qwen2-architecture model."""
  o = ml_collections.ConfigDict()
  o.vocab_size = 128  # >= the synthetic tokenizer's vocabulary (fipo_jax.data.tokenizer)
  o.hidden_size = 64  # D
  o.intermediate_size = 128  # F
  o.num_layers = 2  # L
  o.num_heads = 4  # N
  o.num_kv_heads = 2  # K
  o.head_dim = 16  # H
  o.max_position_embeddings = 512  # >= runlocal's 256 prompt + 32 response tokens
  o.rope_theta = 10000.0  # Qwen2.5's 1e6 leaves too little positional signal at head_dim 16
  o.tie_word_embeddings = True
  return o


def any_type(value) -> ml_collections.FieldReference:
  """A field that takes any type: a dtype as a name (the command line) or a jnp dtype (Python)."""
  return ml_collections.FieldReference(value, field_type=object)
