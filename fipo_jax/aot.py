r"""Ahead-of-time proof that a recipe fits a TPU topology, and what it would run at.

  pip install -e ".[tpu]"   # libtpu from PyPI; no TPU needed
  python -m fipo_jax.aot --config configs/fipo_qwen2_5_32b.py --topology v5p-128

Compiles the trainer's own programs for that TPU, without running: fipo_jax.aot_phases.build
makes them with the builders fipo_jax.rl.setup.build uses (the same meshes, dtypes, shardings and
jitted functions) and adds only abstract inputs. Phases (fipo_jax.aot_phases.PHASES):
  train_step    one mini-batch update on the packed layout (rl.use_remove_padding, every recipe)
                a mini-batch of sequences of the mean lengths fills, else on padded rows;
  old_log_prob  the old-log-prob pass over one mini-batch (also the reference pass with the KL
                term: the same program on the reference params);
  handover      the train params (float32, train mesh) -> the sampler's weights (rl.sampler_dtype,
                default the compute dtype, on the sampler mesh): one jitted reshard and cast;
  prefill       the sampler's prefill of sampling.num_slots prompts of data.max_prompt_length;
  insert        as many requests into the decode state;
  decode        one `generate` call (sampling.decode_steps_per_call steps of all slots), reported
                per decode step.
The sampler mesh is the trainer's: sampler_mesh when the recipe sets it, else the layout rule
(fipo_jax.sharding.sampler_mesh_sizes).

Per phase: HBM per chip as the run holds it (the program, plus what other phases keep resident:
fipo_jax.aot_phases.resident), and a performance model read from the optimized HLO
(fipo_jax.perf_model: FLOPs, HBM bytes and collective bytes with loops at their trip counts, the
roofline time on the chip). Derived at the paper's lengths (--mean_prompt_length 256,
--mean_response_length 8192, rl.n, the recipe's batch): decode tokens/s per chip, decode bytes per
step over the ideal (the sampler's weights plus the live KV, per chip) at half the response budget
live, weight all-gather bytes per decode step, the train step's MFU bound, the RL step's split and
seconds. It prints a table; the last line is one JSON object; the exit code is 1 if any phase
does not fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from fipo_jax import aot_phases, perf_model
from fipo_jax.aot_flops import jaxpr_flops, rl_step_flops  # noqa: F401 (public here)
from fipo_jax.aot_phases import PHASES, bytes_per_chip, model_flops_per_token  # noqa: F401

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config file", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128", "TPU slice name (see TOPOLOGIES)")
_STEPS = flags.DEFINE_list("steps", ",".join(PHASES), "which phases to compile")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "override L (compile-time-vs-depth check)")
_DECODE_SLOTS = flags.DEFINE_integer(
  "decode_slots", None, "compile the sampler with this many slots (a page pool sized to them) "
  "instead of sampling.num_slots (then not the trainer's sampler)")
_MEAN_RESPONSE = flags.DEFINE_integer(
  "mean_response_length", 8192, "mean response tokens (the paper's ~8k)")
_HLO_DIR = flags.DEFINE_string(
  "hlo_dir", None, "write each phase's optimized HLO here (<phase>.hlo.txt), for the perf model")
_MEAN_PROMPT = flags.DEFINE_integer(
  "mean_prompt_length", 256, "mean prompt tokens, chat template included (DAPO-Math: 100-200)")

GiB = 2**30
CHIPS = perf_model.CHIPS
Chip = perf_model.Chip

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
# Published anchors (output tokens/s per chip; RL tokens/s per GPU), beside the prediction.
ANCHORS = {"vllm_tpu_qwen3_32b_ironwood_1k_in_8k_out_tokens_per_s_per_chip": 3960,
           "nemo_rl_qwen3_32b_grpo_tokens_per_s_per_gpu": 665}


def topology_devices(name: str):
  """The compile-only devices of a TPU slice (needs libtpu, no TPU)."""
  from jax.experimental import topologies

  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}")
  return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name][1]).devices


def model_config(run, num_layers: int | None = None, platform: str = "tpu"):
  """The trainer's ModelConfig as it resolves on `platform` ('auto' attention: splash on TPU)."""
  from fipo_jax import policy

  mcfg = policy.model_config(run)
  impl = mcfg.attention_impl
  if impl == "auto":
    impl = "splash" if platform == "tpu" else "blockwise"
  return mcfg.replace(attention_impl=impl, num_layers=num_layers or mcfg.num_layers)


@contextlib.contextmanager
def as_platform(platform: str):
  """Traces as if `platform` were this process's backend: the code picks kernels by
  `jax.default_backend()` (splash runs the Pallas interpreter off TPU), and aot runs on the CPU
  backend while it compiles for a TPU."""
  import jax

  real = jax.default_backend
  jax.default_backend = lambda: platform
  try:
    yield
  finally:
    jax.default_backend = real


def phase_kernel(name: str, p: aot_phases.Programs) -> str:
  """The attention kernel phase `name` compiles with, from the one per-platform table
  (fipo_jax.models.kernels) as the TPU run would choose it."""
  from fipo_jax.models import kernels

  if name in ("train_step", "old_log_prob"):
    # Both layouts pass segment ids (padded rows: one segment per row).
    return kernels.train_kernel("tpu", p.mcfg.attention_impl, p.mcfg.dtype, packed=True)
  if name == "decode":
    return p.engine.layout.decode_kernel if p.engine.paged else "dense cache (XLA)"
  if name == "prefill":
    return kernels.train_kernel("tpu", p.mcfg.attention_impl, p.mcfg.dtype, packed=False)
  return "none"


def train_step_result(run, mcfg, mesh, chips: int, mean_prompt: int = 256,
                      mean_response: int = 8192) -> aot_phases.Phase:
  """The train step compiled on `mesh`'s devices; memory["reference"] is the KL term's frozen
  reference held beside it (counted in memory["total"])."""
  del chips
  p = aot_phases.build(run, mcfg, list(mesh.devices.flat))
  batch, shapes, tokens = aot_phases.train_batch(p, mean_prompt, mean_response)
  res = aot_phases.Phase("train_step", dict(mesh.shape), mcfg.param_dtype, mcfg.attention_impl,
                         shapes, tokens)
  res = aot_phases.compile_phase(res, aot_phases.traced(p, "train_step", batch))
  if p.update_cfg.use_kl_loss and res.memory is not None:
    res.memory["reference"] = bytes_per_chip(p.params)
    res.memory["total"] += res.memory["reference"]
  return res
def _gib(b) -> str:
  return "      -" if b is None else f"{b / GiB:7.2f}"


def compile_phases(p: aot_phases.Programs, names, chip: perf_model.Chip, mean_prompt: int,
                   mean_response: int, hlo_dir: str | None = None
                   ) -> dict[str, aot_phases.Phase]:
  """Compiles each phase; decode's costs are per decode step at the mean fill."""
  import jax
  import jax.numpy as jnp

  out = {}
  k = p.engine.cfg.steps_per_call
  for name in names:
    on_train = name in aot_phases.TRAIN_PHASES[:2]
    mesh = p.mesh if on_train else p.engine.mesh
    dtype = p.mcfg.param_dtype if on_train else jnp.dtype(p.engine.param_dtype).name
    ecfg = p.engine.cfg
    batch, tokens = None, 0
    if on_train:
      batch, shapes, tokens = aot_phases.train_batch(p, mean_prompt, mean_response)
    elif name == "decode":
      shapes = (f"slots={ecfg.num_slots} S={ecfg.cache_len} {p.engine.num_pages}x{ecfg.page} "
                f"pages ({k} steps per call)")
    elif name == "handover":
      shapes = f"{p.mcfg.param_dtype} {dict(p.mesh.shape)} -> {dtype}"
    else:
      shapes = f"{ecfg.batch_bucket(ecfg.num_slots)} x {ecfg.max_prefill_len}"
    print(f"compiling {name} on {dict(mesh.shape)} ...", file=sys.stderr, flush=True)
    phase = aot_phases.Phase(name, {a: int(mesh.shape[a]) for a in ("data", "fsdp", "tensor")},
                             dtype, phase_kernel(name, p), shapes, tokens)
    fill = _fill(p.run, mean_prompt, mean_response)
    trips = (k, _blocks(p, fill)) if name == "decode" else (1,)
    kernels = decode_kernel_bytes(p, fill) if name == "decode" else None
    flops = aot_phases.train_kernel_flops(p, batch) if on_train else None
    # Every per-platform choice (splash, kernels) takes its TPU path; decode lowers under its
    # mesh, since the Pallas TPU kernel's lowering reads the chip kind from the current mesh.
    with as_platform("tpu"), (jax.set_mesh(mesh) if name == "decode" else contextlib.nullcontext()):
      traced = aot_phases.traced(p, name, batch)
      out[name] = aot_phases.compile_phase(phase, traced, trips, kernels, flops)
    out[name].resident = aot_phases.resident(p, name)
    if hlo_dir and out[name].hlo:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(out[name].hlo)
  return out


def _fill(run, mean_prompt: int, mean_response: float) -> float:
  """Tokens live in a slot halfway through a response of `mean_response` tokens (clipped to
  the recipe's lengths): the mean fill over its decode steps."""
  return (min(mean_prompt, run.data.max_prompt_length)
          + min(mean_response, run.rl.max_response_length) / 2)


def _blocks(p: aot_phases.Programs, live_tokens: float) -> int:
  """Trips of the paged attention loop over K/V blocks with `live_tokens` in a slot."""
  return math.ceil(live_tokens / p.engine.cfg.decode_block)


def decode_kernel_bytes(p: aot_phases.Programs, live_tokens: float) -> dict[str, float] | None:
  """{kernel: HBM bytes per call} for program_cost: the TPU ragged paged attention kernel reads
  the live K/V of one layer (`live_tokens` in every slot) plus its q and writes its out, per
  chip; its operands are the whole pool of every layer. None for the other decode kernels."""
  if not (p.engine.paged and p.engine.layout.decode_kernel == "ragged_paged_attention"):
    return None
  m = p.engine.model_cfg
  kv = aot_phases.kv_bytes_per_chip(p, live_tokens) / m.num_layers
  shape = p.engine.mesh.shape
  slots = math.ceil(p.engine.cfg.num_slots / (shape.get("data", 1) * shape.get("fsdp", 1)))
  q = slots * math.ceil(m.num_heads / shape.get("tensor", 1)) * m.head_dim \
    * p.engine.param_dtype.itemsize  # slots over (data, fsdp), heads over tensor
  return {"ragged_paged_attention": kv + 2 * q}


def _phase_numbers(ph: aot_phases.Phase, chip: perf_model.Chip, per: int = 1) -> dict:
  c = ph.cost
  flops, hbm = (c.flops / per, c.hbm_bytes / per) if c else (None, None)
  coll = {k: v / per for k, v in c.collective_bytes.items()} if c else {}
  return dict(
    total_bytes_per_chip=ph.total_bytes, program_bytes_per_chip=ph.memory and ph.memory["total"],
    resident_bytes_per_chip=ph.resident, hbm_bytes=hbm, collective_bytes=sum(coll.values()),
    collective_bytes_by_kind=coll, flops=flops, xla_flops=ph.xla_flops,
    kernels_without_flops=c and len(c.flopless_kernels),
    xla_bytes_accessed=ph.xla_bytes, roofline_seconds=c and perf_model.roofline_seconds(
      flops, hbm, sum(coll.values()), chip),
    mesh=ph.mesh, param_dtype=ph.param_dtype, kernel=ph.kernel, shapes=ph.shapes,
    compile_seconds=ph.compile_seconds, error=ph.error)


def derive(p: aot_phases.Programs, phases, out: dict, chip, chips: int, mean_prompt: int,
           mean_response: int) -> dict:
  """The perf_model object: decode figures, MFU bound, the RL step's split and seconds."""
  import jax

  run, eng = p.run, p.engine
  k = eng.cfg.steps_per_call
  model: dict = dict(mean_prompt=mean_prompt, mean_response=mean_response, anchors=ANCHORS)
  if "decode" in phases and phases["decode"].cost:
    dec, slots = phases["decode"], eng.cfg.num_slots
    step_s = out["decode"]["roofline_seconds"]
    half = _fill(run, mean_prompt, run.rl.max_response_length)
    at_half = perf_model.program_cost(dec.hlo, (k, _blocks(p, half)),
                                      kernel_bytes=decode_kernel_bytes(p, half))
    ideal = bytes_per_chip(p.sampler_params) + aot_phases.kv_bytes_per_chip(p, half)
    weights = [x.shape for x in jax.tree.leaves(p.params)]
    model.update(
      decode_fill_tokens=_fill(run, mean_prompt, mean_response), decode_step_seconds=step_s,
      decode_tokens_per_s_per_chip=slots / step_s / chips,
      decode_half_budget_fill_tokens=half, decode_bytes_per_step=at_half.hbm_bytes / k,
      decode_ideal_bytes_per_step=ideal, decode_bytes_over_ideal=at_half.hbm_bytes / k / ideal,
      decode_collective_bytes_per_step=at_half.total_collective_bytes / k,
      decode_weight_allgather_bytes=perf_model.weight_allgather_bytes(at_half.all_gathers,
                                                                      weights) / k)
  if "train_step" in out and out["train_step"]["roofline_seconds"]:
    ts_ = phases["train_step"]
    ctx = (min(mean_prompt, run.data.max_prompt_length) + mean_response) / 2
    # Model FLOPs (6N + causal attention at the mean context; no remat, no masked blocks) over
    # peak x the roofline time, the slowest of compute (kernels' FLOPs included), HBM and ICI.
    useful = ts_.tokens * model_flops_per_token(p.mcfg, ctx, train=True)
    model["train_mfu_bound"] = useful / (chips * chip.bf16_flops
                                         * out["train_step"]["roofline_seconds"])
  if all(n in out and out[n]["roofline_seconds"] for n in PHASES):
    rows = eng.cfg.batch_bucket(eng.cfg.num_slots)
    step = perf_model.RLStep(
      prompts=run.rl.train_batch_size, responses=run.rl.train_batch_size * run.rl.n,
      mean_prompt=mean_prompt, mean_response=mean_response, num_slots=eng.cfg.num_slots,
      prefill_rows=rows, insert_rows=rows, updates=run.rl.num_mini_batches * run.rl.ppo_epochs,
      log_prob_passes=run.rl.num_mini_batches * (2 if p.update_cfg.use_kl_loss else 1))
    seconds = {n: out[n]["roofline_seconds"] for n in PHASES}
    model.update(perf_model.rl_step_seconds(step, seconds, chips))
  return model


def report(out: dict, chip: perf_model.Chip) -> None:
  print(f"{'phase':<13}{'mesh d,f,t':<11}{'dtype':<9}{'program':>8}{'resident':>9}{'total':>8}"
        f"  GiB/chip of {chip.hbm_bytes / GiB:.2f}  {'HBM GB':>8}{'coll GB':>8}{'TFLOP':>8}"
        f"{'roofline':>10}{'compile':>8}  kernel; shapes")
  for name in PHASES:
    r = out.get(name)
    if r is None:
      continue
    mesh = ",".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    res = sum(r["resident_bytes_per_chip"].values())
    fits = r["total_bytes_per_chip"] is not None and r["total_bytes_per_chip"] <= chip.hbm_bytes
    num = lambda x, scale: "       -" if x is None else f"{x / scale:8.2f}"
    print(f"{name:<13}{mesh:<11}{r['param_dtype']:<9}{_gib(r['program_bytes_per_chip']):>8}"
          f"{_gib(res):>9}{_gib(r['total_bytes_per_chip']):>8}  "
          f"{'fits' if fits else 'DOES NOT FIT':<18}{num(r['hbm_bytes'], 1e9)}"
          f"{num(r['collective_bytes'], 1e9)}{num(r['flops'], 1e12)}"
          f"{num(r['roofline_seconds'], 1e-3)}ms{r['compile_seconds'] or 0:7.1f}s  "
          f"{r['kernel']}; {r['shapes']}")
    if r["error"]:
      print(f"    error: {r['error']}")
  m = out["perf_model"]
  print("\nperformance model (per chip; decode per step; roofline on "
        f"{chip.bf16_flops / 1e12:.0f} TF/s, {chip.hbm_bandwidth / 1e9:.0f} GB/s HBM, "
        f"{chip.ici_bandwidth / 1e9:.0f} GB/s ICI):")
  for key, v in m.items():
    if key not in ("anchors", "verl_split"):
      print(f"  {key}: {json.dumps(v) if isinstance(v, dict) else v}")
  print(f"  verl measured split: {m.get('verl_split')}; anchors: {ANCHORS}")


def run_aot(config, topology: str, steps=PHASES, num_layers=None, mean_prompt: int = 256,
            mean_response: int = 8192, decode_slots=None, hlo_dir: str | None = None) -> dict:
  """Compiles the recipe's phases for `topology`; returns the summary dict (the JSON line)."""
  import importlib.metadata as md

  import jax

  from fipo_jax import config as config_lib

  if config.model.get("tokenizer_dir") is None and config.model.get("hf_dir") is None:
    config.model.tokenizer_dir = "(not read by aot)"  # validate() asks for one on verl data
  run = config_lib.validate(config, check_paths=False)
  devices = topology_devices(topology)  # raises on an unknown name
  chip, chips = CHIPS[TOPOLOGIES[topology][0]], len(devices)
  mcfg = model_config(run, num_layers)
  p = aot_phases.build(run, mcfg, devices, num_slots=decode_slots)
  phases = compile_phases(p, steps, chip, mean_prompt, mean_response, hlo_dir)
  out = dict(topology=topology, chips=chips, hbm_per_chip_bytes=chip.hbm_bytes,
             libtpu_version=md.version("libtpu"), jax_version=jax.__version__,
             model=run.model.preset, num_layers=mcfg.num_layers)
  for name, ph in phases.items():
    out[name] = _phase_numbers(ph, chip, p.engine.cfg.steps_per_call if name == "decode" else 1)
  out["perf_model"] = derive(p, phases, out, chip, chips, mean_prompt, mean_response)
  report(out, chip)
  out["fits"] = all(out[n]["total_bytes_per_chip"] is not None
                    and out[n]["total_bytes_per_chip"] <= chip.hbm_bytes for n in phases)
  return out


def main(argv) -> int:
  del argv
  # Compile-only: never open a TPU (none may be here) nor take libtpu's process lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax

  jax.config.update("jax_platforms", "cpu")
  steps = [s for s in _STEPS.value if s]
  unknown = set(steps) - set(PHASES)
  if unknown:
    raise app.UsageError(f"--steps: unknown {sorted(unknown)}; choose from {PHASES}")
  out = run_aot(_CONFIG.value, _TOPOLOGY.value, steps, _NUM_LAYERS.value, _MEAN_PROMPT.value,
                _MEAN_RESPONSE.value, _DECODE_SLOTS.value, _HLO_DIR.value)
  print(json.dumps(out), flush=True)
  return 0 if out["fits"] else 1


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
