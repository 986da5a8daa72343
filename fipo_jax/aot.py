r"""Ahead-of-time proof that a recipe fits a TPU topology, compiled on any machine with libtpu.

  pip install -e ".[tpu]"   # libtpu from PyPI; no TPU needed
  python -m fipo_jax.aot --config configs/fipo_qwen2_5_32b.py --topology v5p-128

Builds the model abstractly (no allocation), lays it out on a mesh of the topology's devices with
the one rules table, and compiles for that TPU, without running:
  train_step  one mini-batch update (micro-batch gradient accumulation, remat, AdamW). With
              rl.use_remove_padding (every recipe) the packed step (fipo_jax.rl.packed_step):
              micro-batches of one row of rl.ppo_max_token_len_per_device tokens per chip (the
              memory is that of one row, whatever the lengths), as many as a mini-batch of
              sequences with the mean lengths below fills; otherwise the padded step
              (fipo_jax.rl.train_step), every sequence at the full P + T (the worst case);
  prefill     the sampler's prefill of sampling.num_slots prompts of data.max_prompt_length;
  decode      one decode step of all sampling.num_slots slots with a P + T cache.
and prints per-chip HBM (arguments, outputs, temporaries, total) against the chip's capacity and
FLOPs. The last line is one JSON object; the exit code is 1 if anything does not fit.

FLOPs per RL step: train_batch_size / ppo_mini_batch_size x ppo_epochs updates plus the
old-log-prob pass (and the reference pass with a KL term), for responses of
--mean_response_length tokens (the paper's ~8k) and prompts of --mean_prompt_length, beside the
same for the padded layout (traced for the count, not compiled).

FLOPs: XLA's cost_analysis() counts the body of a loop once (scan over layers, over
micro-batches), so `flops` is counted from the step's jaxpr with every scan multiplied by its
length (dot products; Pallas kernels through their cost estimate when they give one), divided by
the chips; `xla_flops` is cost_analysis() as reported. The estimate beside it is the usual 6N
(train; 2N inference) per token plus causal attention.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from fipo_jax import aot_batches

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config file", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128", "TPU slice name (see TOPOLOGIES)")
_STEPS = flags.DEFINE_list("steps", "train_step,prefill,decode", "which steps to compile")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "override L (compile-time-vs-depth check)")
_DECODE_SLOTS = flags.DEFINE_integer(
  "decode_slots", None, "decode: compile this many slots (a page pool sized to them) instead of "
  "sampling.num_slots")
_MEAN_RESPONSE = flags.DEFINE_integer(
  "mean_response_length", 8192, "mean response tokens for the packed train step's micro-batch "
  "count and FLOPs per RL step (the paper's ~8k)")
_MEAN_PROMPT = flags.DEFINE_integer(
  "mean_prompt_length", 256, "mean prompt tokens, chat template included (DAPO-Math: 100-200)")
_DECODE_MESH = flags.DEFINE_string(
  "decode_mesh", "auto", "sampler mesh 'data,fsdp,tensor' (-1 = the rest); 'auto' = the "
  "config's sampler_mesh if set, else tensor-parallel over min(8, K) chips, data-parallel over "
  "the rest; 'train' = the train mesh")

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int  # what the TPU compiler lets one program use (its RESOURCE_EXHAUSTED limit)
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


# HBM as libtpu 0.0.42 reports it when a program does not fit (95.74G / 31.25G / 15.75G GiB);
# peaks from the Cloud TPU system-architecture pages.
CHIPS = {
  "v5p": Chip(int(95.74 * GiB), 459e12, 2765e9),
  "v6e": Chip(int(31.25 * GiB), 918e12, 1640e9),
  "v5e": Chip(int(15.75 * GiB), 197e12, 819e9),
}

# Slice name (as `gcloud --accelerator-type`, v5e as v5e-N) -> (chip, libtpu topology string).
# v5p names count TensorCores (2 per chip): v5p-128 is 64 chips.
TOPOLOGIES = {
  "v5p-8": ("v5p", "v5p:2x2x1"),
  "v5p-32": ("v5p", "v5p:2x2x4"),
  "v5p-64": ("v5p", "v5p:2x4x4"),
  "v5p-128": ("v5p", "v5p:4x4x4"),
  "v6e-4": ("v6e", "v6e:2x2"),
  "v6e-256": ("v6e", "v6e:16x16"),
  "v5e-4": ("v5e", "v5e:2x2"),
  "v5e-256": ("v5e", "v5e:16x16"),
}

STEPS = ("train_step", "prefill", "decode")


def topology_devices(name: str):
  """The compile-only devices of a TPU slice (needs libtpu, no TPU)."""
  from jax.experimental import topologies

  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}")
  return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name][1]).devices


# ----------------------------------------------------------------------------- FLOP counting


def jaxpr_flops(jaxpr) -> tuple[float, int]:
  """(FLOPs of a (closed) jaxpr with scans multiplied by their length, uncounted kernels).

  Counts dot_general (2 * out size * contracted size) and Pallas kernels with a cost estimate;
  while loops count one iteration (decode compiles one step); cond counts its costliest branch.
  """
  import jax

  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total, uncounted = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_c, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_c)
      continue
    if name == "pallas_call":
      est = eqn.params.get("cost_estimate")
      if est is not None and getattr(est, "flops", None):
        total += float(est.flops)
      else:
        uncounted += 1
      continue
    subs = [v for v in eqn.params.values() if isinstance(v, jax.extend.core.ClosedJaxpr | tuple)]
    sub = [jaxpr_flops(j) for v in subs for j in (v if isinstance(v, tuple) else (v,))
           if hasattr(j, "eqns") or hasattr(j, "jaxpr")]
    if name == "cond":
      f, u = max(sub, default=(0.0, 0))
    else:
      f, u = sum(s[0] for s in sub), sum(s[1] for s in sub)
    if name == "scan":
      f *= eqn.params["length"]
    if name == "shard_map":  # the body sees one shard; FLOPs are summed over the mesh
      f *= eqn.params["mesh"].size
    for v in eqn.params.values():  # pjit, remat, custom_vjp carry a bare Jaxpr
      if isinstance(v, jax.extend.core.Jaxpr):
        f2, u2 = jaxpr_flops(v)
        f, u = f + f2, u + u2
    total, uncounted = total + f, uncounted + u
  return total, uncounted


def model_flops_per_token(mcfg, context: float, *, train: bool) -> float:
  """6N (train) or 2N (inference) over the matmul params, plus attention at `context` keys."""
  d, f, n, k, h, v, layers = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads,
                              mcfg.num_kv_heads, mcfg.head_dim, mcfg.vocab_size, mcfg.num_layers)
  matmul_params = layers * (d * (n + 2 * k) * h + n * h * d + 3 * d * f) + d * v
  attn = 4.0 * layers * n * h * context  # q.k and p.v, 2 FLOPs per MAC
  return (3.0 if train else 1.0) * (2.0 * matmul_params + attn)


# ----------------------------------------------------------------------------- the steps


@dataclasses.dataclass
class Result:
  name: str
  mesh: dict
  shapes: str
  tokens: int  # tokens processed by one call
  est_flops_per_token: float
  memory: dict | None = None  # per chip: argument/output/alias/temp/code/total bytes
  flops: float | None = None  # per chip, loops unrolled in the count
  xla_flops: float | None = None  # per chip, cost_analysis() (loop bodies once)
  uncounted_kernels: int = 0
  compile_seconds: float | None = None
  error: str | None = None
  rl_step_flops: dict | None = None  # train step only: FLOPs per RL step, packed and padded


def _sds(tree, shardings):
  import jax

  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _compile(traced, result: Result, chips: int) -> Result:
  """Lowers and compiles a jax.stages.Traced; fills memory, FLOPs and compile time."""
  flops, uncounted = jaxpr_flops(traced.jaxpr)
  result.flops, result.uncounted_kernels = flops / chips, uncounted
  start = time.perf_counter()
  try:
    compiled = traced.lower().compile()
  except Exception as e:  # noqa: BLE001 (the TPU compiler reports HBM overflow this way)
    result.compile_seconds = time.perf_counter() - start
    result.error = str(e).split("\n")[0][:500]
    return result
  result.compile_seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  mem = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
  result.memory = mem
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  result.xla_flops = float(cost.get("flops", 0.0)) if cost else None
  return result


def _train_inputs(run, mcfg, mesh):
  """(graphdef, params, param shardings, tx, opt_state, opt shardings) as the trainer has them."""
  import jax

  from fipo_jax import sharding
  from fipo_jax.models import build
  from fipo_jax.rl import optimizer

  tx, _ = optimizer.make_optimizer(run.optim, total_updates=run.total_updates)  # the trainer's
  graphdef, abs_params, param_sh = build.param_shardings(mcfg, mesh)
  params = _sds(abs_params, param_sh)
  # Adam's mu and nu take their param's sharding; scalars (the step count) are replicated.
  opt_sh = sharding.optimizer_shardings(tx, params, mesh)
  opt_state = _sds(jax.eval_shape(tx.init, params), opt_sh)
  return graphdef, params, param_sh, tx, opt_state, opt_sh


def rl_step_flops(run, mcfg, mesh, mean_prompt: int, mean_response: int) -> dict:
  """FLOPs of one RL step's model passes (all chips), packed and padded, traced not compiled.

  Updates: rl.num_mini_batches x ppo_epochs train steps; plus one old-log-prob pass per
  mini-batch (two with the KL term's reference pass). Returns {packed, padded, shape}.
  """
  from fipo_jax.rl import packed_step, setup
  from fipo_jax.rl import train_step as ts

  graphdef, params, param_sh, tx, opt_state, opt_sh = _train_inputs(run, mcfg, mesh)
  p, t = run.data.max_prompt_length, run.rl.max_response_length
  cfg = setup.update_config(run, mesh, p + t)
  shape = aot_batches.packed_shape(run, mesh, cfg, mean_prompt, mean_response)
  passes = 2 if cfg.use_kl_loss else 1
  out = {"shape": dataclasses.asdict(shape)}
  for name, lib, batch in (("packed", packed_step, aot_batches.packed_batch(run, mesh, shape, cfg)),
                           ("padded", ts, aot_batches.padded_batch(run, mesh, cfg))):
    steps = lib.jit_steps(graphdef, cfg=cfg, tx=tx, param_sharding=param_sh, opt_sharding=opt_sh)
    train = jaxpr_flops(steps.train.trace(params, opt_state, batch).jaxpr)[0]
    logp = jaxpr_flops(steps.log_prob.trace(params, batch).jaxpr)[0]
    out[name] = run.rl.num_mini_batches * (run.rl.ppo_epochs * train + passes * logp)
  return out


def train_step_result(run, mcfg, mesh, chips: int, mean_prompt: int = 256,
                      mean_response: int = 8192) -> Result:
  from fipo_jax.rl import packed_step, setup
  from fipo_jax.rl import train_step as ts

  p, t = run.data.max_prompt_length, run.rl.max_response_length
  seq = p + t
  rows = run.rl.ppo_mini_batch_size * run.rl.n  # M responses per optimizer step
  cfg = setup.update_config(run, mesh, seq)  # the trainer's micro-batching
  graphdef, params, param_sh, tx, opt_state, opt_sh = _train_inputs(run, mcfg, mesh)
  ref = " +reference params" if cfg.use_kl_loss else ""
  if run.rl.use_remove_padding:
    shape = aot_batches.packed_shape(run, mesh, cfg, mean_prompt, mean_response)
    batch, lib = aot_batches.packed_batch(run, mesh, shape, cfg), packed_step
    tokens = shape.num_micro * shape.num_shards * shape.rows * shape.row_len
    shapes = (f"packed M={rows} into {shape.num_micro} micro-batches x {shape.num_shards} x "
              f"{shape.rows} row of {shape.row_len} (mean P {mean_prompt} + T {mean_response}) "
              f"remat={mcfg.remat_policy}{ref}")
    context = min(mean_prompt + mean_response, shape.row_len) / 2
  else:
    micro = rows // cfg.num_micro_batches
    batch, lib, tokens = aot_batches.padded_batch(run, mesh, cfg), ts, rows * seq
    shapes = (f"M={rows} micro={micro}x{cfg.num_micro_batches} S={seq} (P={p} T={t}) "
              f"remat={mcfg.remat_policy}{ref}")
    context = seq / 2
  steps = lib.jit_steps(graphdef, cfg=cfg, tx=tx, param_sharding=param_sh, opt_sharding=opt_sh)
  res = Result("train_step", dict(mesh.shape), shapes, tokens,
               model_flops_per_token(mcfg, context, train=True))
  res = _compile(steps.train.trace(params, opt_state, batch), res, chips)
  if cfg.use_kl_loss and res.memory is not None:
    # The KL term's frozen reference (a copy of the params in their shardings) is no argument
    # of the step but stays resident in HBM beside it.
    res.memory["reference"] = bytes_per_chip(params)
    res.memory["total"] += res.memory["reference"]
  res.rl_step_flops = rl_step_flops(run, mcfg, mesh, mean_prompt, mean_response)
  res.rl_step_flops.update(mean_prompt=mean_prompt, mean_response=mean_response)
  return res


def bytes_per_chip(tree) -> int:
  """HBM one chip holds for a pytree of sharded ShapeDtypeStructs (or arrays): one shard each."""
  import jax

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _engine(run, mcfg, mesh, num_slots=None):
  """(Engine on `mesh`, sampler params as sharded ShapeDtypeStructs, sampling method); the paged
  pool is sized to `num_slots` (default sampling.num_slots) slots of the longest sequence."""
  import jax
  import jax.numpy as jnp

  from fipo_jax.models import build
  from fipo_jax.rl import setup
  from fipo_jax.sampling import engine as engine_lib

  ecfg = engine_lib.EngineConfig(
    num_slots=num_slots or run.sampling.num_slots, max_prompt_len=run.data.max_prompt_length,
    max_new_tokens=run.rl.max_response_length, steps_per_call=1)
  graphdef, abs_params, param_sh = build.param_shardings(mcfg, mesh)
  # The sampler holds weights in the compute dtype (the trainer's float32 master copy is cast
  # on handover), as vLLM does in the official run.
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(mcfg.dtype), sharding=s),
    abs_params, param_sh)
  sampling = setup.sampling_method(run.sampling.temperature, run.sampling.top_p,
                                   run.sampling.top_k)
  return engine_lib.Engine(mcfg, graphdef, ecfg, mesh=mesh), params, sampling


def prefill_result(run, mcfg, mesh, chips: int) -> Result:
  engine, params, sampling = _engine(run, mcfg, mesh)
  ecfg = engine.cfg
  bsz, plen = ecfg.batch_bucket(ecfg.num_slots), ecfg.max_prefill_len
  res = Result("prefill", dict(mesh.shape), f"Bp={bsz} P={plen}", bsz * plen,
               model_flops_per_token(mcfg, plen / 2, train=False))
  return _compile(engine.trace_prefill(params, sampling=sampling), res, chips)


def decode_result(run, mcfg, mesh, chips: int, num_slots=None) -> Result:
  engine, params, sampling = _engine(run, mcfg, mesh, num_slots)  # steps_per_call=1: one step
  ecfg = engine.cfg
  pool = f" {engine.num_pages}x{ecfg.page} pages" if engine.paged else ""
  shapes = f"slots={ecfg.num_slots} S={ecfg.cache_len}{pool} (1 step)"
  res = Result("decode", dict(mesh.shape), shapes,
               ecfg.num_slots, model_flops_per_token(mcfg, ecfg.cache_len, train=False))
  import jax

  with jax.set_mesh(mesh):  # Pallas TPU kernels (ragged paged attention) lower for its chips
    return _compile(engine.trace_generate(params, sampling=sampling), res, chips)


# ----------------------------------------------------------------------------- driver


def model_config(run, num_layers: int | None = None):
  """The trainer's ModelConfig, compiled for TPU: 'auto' attention is splash whatever this
  process's backend is."""
  from fipo_jax import policy

  mcfg = policy.model_config(run)
  impl = "splash" if mcfg.attention_impl == "auto" else mcfg.attention_impl
  if impl == "splash" and importlib.util.find_spec("fipo_jax.models.splash") is None:
    print("warning: fipo_jax.models.splash not found; compiling 'blockwise' attention",
          file=sys.stderr)
    impl = "blockwise"
  return mcfg.replace(attention_impl=impl, num_layers=num_layers or mcfg.num_layers)


def decode_mesh_sizes(spec: str, mcfg, train_sizes, chips: int, configured=None
                      ) -> tuple[int, int, int]:
  """The sampler mesh to compile prefill/decode on; `configured`: the config's sampler_mesh."""
  if spec == "train":
    return tuple(train_sizes)
  if spec == "auto" and configured is not None:  # what the trainer would run
    return tuple(configured)
  if spec == "auto":
    tensor = math.gcd(mcfg.num_kv_heads, 8, chips)
    return (chips // tensor, 1, tensor)
  sizes = tuple(int(s) for s in spec.split(","))
  if len(sizes) != 3:
    raise ValueError(f"--decode_mesh wants 'data,fsdp,tensor', got {spec!r}")
  return sizes


def _gib(b) -> str:
  return "-" if b is None else f"{b / GiB:7.2f}"


def report(results: list[Result], chip: Chip, chips: int, mcfg) -> None:
  print(f"{'step':<11} {'mesh (d,f,t)':<13} {'args':>7} {'out':>7} {'alias':>7} {'temp':>7} "
        f"{'total':>7} GiB/chip of {chip.hbm_bytes / GiB:.2f}  {'compile':>8}")
  for r in results:
    mesh = ",".join(str(r.mesh[a]) for a in ("data", "fsdp", "tensor"))
    m = r.memory or {}
    print(f"{r.name:<11} {mesh:<13} {_gib(m.get('argument'))} {_gib(m.get('output'))} "
          f"{_gib(m.get('alias'))} {_gib(m.get('temp'))} {_gib(m.get('total'))} "
          f"{'fits' if r.memory and m['total'] <= chip.hbm_bytes else 'DOES NOT FIT':<18}"
          f"{r.compile_seconds or 0:7.1f}s   {r.shapes}")
    if r.error:
      print(f"    error: {r.error}")
  print(f"\nFLOPs per step (per chip; counted from the jaxpr, loops unrolled) vs the estimate "
        f"(model {mcfg.num_layers} layers, {chips} chips, peak {chip.bf16_flops / 1e12:.0f} TF/s)")
  for r in results:
    if r.flops is None:
      continue
    per_tok = r.flops * chips / r.tokens
    note = f"  ({r.uncounted_kernels} Pallas kernels without a cost estimate)" \
      if r.uncounted_kernels else ""
    print(f"{r.name:<11} {r.flops:10.3e}  per token {per_tok:10.3e} vs 6N/2N+attn "
          f"{r.est_flops_per_token:10.3e} (x{per_tok / r.est_flops_per_token:.2f})  "
          f"xla cost_analysis {r.xla_flops or 0:10.3e}  at peak {r.flops / chip.bf16_flops:8.3f}s"
          f"{note}")
  for r in results:
    f = r.rl_step_flops
    if f:
      print(f"\nFLOPs per RL step, all chips, responses of {f['mean_response']} and prompts of "
            f"{f['mean_prompt']} tokens on average: packed {f['packed']:.3e}, padded "
            f"{f['padded']:.3e} ({f['padded'] / f['packed']:.2f}x); at peak on {chips} chips "
            f"{f['packed'] / (chips * chip.bf16_flops):.1f} s packed, "
            f"{f['padded'] / (chips * chip.bf16_flops):.1f} s padded")


def run_aot(config, topology: str, steps=STEPS, num_layers=None, decode_mesh="auto",
            mean_prompt: int = 256, mean_response: int = 8192, decode_slots=None) -> dict:
  """Compiles the recipe's steps for `topology`; returns the summary dict (the JSON line)."""
  import jax

  from fipo_jax import config as config_lib
  from fipo_jax import sharding

  if config.model.get("tokenizer_dir") is None and config.model.get("hf_dir") is None:
    config.model.tokenizer_dir = "(not read by aot)"  # validate() asks for one on verl data
  run = config_lib.validate(config, check_paths=False)
  devices = topology_devices(topology)  # raises on an unknown name
  chip = CHIPS[TOPOLOGIES[topology][0]]
  chips = len(devices)
  mcfg = model_config(run, num_layers)
  train_sizes = run.mesh.resolve(chips)
  train_mesh = sharding.make_mesh(*train_sizes, devices=devices)
  dec_sizes = decode_mesh_sizes(decode_mesh, mcfg, train_sizes, chips,
                               run.sampler_mesh.resolve(chips))
  dec_mesh = sharding.make_mesh(*dec_sizes, devices=devices)
  train = functools.partial(train_step_result, mean_prompt=mean_prompt,
                            mean_response=mean_response)
  builders = {"train_step": (train, train_mesh), "prefill": (prefill_result, dec_mesh),
              "decode": (functools.partial(decode_result, num_slots=decode_slots), dec_mesh)}
  results = []
  for name in steps:
    fn, mesh = builders[name]
    print(f"compiling {name} on {dict(mesh.shape)} ...", file=sys.stderr, flush=True)
    results.append(fn(run, mcfg, mesh, chips))
  report(results, chip, chips, mcfg)
  fits = all(r.memory is not None and r.memory["total"] <= chip.hbm_bytes for r in results)
  import importlib.metadata as md

  out = dict(topology=topology, chips=chips, hbm_per_chip_bytes=chip.hbm_bytes,
             libtpu_version=md.version("libtpu"), jax_version=jax.__version__,
             model=run.model.preset, num_layers=mcfg.num_layers)
  for r in results:
    out[r.name] = dict(total_bytes_per_chip=r.memory and r.memory["total"], flops=r.flops,
                       xla_flops=r.xla_flops, compile_seconds=r.compile_seconds,
                       mesh=r.mesh, shapes=r.shapes, error=r.error)
    if r.rl_step_flops:
      out[r.name]["rl_step_flops"] = r.rl_step_flops
  out["fits"] = fits
  return out


def main(argv) -> int:
  del argv
  # Compile-only: never open a TPU (none may be here) nor take libtpu's process lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax

  jax.config.update("jax_platforms", "cpu")
  steps = [s for s in _STEPS.value if s]
  unknown = set(steps) - set(STEPS)
  if unknown:
    raise app.UsageError(f"--steps: unknown {sorted(unknown)}; choose from {STEPS}")
  out = run_aot(_CONFIG.value, _TOPOLOGY.value, steps, _NUM_LAYERS.value, _DECODE_MESH.value,
                _MEAN_PROMPT.value, _MEAN_RESPONSE.value, _DECODE_SLOTS.value)
  print(json.dumps(out), flush=True)
  return 0 if out["fits"] else 1


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
