"""A performance model read from compiled programs: FLOPs, HBM bytes, collective bytes, roofline.

Pure functions over the optimized HLO text of one compiled program (`compiled.as_text()`, the
per-chip program after SPMD partitioning) and a chip table. XLA's `cost_analysis()` counts the
body of a loop once; here every computation is weighted by how often it runs
(fipo_jax.perf_hlo.multipliers: loops at their trip counts, the costliest branch of a
conditional; a loop of unknown length, as decode's `generate` loop and the paged attention loop
over K/V blocks, takes the next entry of `unknown_trips`, outermost first). Per instruction:

  - HBM bytes per top-level instruction are its operands plus its result, as XLA's cost
    analysis counts a fusion: an operand the fusion only slices (dynamic-slice, slice, gather;
    also through bitcasts, reshapes, converts or a nested fusion) counts the slices, an in-place
    dynamic-update-slice or scatter counts the update. A custom call (a Pallas kernel) counts
    the bytes per call stated for it (program_cost's kernel_bytes), else its cost estimate when
    the backend config carries one, else its operands and results: never 0;
  - FLOPs are 2 x output x contracted size of every dot and convolution (fused or not), plus a
    custom call's stated FLOPs (kernel_flops) or cost estimate; Pallas calls with neither are
    listed (ProgramCost.flopless_kernels);
  - collective bytes by kind (all-gather: the gathered result; all-reduce, reduce-scatter,
    all-to-all, collective-permute: the operand).

Shapes: none (scalars and dicts). Times in seconds, bytes per chip.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

from fipo_jax.perf_hlo import ARRAY, Instr, dims, multipliers, parse_hlo, shape_bytes

# The chip table, roofline and RL step model, public here too.
from fipo_jax.perf_step import (  # noqa: F401
  CHIPS,
  VERL_SPLIT,
  Chip,
  GiB,
  RLStep,
  rl_step_seconds,
  roofline_seconds,
)

_NO_BYTES = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "call",
  "conditional",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "add-dependency",
  "domain",
  "copy-done",
  "async-start",
  "async-update",
  "async-done",
  "all-gather-done",
  "all-reduce-done",
  "collective-permute-done",
  "send-done",
  "recv-done",
}
_SLICERS = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}  # their operand 0 is updated in place
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _fusion_bytes(
  ins: Instr, body: list[Instr], shapes: dict[str, str], comps: dict[str, list[Instr]]
) -> float:
  """HBM bytes of one fusion: sliced operands count their slices, in-place updates theirs."""
  index_of = {i.name: int(i.args) for i in body if i.op == "parameter" and i.args.isdigit()}
  users: dict[str, list[Instr]] = {}
  for i in body:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  by_index = {v: k for k, v in index_of.items()}
  total = 0.0
  for n, operand in enumerate(ins.operands):
    full = shape_bytes(shapes.get(operand, ""))
    p = by_index.get(n)
    use = users.get(p, []) if p else []
    sliced = _sliced_bytes(p, body, comps) if p else None
    if sliced is not None:
      total += sliced
    elif use and all(u.op in _IN_PLACE and u.operands[0] == p for u in use):
      total += 0.0  # the buffer updated in place: only the update moves (counted below)
    else:
      total += full
  root = body[-1] if body else None
  roots = (
    [root]
    if root is not None and root.op != "tuple"
    else [i for i in body if root is not None and i.name in root.operands]
  )
  for r in roots:
    if r.op in _IN_PLACE:  # the update is read and written; a scatter reads its indices too
      update = r.operands[1] if r.op == "dynamic-update-slice" else r.operands[-1]
      total += 2 * shape_bytes(_shape_in(body, update))
    else:
      total += shape_bytes(r.shape)
  return total


_VIEWS = {"bitcast", "reshape", "convert", "copy"}  # same elements, maybe another dtype


def _sliced_bytes(name: str, body: list[Instr], comps: dict[str, list[Instr]]) -> float | None:
  """Bytes read of `name` (in its dtype) when every use only slices it, else None.

  Uses may reach the slice through element-preserving views (bitcast, reshape, convert, copy)
  or a nested fusion whose parameter is only sliced: how the TPU compiler fuses a layer scan's
  `stacked_weights[layer]` into the matmul that reads it.
  """
  use = [u for u in body if name in u.operands]
  if not use:
    return None
  total = 0.0
  for u in use:
    if u.op in _SLICERS and u.operands[0] == name and name not in u.operands[1:]:
      total += shape_bytes(u.shape)
      continue
    if u.op in _VIEWS:
      inner = _sliced_bytes(u.name, body, comps)
      ratio = shape_bytes(_shape_in(body, name)) / max(shape_bytes(u.shape), 1e-9)
    elif u.op == "fusion" and (callee := re.search(r"calls=%?([\w.\-]+)", u.attrs)):
      sub = comps.get(callee.group(1), [])
      params = {int(i.args): i.name for i in sub if i.op == "parameter" and i.args.isdigit()}
      parts = [
        _sliced_bytes(params[k], sub, comps) if k in params else None
        for k, o in enumerate(u.operands)
        if o == name
      ]
      inner, ratio = (None if None in parts else sum(parts)), 1.0
    else:
      return None
    if inner is None:
      return None
    total += inner * ratio
  return total


def _shape_in(body: list[Instr], name: str) -> str:
  return next((i.shape for i in body if i.name == name), "")


def _custom_call_estimate(ins: Instr) -> tuple[float, float] | None:
  """(flops, bytes) of a custom call whose backend config carries a cost estimate."""
  f = re.search(r'"flops"\s*:\s*"?(\d+)', ins.attrs)
  b = re.search(r'"bytes_accessed"\s*:\s*"?(\d+)', ins.attrs)
  return (float(f.group(1)), float(b.group(1))) if f and b else None


def _dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
  out = math.prod(dims(ins.shape))
  if ins.op == "dot":
    lhs = dims(shapes.get(ins.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
    return 2.0 * out * k
  lhs = dims(shapes.get(ins.operands[0], ""))
  rhs = dims(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
  m = re.search(r"dim_labels=(\w+)_(\w+)->", ins.attrs)
  if not (m and lhs and rhs):
    return 0.0
  # A convolution (how the TPU compiler writes many dots): each output sums over the kernel's
  # input features and, per spatial dim, the window positions that overlap the input (a window
  # over padding, as in a dot written as a convolution, adds no MACs).
  lhs_size = dict(zip(m.group(1), lhs, strict=False))
  k = 1
  for label, size in zip(m.group(2), rhs, strict=False):
    if label == "i":
      k *= size
    elif label != "o":
      k *= min(size, lhs_size.get(label, size))
  return 2.0 * out * k


@dataclasses.dataclass
class ProgramCost:
  """Per chip, per call of the program, loops counted by their trip counts."""

  flops: float
  hbm_bytes: float
  collective_bytes: dict[str, float]  # by kind (COLLECTIVES)
  all_gathers: list[tuple[str, float]]  # (result shape, bytes x times run) of each all-gather
  custom_calls: int  # custom calls counted (with or without a cost estimate)
  top: list = dataclasses.field(default_factory=list)  # (bytes, name, op, times), most first
  flopless_kernels: list = dataclasses.field(default_factory=list)  # Pallas calls, no FLOPs

  @property
  def total_collective_bytes(self) -> float:
    return sum(self.collective_bytes.values())


def program_cost(
  hlo_text: str,
  unknown_trips: Sequence[int] = (1,),
  *,
  top: int = 0,
  kernel_bytes: dict[str, float] | None = None,
  kernel_flops: dict[str, float] | None = None,
) -> ProgramCost:
  """The cost of one compiled program (its optimized HLO text); see the module docstring.

  top > 0: also keep the `top` instructions that move the most HBM bytes (ProgramCost.top).
  kernel_bytes: {key: HBM bytes per call} for custom calls whose name or attributes (target,
  metadata) contain the key: a kernel whose reads follow data its operands do not show (the
  paged attention kernel reads the live pages of one layer, not the whole pool) counted at a
  stated fill. Must be > 0; it wins over the call's own cost estimate.
  kernel_flops: {key: FLOPs per call}, likewise, for kernels that carry no cost estimate (splash
  attention); a Pallas call with neither is listed in ProgramCost.flopless_kernels.
  """
  for what, stated in (("kernel_bytes", kernel_bytes), ("kernel_flops", kernel_flops)):
    if any(b <= 0 for b in (stated or {}).values()):
      raise ValueError(f"{what} must be > 0: {stated}")
  comps, entry = parse_hlo(hlo_text)
  tally = functools.partial(_tally, comps, kernel_bytes=kernel_bytes, kernel_flops=kernel_flops)
  seen: dict[str, tuple[float, float]] = {}

  def costliest(_: Instr, branches: list[str]) -> str:
    for b in branches:  # a branch's own cost, its loops at their trips
      if b not in seen:
        c = tally(*multipliers(comps, b, unknown_trips, costliest))
        seen[b] = (c.hbm_bytes, c.flops)
    return max(branches, key=lambda b: seen[b])

  cost = tally(*multipliers(comps, entry, unknown_trips, costliest))
  cost.top = cost.top[:top]
  return cost


def _tally(
  comps: dict[str, list[Instr]],
  mult: dict[str, float],
  control: set[str],
  *,
  kernel_bytes: dict[str, float] | None,
  kernel_flops: dict[str, float] | None,
) -> ProgramCost:
  """The cost of the computations that run `mult` times (control ones move HBM bytes)."""
  flops = 0.0
  coll = dict.fromkeys(COLLECTIVES, 0.0)
  gathers: list[tuple[str, float]] = []
  moved: list[tuple[float, str, str, float]] = []  # (bytes x times, name, op, times)
  customs, flopless = 0, []
  for name, body in comps.items():
    times = mult.get(name, 0.0)
    if not times:
      continue
    shapes = {i.name: i.shape for i in body}
    for ins in body:
      if ins.op in ("dot", "convolution"):
        flops += times * _dot_flops(ins, shapes)
      if name not in control or ins.op in _NO_BYTES:
        continue
      kind = ins.op.removesuffix("-start")
      if kind in COLLECTIVES:
        operands = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
        leaves = [float(shape_bytes(f"{d}[{s}]")) for d, s in ARRAY.findall(ins.shape)]
        sent = max(leaves, default=0.0) if kind == "all-gather" else operands
        coll[kind] += times * sent
        if kind == "all-gather":
          gathers.append((ins.shape, times * sent))
      if ins.op == "custom-call":
        customs += 1
        f = _stated(ins, kernel_flops) or (_custom_call_estimate(ins) or (0.0, 0.0))[0]
        flops += times * f
        if not f and _PALLAS.search(ins.attrs):
          flopless.append(ins.name)
      b = _stated(ins, kernel_bytes) or _instr_bytes(ins, comps, shapes)
      moved.append((times * b, ins.name, ins.op, times))
  return ProgramCost(
    flops, sum(m[0] for m in moved), coll, gathers, customs, sorted(moved, reverse=True), flopless
  )


_PALLAS = re.compile(r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton)"')


def _stated(ins: Instr, per_call: dict[str, float] | None) -> float | None:
  """The stated cost per call of a custom call named by a key of `per_call`, else None."""
  if ins.op != "custom-call":
    return None
  stated = (per_call or {}).items()  # the call's own name first, then its attributes
  return next((b for key, b in stated if key in ins.name), None) or next(
    (b for key, b in stated if key in ins.attrs), None
  )


def _instr_bytes(ins: Instr, comps: dict[str, list[Instr]], shapes: dict[str, str]) -> float:
  """HBM bytes one top-level instruction moves (see the module docstring)."""
  operands = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
  if ins.op.removesuffix("-start") in COLLECTIVES:
    leaves = [float(shape_bytes(f"{d}[{s}]")) for d, s in ARRAY.findall(ins.shape)]
    return operands + max(leaves, default=0.0)
  if ins.op == "fusion":
    callee = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
    return _fusion_bytes(ins, comps.get(callee.group(1), []) if callee else [], shapes, comps)
  if ins.op == "custom-call":
    est = _custom_call_estimate(ins)
    return est[1] if est else operands + shape_bytes(ins.shape)
  if ins.op in _SLICERS:
    return 2 * shape_bytes(ins.shape)
  if ins.op in _IN_PLACE:
    update = ins.operands[1] if ins.op == "dynamic-update-slice" else ins.operands[-1]
    return 2 * shape_bytes(shapes.get(update, ""))
  return operands + shape_bytes(ins.shape)


_FLOATS = {"bf16", "f16", "f32", "f64"}


def weight_allgather_bytes(gathers: Sequence[tuple[str, float]], weight_shapes) -> float:
  """Bytes of the all-gathers whose result is a weight (whole, or one layer of a stacked one).

  weight_shapes: the unsharded shapes of the params; shapes compare with size-1 dims dropped.
  Only floating-point gathers count (not token ids or masks of a matching shape); any float
  dtype, as XLA:CPU gathers bf16 weights in float32.
  """
  squeeze = lambda s: tuple(d for d in s if d != 1)
  wanted = set()
  for s in weight_shapes:
    wanted.add(squeeze(s))
    wanted.add(squeeze(s[1:]))
  out = 0.0
  for shape, b in gathers:
    m = ARRAY.search(shape)
    if m and m.group(1) in _FLOATS and squeeze(tuple(dims(shape))) in wanted:
      out += b
  return out


def main(argv: Sequence[str]) -> None:
  """`python -m fipo_jax.perf_model HLO_DIR CHIP STEPS_PER_CALL BLOCKS [TOP]`: each phase's cost
  from the HLO `fipo_jax.aot --hlo_dir` saved (decode per step, its attention loop at BLOCKS),
  and with TOP the instructions that move the most bytes. Kernels without FLOPs are counted."""
  import pathlib  # noqa: PLC0415

  hlo_dir, chip = pathlib.Path(argv[0]), CHIPS[argv[1]]
  k, blocks, n_top = int(argv[2]), int(argv[3]), int(argv[4]) if len(argv) > 4 else 0
  for path in sorted(hlo_dir.glob("*.hlo.txt")):
    name = path.name.removesuffix(".hlo.txt")
    per = k if name == "decode" else 1
    c = program_cost(path.read_text(), (k, blocks) if name == "decode" else (1,), top=n_top)
    f, b, x = c.flops / per, c.hbm_bytes / per, c.total_collective_bytes / per
    print(
      f"{name:<13} flops {f:10.3e}  hbm {b / 1e9:10.3f} GB  collectives {x / 1e9:8.3f} GB  "
      f"roofline {roofline_seconds(f, b, x, chip) * 1e3:10.2f} ms  "
      f"kernels without FLOPs {len(c.flopless_kernels)}"
    )
    for moved, ins, op, times in c.top:
      print(f"  {moved / per / 1e9:12.3f} GB  {op:<14} {ins:<40} x{times / per:g}")


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
