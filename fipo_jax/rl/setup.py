"""Everything the trainer needs, built once from a validated RunConfig.

`build(rc, workdir) -> (Env, TrainState)`: the fixed environment (mesh, data, sampler, jitted
pieces, the frozen reference policy) and the state the loop evolves (params, optimizer state,
RL step). Abstract init -> shardings -> materialise: the model is created (or loaded) straight
into its shards on the mesh; the optimizer state follows the params' shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax import distributed, models, paths, seeds, sharding
from fipo_jax import policy as policy_lib
from fipo_jax.algo import losses as losses_lib
from fipo_jax.data import pipeline as pipeline_lib
from fipo_jax.data import tokenizer as tok_lib
from fipo_jax.rl import optimizer, partial_sampling, scoring, steps
from fipo_jax.rl import rewards as rewards_lib
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as sampling_params
from fipo_jax.sampling import staging

if TYPE_CHECKING:
  import transformers

# (params, mini-batch) -> FIPO's per-token weights of it (`steps.influence_step`, jitted).
InfluenceFn = Callable[[nnx.State, steps.Batch], dict[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
  """What the loop evolves: the params and optimizer state after `step` RL steps."""

  params: nnx.State
  opt_state: optax.OptState
  step: int = flax.struct.field(pytree_node=False, default=0)  # RL steps done (checkpoint step)


@dataclasses.dataclass
class Env:
  """The trainer's fixed environment: built once, never updated (the TrainState evolves)."""

  workdir: str
  mesh: jax.sharding.Mesh
  model_cfg: models.ModelConfig
  graphdef: nnx.GraphDef
  param_sharding: nnx.State  # a NamedSharding per param, in the params' tree
  opt_sharding: optax.OptState  # a NamedSharding per optimizer-state leaf, in its tree
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule  # lr per optimizer update count: what tx uses, and what is logged
  update_cfg: steps.UpdateConfig
  tokenizer: transformers.PreTrainedTokenizerBase
  pad_id: int
  eos_ids: list[int]
  max_prompt_length: int
  train_data: pipeline_lib.PromptIterator
  val_examples: list[dict[str, Any]]  # tokenized examples: prompt_ids, ground_truth, ...
  engine: engine_lib.Engine
  train_sampling: sampling_params.SamplingMethod
  eval_sampling: sampling_params.SamplingMethod
  reward_cfg: rewards_lib.RewardConfig
  influence_fn: InfluenceFn | None = None  # set when rc.dump_influence
  # The frozen reference policy of the KL term (rl.use_kl_loss), in the params' shardings.
  ref_params: nnx.State | None = None
  # rollout.mode='partial': the groups in flight across steps (rl/partial_sampling.py).
  carry: partial_sampling.PartialRollouts | None = None

  def sampler_params(self, params: nnx.State) -> nnx.State:
    """The trainer's params in the sampler's layout and dtype: one jitted reshard and cast on
    device (`Engine.load_params`), or the params themselves when they already are."""
    return self.engine.load_params(params)

  def train_sampler(self) -> scoring.Sampler:
    """What `rollout.collect` samples and scores with."""
    return scoring.Sampler(self.engine, self.train_sampling, self.eos_ids, self.tokenizer,
                               self.reward_cfg)

  def eval_sampler(self) -> scoring.Sampler:
    """What `evaluation.evaluate` samples and scores with: the eval sampling method."""
    return scoring.Sampler(self.engine, self.eval_sampling, self.eos_ids, self.tokenizer,
                               self.reward_cfg)


def update_config(rc: config_lib.RunConfig, mesh, seq_len: int) -> steps.UpdateConfig:
  """Static update settings, incl. how many micro-batches a mini-batch is split into."""
  mini = rc.rl.ppo_mini_batch_size * rc.rl.n
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if rc.rl.use_dynamic_bsz:  # token budget per device, as verl's ppo_max_token_len_per_gpu
    per_device = max(1, rc.rl.ppo_max_token_len_per_device // seq_len)
  else:
    per_device = rc.rl.ppo_micro_batch_size_per_device
  micro = min(mini, per_device * batch_devices)
  while mini % micro:  # equal micro-batches: the largest divisor of the mini-batch that fits
    micro -= 1
  return steps.UpdateConfig(
    loss_mode=rc.rl.loss_mode,
    policy_loss=losses_lib.PolicyLossConfig.from_config(rc.rl),
    num_micro_batches=mini // micro,
    temperature=rc.sampling.temperature,
    entropy_coeff=rc.rl.entropy_coeff,
    use_kl_loss=rc.rl.use_kl_loss,
    kl_loss_coef=rc.rl.kl_loss_coef,
    kl_loss_type=rc.rl.kl_loss_type,
  )


def sampling_method(temperature: float, top_p: float, top_k: int):
  return sampling_params.from_flags(temperature, top_p, top_k)  # top_k -1: off, as in configs


def build(rc: config_lib.RunConfig, workdir: str, devices: Sequence[jax.Device] | None = None
          ) -> tuple[Env, TrainState]:
  """The run's environment and its initial state (step 0, before any warm start: the
  trainer runs it on the reference and the initial state), on `devices` (default: every device
  of every host), split between the trainer and the sampler per rollout.mode."""
  trainer_devices, sampler_devices = device_split(rc, devices)
  mesh = train_mesh(rc, trainer_devices)
  # Every host builds the same data; files written into a shared workdir one host at a time.
  with distributed.primary_first("setup.data"):
    tokenizer = pipeline_lib.resolve_tokenizer(rc, workdir)
    train_data, val_examples = pipeline_lib.build_datasets(rc, tokenizer, workdir=workdir)
  cfg, graphdef, params = _model(rc, mesh)
  tx, lr_schedule = optimizer.make_optimizer(rc.optim, total_updates=rc.total_updates)
  opt_sharding = sharding.optimizer_shardings(tx, params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  upd = update_config(rc, mesh, rc.data.max_prompt_length + rc.rl.max_response_length)
  env = Env(
    workdir=workdir, mesh=mesh, model_cfg=cfg, graphdef=graphdef,
    param_sharding=jax.tree.map(lambda x: x.sharding, params), opt_sharding=opt_sharding,
    tx=tx, lr_schedule=lr_schedule, update_cfg=upd,
    tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id),
    eos_ids=tok_lib.eos_token_ids(tokenizer), max_prompt_length=rc.data.max_prompt_length,
    train_data=train_data, val_examples=val_examples,
    engine=make_engine(rc, *sampler_model(rc, cfg), sampler_mesh(rc, cfg, mesh, sampler_devices)),
    train_sampling=sampling_method(rc.sampling.temperature, rc.sampling.top_p,
                                   rc.sampling.top_k),
    eval_sampling=sampling_method(rc.eval.temperature, rc.eval.top_p, rc.eval.top_k),
    reward_cfg=rewards_lib.RewardConfig.from_section(rc.rl),  # rl.reward_fn and the shaping
    influence_fn=_influence_fn(graphdef, upd) if rc.dump_influence else None,
    carry=partial_sampling.PartialRollouts() if rc.rollout.carries else None,
  )
  env.ref_params = reference_params(env, params) if rc.rl.use_kl_loss else None
  return env, TrainState(params=params, opt_state=opt_state)


# The builders the trainer and fipo_jax.aot share: the same meshes, dtypes, shardings and jitted
# steps from the recipe (aot passes a TPU topology's devices and abstract inputs).


def device_split(rc: config_lib.RunConfig, devices: Sequence[jax.Device] | None = None
                 ) -> tuple[list[jax.Device], list[jax.Device]]:
  """(trainer devices, sampler devices) of `devices` (default: every device of every host):
  the same devices for both, or with rollout.mode='disaggregated' each process's last
  rollout.sampler_devices for the sampler (`staging.split_devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  if rc.rollout.mode != "disaggregated":
    return devices, devices
  return staging.split_devices(devices, rc.rollout.sampler_devices)


def train_mesh(rc: config_lib.RunConfig, devices=None) -> jax.sharding.Mesh:
  """The train mesh (rc.mesh) over `devices` (default: every device of every host)."""
  return sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor, devices=devices)


def sampler_mesh(rc: config_lib.RunConfig, cfg: models.ModelConfig, train: jax.sharding.Mesh,
                 devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The sampler's mesh over `devices` (default: the train mesh's; `device_split`'s sampler
  devices): rc.sampler_mesh when set, else the layout rule `sharding.sampler_mesh_sizes`
  (tensor-parallel over the KV heads within a host, slots data-parallel over the rest, never
  FSDP). The train mesh itself when they agree."""
  colocated = devices is None or list(devices) == list(train.devices.flat)
  devices = list(train.devices.flat) if devices is None else list(devices)
  sizes = (rc.sampler_mesh.resolve(len(devices)) if rc.sampler_mesh.is_set
           else sharding.sampler_mesh_sizes(cfg.num_heads, cfg.num_kv_heads, devices))
  if colocated and tuple(sizes) == tuple(train.devices.shape):
    return train
  return sharding.make_mesh(*sizes, devices=devices)


def sampler_model(rc: config_lib.RunConfig, cfg: models.ModelConfig
                  ) -> tuple[models.ModelConfig, nnx.GraphDef]:
  """(ModelConfig, GraphDef) the sampler runs: compute and weights in rl.sampler_dtype (default:
  the trainer's compute dtype). The trainer casts its float32 masters to that dtype at every
  use, so weights stored in it give the same numbers (models.attention.sampler_mismatch)."""
  dtype = rc.rl.sampler_dtype or cfg.dtype
  scfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
  return scfg, nnx.split(models.abstract_model(scfg))[0]


def make_engine(rc: config_lib.RunConfig, cfg: models.ModelConfig, graphdef: nnx.GraphDef,
                mesh: jax.sharding.Mesh, *, num_slots: int | None = None,
                steps_per_call: int | None = None) -> engine_lib.Engine:
  """The rollout sampler on `mesh` (aot: `num_slots`, one step per call)."""
  return engine_lib.Engine(
    cfg, graphdef,
    engine_lib.EngineConfig(num_slots=num_slots or rc.sampling.num_slots,
                            # partial rollouts resume from prompt + generated prefix
                            max_prompt_len=rc.data.max_prompt_length + (
                              rc.rl.max_response_length if rc.rollout.resumes else 0),
                            max_new_tokens=rc.rl.max_response_length,
                            steps_per_call=steps_per_call or rc.sampling.decode_steps_per_call,
                            # resumed prefixes vary the inserts: one shape per prefill shape
                            insert_bucket="prefix" if rc.rollout.resumes else "count"),
    mesh=mesh,
  )


def _influence_fn(graphdef: nnx.GraphDef, upd: steps.UpdateConfig) -> InfluenceFn:
  """FIPO's per-token weights of a mini-batch (jitted)."""
  return jax.jit(functools.partial(steps.influence_step, graphdef, cfg=upd))


def _model(rc: config_lib.RunConfig, mesh) -> tuple[models.ModelConfig, nnx.GraphDef, nnx.State]:
  """The initial policy in its shards on `mesh`: from model.hf_dir, or initialised from the seed."""
  cfg = policy_lib.model_config(rc)
  if rc.model.hf_dir:
    # A gs:// directory is downloaded once into the local cache (safetensors are memory-mapped).
    model = models.from_pretrained(paths.local_copy(rc.model.hf_dir), mesh=mesh,
                                   param_dtype=cfg.param_dtype,
                                   dtype=cfg.dtype, attention_impl=cfg.attention_impl,
                                   remat_policy=cfg.remat_policy,
                                   **dict(rc.model.overrides))  # as policy.model_config does
  else:
    model = models.init_model(cfg, rng=seeds.rng_for(rc.seed, "init"), mesh=mesh)
  graphdef, params = nnx.split(model)
  logging.info("model: %s, %.2fM params", cfg.model_type, models.count_params(params) / 1e6)
  return cfg, graphdef, params


def frozen_copy(params, shardings):
  """A copy of `params` in new buffers with the given shardings (safe from donation)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def reference_params(env: Env, params: nnx.State) -> nnx.State:
  """The KL term's reference policy: the initial params (from model.hf_dir, or from the seed),
  frozen, in their shardings.

  With sft.steps > 0 the trainer runs the warm start on this copy before any update
  (`trainer.build`), so the reference is the policy RL starts from. Built before
  any update, it is the same on a fresh start and on resume: checkpoints never store it.
  """
  return frozen_copy(params, env.param_sharding)
