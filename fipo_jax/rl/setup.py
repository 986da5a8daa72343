"""Everything the trainer needs, built once from a validated RunConfig.

Abstract init -> shardings -> materialise: the model is created (or loaded) straight into its
shards on the mesh; the optimizer state follows the params' shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax import distributed, models, paths, seeds, sharding
from fipo_jax import policy as policy_lib
from fipo_jax.data import pipeline as pipeline_lib
from fipo_jax.data import tokenizer as tok_lib
from fipo_jax.rl import losses as losses_lib
from fipo_jax.rl import optimizer, warmstart
from fipo_jax.rl import rewards as rewards_lib
from fipo_jax.rl import rollout as rollout_lib
from fipo_jax.rl import train_step as ts
from fipo_jax.sampling import engine as engine_lib
from fipo_jax.sampling import params as sampling_params


@dataclasses.dataclass
class Env:
  """The trainer's fixed environment (built once; params/opt_state evolve outside it)."""

  workdir: str
  mesh: jax.sharding.Mesh
  model_cfg: models.ModelConfig
  graphdef: Any
  params: Any
  param_sharding: Any
  tx: optax.GradientTransformation
  opt_state: Any
  lr_schedule: optax.Schedule  # lr per optimizer update count: what tx uses, and what is logged
  update_cfg: ts.UpdateConfig
  tokenizer: Any
  pad_id: int
  eos_ids: list[int]
  max_prompt_length: int
  train_data: Any  # pipeline_lib iterator with next_batch / get_state / set_state
  val_examples: list[dict]
  engine: engine_lib.Engine
  train_sampling: Any
  eval_sampling: Any
  reward_cfg: rewards_lib.RewardConfig
  dump_influence: bool = False
  influence_fn: Callable | None = None
  # The frozen reference policy of the KL term (rl.use_kl_loss), in the params' shardings.
  ref_params: Any = None

  def sampler_params(self, params):
    """The trainer's params in the sampler's layout: resharded on device if its mesh differs."""
    return params if self.engine.mesh is self.mesh else self.engine.load_params(params)

  def make_rollouts(self, examples: Sequence[dict], samples, *, group_offset: int = 0
                    ) -> rollout_lib.Rollouts:
    return rollout_lib.make_rollouts(self.tokenizer, self.reward_cfg, examples, samples,
                                     group_offset=group_offset)


def update_config(rc: config_lib.RunConfig, mesh, seq_len: int) -> ts.UpdateConfig:
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
  return ts.UpdateConfig(
    loss_mode=rc.rl.loss_mode,
    policy_loss=losses_lib.PolicyLossConfig.from_section(rc.rl),
    num_micro_batches=mini // micro,
    temperature=rc.sampling.temperature,
    entropy_coeff=rc.rl.entropy_coeff,
    use_kl_loss=rc.rl.use_kl_loss,
    kl_loss_coef=rc.rl.kl_loss_coef,
    kl_loss_type=rc.rl.kl_loss_type,
  )


def sampling_method(temperature: float, top_p: float, top_k: int):
  return sampling_params.from_flags(temperature, top_p, top_k)  # top_k -1: off, as in configs


def build(rc: config_lib.RunConfig, workdir: str) -> Env:
  mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
  sampler_mesh = (sharding.make_mesh(*rc.sampler_mesh.as_tuple()) if rc.sampler_mesh.is_set
                  else mesh)
  # Every host builds the same data; files written into a shared workdir one host at a time.
  with distributed.primary_first("setup.data"):
    tokenizer = pipeline_lib.resolve_tokenizer(rc, workdir)
    train_data, val_examples = pipeline_lib.build_datasets(rc, tokenizer, workdir=workdir)

  cfg = policy_lib.model_config(rc)
  if rc.model.hf_dir:
    # A gs:// directory is downloaded once into the local cache (safetensors are memory-mapped).
    model = models.from_pretrained(paths.local_copy(rc.model.hf_dir), mesh=mesh,
                                   param_dtype=cfg.param_dtype,
                                   dtype=cfg.dtype, attention_impl=cfg.attention_impl,
                                   remat_policy=cfg.remat_policy)
  else:
    model = models.init_model(cfg, rng=seeds.rng_for(rc.seed, "init"), mesh=mesh)
  graphdef, params = nnx.split(model)
  param_sharding = jax.tree.map(lambda x: x.sharding, params)
  logging.info("model: %s, %.2fM params", cfg.model_type, models.count_params(params) / 1e6)

  tx, lr_schedule = optimizer.make_optimizer(rc.optim, total_updates=rc.total_updates)
  opt_state = jax.jit(tx.init, out_shardings=sharding.optimizer_shardings(tx, params, mesh))(
    params)

  p, t = rc.data.max_prompt_length, rc.rl.max_response_length
  upd = update_config(rc, mesh, p + t)
  engine = engine_lib.Engine(
    cfg, graphdef,
    engine_lib.EngineConfig(num_slots=rc.sampling.num_slots, max_prompt_len=p, max_new_tokens=t,
                            steps_per_call=rc.sampling.decode_steps_per_call),
    # Every device (of every host); its own layout if c.sampler_mesh is set (Env.sampler_params).
    mesh=sampler_mesh,
  )
  dump = rc.dump_influence
  env = Env(
    workdir=workdir, mesh=mesh, model_cfg=cfg, graphdef=graphdef, params=params,
    param_sharding=param_sharding, tx=tx, opt_state=opt_state, lr_schedule=lr_schedule,
    update_cfg=upd,
    tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id),
    eos_ids=tok_lib.eos_token_ids(tokenizer), max_prompt_length=p,
    train_data=train_data, val_examples=val_examples, engine=engine,
    train_sampling=sampling_method(rc.sampling.temperature, rc.sampling.top_p,
                                   rc.sampling.top_k),
    eval_sampling=sampling_method(rc.eval.temperature, rc.eval.top_p, rc.eval.top_k),
    reward_cfg=rewards_lib.RewardConfig.from_section(rc.rl),  # rl.reward_fn and the shaping
    dump_influence=dump,
    influence_fn=jax.jit(functools.partial(ts.influence_step, graphdef, cfg=upd)) if dump else None,
  )
  env.ref_params = reference_params(rc, env, workdir) if rc.rl.use_kl_loss else None
  return env


def frozen_copy(params, shardings):
  """A copy of `params` in new buffers with the given shardings (safe from donation)."""
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def reference_params(rc: config_lib.RunConfig, env: Env, workdir: str):
  """The KL term's reference policy: the params RL starts from, frozen, in their shardings.

  That is the initial params (from model.hf_dir, or from the seed), after the SFT warm start
  when sft.steps > 0 (from its WORKDIR/sft cache when there is one). Built before any update,
  it is the same on a fresh start and on resume, so checkpoints never store it.
  """
  ref = frozen_copy(env.params, env.param_sharding)
  if rc.sft.steps > 0:
    ref = warmstart.sft_warm_start(rc, env, ref, workdir)
  return ref
