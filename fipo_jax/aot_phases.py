"""The phases of an RL step as fipo_jax.aot compiles them: the trainer's own jitted steps.

`build(run, mcfg, devices)` makes the trainer's programs through the builders of
fipo_jax.rl.setup (meshes, dtypes, shardings, jitted steps) and adds only abstract inputs;
`compile_phase` lowers one, compiles it and reads its memory and its cost
(fipo_jax.perf_model). Phases: train_step (one mini-batch update), old_log_prob (the old- and,
with the KL term, the reference-log-prob pass: the same program), handover (train params ->
sampler weights), prefill, insert, decode (one `generate` call of sampling.decode_steps_per_call
steps). Shapes use the legend in fipo_jax/__init__.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile
import time
from typing import Any

from fipo_jax import aot_batches, perf_model

PHASES = ("train_step", "old_log_prob", "handover", "prefill", "insert", "decode")
TRAIN_PHASES = ("train_step", "old_log_prob", "handover")  # on the train mesh


@dataclasses.dataclass
class Phase:
  """One compiled program, per chip."""

  name: str
  mesh: dict
  param_dtype: str
  kernel: str  # the attention kernel it compiled with
  shapes: str
  tokens: int = 0  # tokens one call processes (model FLOPs: train_step)
  memory: dict | None = None  # argument/output/alias/temp/code/total bytes of the program
  resident: dict = dataclasses.field(default_factory=dict)  # other phases' state held meanwhile
  cost: perf_model.ProgramCost | None = None  # loops at their trip counts
  xla_flops: float | None = None  # cost_analysis() as reported (loop bodies once)
  xla_bytes: float | None = None
  compile_seconds: float | None = None
  error: str | None = None
  hlo: str | None = None  # the optimized HLO (the perf model reads it again at other fills)

  @property
  def total_bytes(self) -> int | None:
    return None if self.memory is None else self.memory["total"] + sum(self.resident.values())


def bytes_per_chip(tree) -> int:
  """HBM one chip holds for a pytree of sharded ShapeDtypeStructs (or arrays): one shard each."""
  import jax

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _sds(tree, shardings):
  import jax

  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@dataclasses.dataclass
class Programs:
  """The trainer's programs for one recipe on one set of devices, with abstract inputs."""

  run: Any
  mcfg: Any
  mesh: Any  # the train mesh
  graphdef: Any
  params: Any  # the float32 masters as sharded ShapeDtypeStructs
  opt_state: Any
  tx: Any  # the recipe's optimizer
  update_cfg: Any
  steps: Any  # ts.CompiledSteps: train, log_prob
  engine: Any  # the sampler (its mesh, dtype, jitted steps)
  sampler_params: Any  # what the handover gives the engine
  sampling: Any


def build(run, mcfg, devices, *, num_slots: int | None = None) -> Programs:
  """The trainer's programs through fipo_jax.rl.setup's builders (what setup.build runs)."""
  import jax

  from fipo_jax import sharding
  from fipo_jax.models import build as build_lib
  from fipo_jax.rl import optimizer, setup
  from fipo_jax.rl import steps as steps_lib

  trainer_devices, sampler_devices = setup.device_split(run, devices)
  mesh = setup.train_mesh(run, trainer_devices)
  graphdef, abs_params, param_sh = build_lib.param_shardings(mcfg, mesh)
  params = _sds(abs_params, param_sh)
  tx, _ = optimizer.make_optimizer(run.optim, total_updates=run.total_updates)
  opt_sh = sharding.optimizer_shardings(tx, params, mesh)
  opt_state = _sds(jax.eval_shape(tx.init, params), opt_sh)
  upd = setup.update_config(run, mesh, run.data.max_prompt_length + run.rl.max_response_length)
  steps = steps_lib.jit_steps(graphdef, cfg=upd, tx=tx, param_sharding=param_sh,
                              opt_sharding=opt_sh)
  engine = setup.make_engine(run, *setup.sampler_model(run, mcfg),
                             setup.sampler_mesh(run, mcfg, mesh, sampler_devices),
                             num_slots=num_slots)
  sparams = engine.abstract_params(params)
  sampling = setup.sampling_method(run.sampling.temperature, run.sampling.top_p,
                                   run.sampling.top_k)
  return Programs(run, mcfg, mesh, graphdef, params, opt_state, tx, upd, steps, engine,
                  _as_sds(sparams), sampling)


def _as_sds(tree):
  import jax

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train_batch(p: Programs, mean_prompt: int, mean_response: int):
  """(abstract mini-batch, shapes text, tokens) of the run's layout (packed or padded)."""
  run, cfg = p.run, p.update_cfg
  rows = run.rl.ppo_mini_batch_size * run.rl.n
  ref = " +reference params" if cfg.use_kl_loss else ""
  if run.rl.use_remove_padding:
    shape = aot_batches.packed_shape(run, p.mesh, cfg, mean_prompt, mean_response)
    tokens = rows * (min(mean_prompt, run.data.max_prompt_length)
                     + min(mean_response, run.rl.max_response_length))
    text = (f"packed M={rows} into {shape.num_micro} micro-batches x {shape.num_shards} x "
            f"{shape.rows} row of {shape.row_len} (mean P {mean_prompt} + T {mean_response}) "
            f"remat={p.mcfg.remat_policy}{ref}")
    return aot_batches.batch(run, p.mesh, shape, cfg), text, tokens
  seq = run.data.max_prompt_length + run.rl.max_response_length
  text = (f"M={rows} micro={rows // cfg.num_micro_batches}x{cfg.num_micro_batches} S={seq} "
          f"remat={p.mcfg.remat_policy}{ref}")
  shape = aot_batches.padded_shape(run, p.mesh, cfg)
  return aot_batches.batch(run, p.mesh, shape, cfg), text, rows * seq


def traced(p: Programs, name: str, batch=None):
  """The jax.stages.Traced of phase `name` on its abstract inputs."""
  if name == "train_step":
    return p.steps.train.trace(p.params, p.opt_state, batch)
  if name == "old_log_prob":
    return p.steps.log_prob.trace(p.params, batch)
  if name == "handover":
    return p.engine.handover(p.params).trace(p.params)
  if name == "prefill":
    return p.engine.trace_prefill(p.sampler_params, sampling=p.sampling)
  if name == "insert":
    prefix = _as_sds(p.engine.trace_prefill(p.sampler_params, sampling=p.sampling).out_info)
    return p.engine.trace_insert(prefix)
  if name == "decode":
    return p.engine.trace_generate(p.sampler_params, sampling=p.sampling)
  raise ValueError(f"unknown phase {name!r}; known: {PHASES}")


def compile_phase(phase: Phase, traced_fn, unknown_trips=(1,), kernel_bytes=None,
                  kernel_flops=None) -> Phase:
  """Lowers and compiles; fills memory, cost (loops at their trip counts, the kernels named in
  `kernel_bytes` / `kernel_flops` at the bytes / FLOPs per call stated:
  perf_model.program_cost) and compile time."""
  start = time.perf_counter()
  # The optimized HLO from XLA's dump: `compiled.as_text()` fails on some TPU programs (libtpu
  # 0.0.52: "async-update instruction should have 1 operands").
  with tempfile.TemporaryDirectory() as dump:
    try:
      compiled = traced_fn.lower().compile(compiler_options={
        "xla_dump_to": dump, "xla_dump_hlo_as_text": True})
    except Exception as e:  # noqa: BLE001 (the TPU compiler reports HBM overflow this way)
      phase.compile_seconds = time.perf_counter() - start
      phase.error = str(e).split("\n")[0][:500]
      return phase
    phase.compile_seconds = time.perf_counter() - start
    found = sorted(pathlib.Path(dump).glob("*.after_optimizations.txt"))
    phase.hlo = found[-1].read_text() if found else compiled.as_text()
  m = compiled.memory_analysis()
  mem = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
  phase.memory = mem
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if cost:
    phase.xla_flops = float(cost.get("flops", 0.0))
    phase.xla_bytes = float(cost.get("bytes accessed", 0.0))
  phase.cost = perf_model.program_cost(phase.hlo, unknown_trips, kernel_bytes=kernel_bytes,
                                       kernel_flops=kernel_flops)
  return phase


def resident(p: Programs, name: str) -> dict[str, int]:
  """What other phases keep in HBM while `name` runs, per chip, beyond the program's own
  arguments. The train state (float32 params, optimizer moments; the KL reference) lives all
  run. The sampler's weights and page pool live from the handover to the end of sampling: the
  rollout drops both before the updates (rl/rollout.py, sampling/driver.py), so they are not
  resident while training. With rollout.mode='disaggregated' the sampler's devices hold only
  the sampler's state (the staged weights replace the previous ones between rollouts)."""
  params, opt = bytes_per_chip(p.params), bytes_per_chip(p.opt_state)
  if name in ("prefill", "insert", "decode") and p.run.rollout.mode == "disaggregated":
    return _sampler_state(p, name)
  out = {"reference_params": params} if p.update_cfg.use_kl_loss else {}
  if name in ("old_log_prob", "handover"):
    out["opt_state"] = opt
  if name in ("prefill", "insert", "decode"):
    out.update(train_params=params, opt_state=opt)
  if name == "prefill":
    out["decode_state"] = bytes_per_chip(p.engine.abstract_decode_state())
  if name == "insert":
    out["sampler_params"] = bytes_per_chip(p.sampler_params)
  return out


def _sampler_state(p: Programs, name: str) -> dict[str, int]:
  """`resident` of a sampling phase: the page pool while prefilling, the weights while
  inserting (the programs' own arguments otherwise)."""
  if name == "prefill":
    return {"decode_state": bytes_per_chip(p.engine.abstract_decode_state())}
  return {"sampler_params": bytes_per_chip(p.sampler_params)} if name == "insert" else {}


def kv_bytes_per_chip(p: Programs, live_tokens: float) -> float:
  """The page pool's bytes per chip (as sharded) holding `live_tokens` tokens in every slot."""
  cache = p.engine.abstract_decode_state().cache
  pool = bytes_per_chip((cache.k, cache.v))
  capacity = p.engine.num_pages * p.engine.cfg.page
  return pool * p.engine.cfg.num_slots * live_tokens / capacity


def model_flops_per_token(mcfg, context: float, *, train: bool) -> float:
  """6N (train) or 2N (inference) over the matmul params, plus attention at `context` keys."""
  d, f, n, k, h, v, layers = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads,
                              mcfg.num_kv_heads, mcfg.head_dim, mcfg.vocab_size, mcfg.num_layers)
  matmul_params = layers * (d * (n + 2 * k) * h + n * h * d + 3 * d * f) + d * v
  attn = 4.0 * layers * n * h * context  # q.k and p.v, 2 FLOPs per MAC
  return (3.0 if train else 1.0) * (2.0 * matmul_params + attn)


# Matmuls per (q block, kv block, head) of each splash kernel (jax's splash_attention_kernel):
# forward q.k and p.v; dq recomputes q.k, then dO.v and dS.k; dkv recomputes q.k, then p.dO,
# dO.v and dS.q.
SPLASH_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}


def splash_kernel_flops(mcfg, mesh, rows: int, seq: int) -> dict[str, float]:
  """{splash kernel: FLOPs per call, per chip} for `rows` local rows of `seq` tokens.

  The kernel carries no cost estimate. It computes every block its static causal mask leaves
  live, nb (nb + 1) / 2 of nb = padded seq / block per head, whatever the segment ids mask
  inside them (packed rows' cross-sequence blocks included), for the heads local to a chip.
  """
  from fipo_jax import sharding as sharding_lib
  from fipo_jax.models import splash

  t = seq + (-seq) % 128
  block = splash._block(t, mcfg.attention_block_size)
  nb = t // block
  axes = sharding_lib.mesh_axes("kv_heads", mcfg.num_kv_heads, mesh)
  heads = mcfg.num_heads // math.prod(mesh.shape[a] for a in axes)
  per_matmul = 2.0 * rows * heads * nb * (nb + 1) / 2 * block * block * mcfg.head_dim
  return {k: m * per_matmul for k, m in SPLASH_MATMULS.items()}


def train_kernel_flops(p: Programs, batch) -> dict[str, float] | None:
  """splash_kernel_flops for one micro-batch of the train or log-prob step on `batch` (packed
  [micro, shards, rows, L], or padded [M, S] in update_cfg.num_micro_batches), else None."""
  if p.mcfg.attention_impl != "splash":
    return None
  ids = batch.input_ids
  local = ids.sharding.shard_shape(ids.shape)
  if ids.ndim == 4:
    return splash_kernel_flops(p.mcfg, p.mesh, local[1] * local[2], ids.shape[-1])
  rows = max(1, local[0] // p.update_cfg.num_micro_batches)
  return splash_kernel_flops(p.mcfg, p.mesh, rows, ids.shape[-1])
