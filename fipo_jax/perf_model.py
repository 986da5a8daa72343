"""A performance model read from compiled programs: FLOPs, HBM bytes, collective bytes, roofline.

Pure functions over the optimized HLO text of one compiled program (`compiled.as_text()`, the
per-chip program after SPMD partitioning) and a chip table. XLA's `cost_analysis()` counts the
body of a loop once; here every computation is weighted by how often it runs:

  - a while loop's body and condition run `known_trip_count` times (XLA:CPU's scans carry it;
    on TPU the condition `counter < constant` gives it); a loop without one (decode's
    `generate` loop, the paged attention loop over K/V blocks, whose trip count follows the
    live lengths) takes the next entry of `unknown_trips`, outermost first (decode: the steps
    of one call, then the blocks live at a stated fill);
  - HBM bytes per top-level instruction are its operands plus its result, as XLA's cost
    analysis counts a fusion: an operand the fusion only slices (dynamic-slice, slice, gather;
    also through bitcasts, reshapes, converts or a nested fusion) counts the slices, an in-place
    dynamic-update-slice or scatter counts the update. A custom call (a Pallas kernel) counts
    the bytes per call stated for it (program_cost's kernel_bytes), else its cost estimate when
    the backend config carries one, else its operands and results: never 0;
  - FLOPs are 2 x output x contracted size of every dot and convolution (fused or not);
  - collective bytes by kind (all-gather: the gathered result; all-reduce, reduce-scatter,
    all-to-all, collective-permute: the operand).

Shapes: none (scalars and dicts). Times in seconds, bytes per chip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int  # what the compiler lets one program use (its RESOURCE_EXHAUSTED limit)
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s out of one chip, all links


# HBM as libtpu reports it when a program does not fit (95.74G / 31.25G / 15.75G GiB); peaks,
# HBM and ICI bandwidth (4,800 / 3,584 / 1,600 Gbps per chip) from the Cloud TPU
# system-architecture pages.
CHIPS = {
  "v5p": Chip(int(95.74 * GiB), 459e12, 2765e9, 600e9),
  "v6e": Chip(int(31.25 * GiB), 918e12, 1640e9, 448e9),
  "v5e": Chip(int(15.75 * GiB), 197e12, 819e9, 200e9),
}

_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_NO_BYTES = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
             "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
             "add-dependency", "domain", "copy-done", "async-start", "async-update", "async-done",
             "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
             "recv-done"}
_SLICERS = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}  # their operand 0 is updated in place
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (arrays summed over a tuple; layouts ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _DTYPE_BYTES.get(dtype)
    if size is not None:
      total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # result shape string
  op: str
  operands: list[str]
  attrs: str
  args: str = ""  # the operand text as written (a parameter's number)


def _split_rhs(rhs: str) -> tuple[str, str, str, str]:
  """'SHAPE op(operands), attrs' -> (shape, op, operands, attrs)."""
  if rhs.startswith("("):  # a tuple shape: up to the matching parenthesis
    end = _closing(rhs, 0)
    shape, rest = rhs[: end + 1], rhs[end + 2:]
  else:
    shape, _, rest = rhs.partition(" ")
  op, _, rest = rest.partition("(")
  end = _closing(rest, 1)
  return shape, op.strip(), rest[:end], rest[end + 1:]


def _closing(text: str, depth: int) -> int:
  """Index of the parenthesis that closes at `depth` open ones before text (len if none)."""
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return i
  return len(text)


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: instructions}, the entry computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    head = _HEADER.match(line)
    if head:
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
      continue
    if current is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    if m:
      shape, op, operands, attrs = _split_rhs(m.group(2))
      comps[current].append(Instr(m.group(1), shape, op, re.findall(r"%([\w.\-]+)", operands),
                                  attrs, operands.strip()))
  return comps, entry


def _callees(ins: Instr) -> list[tuple[str, str]]:
  """(computation, edge kind) pairs an instruction calls."""
  out = []
  for key in ("body", "condition", "calls", "to_apply", "true_computation", "false_computation"):
    for name in re.findall(rf"\b{key}=%?([\w.\-]+)", ins.attrs):
      out.append((name, key))
  for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
    out += [(n, "branch") for n in re.findall(r"%?([\w.\-]+)", group)]
  return out


def multipliers(comps: dict[str, list[Instr]], entry: str, unknown_trips: Sequence[int] = (1,)
                ) -> tuple[dict[str, float], set[str]]:
  """({computation: times it runs per call of the program}, control computations).

  Control computations (entry, loop bodies and conditions, called and branch computations) hold
  the instructions that touch HBM; the others (fusion bodies, reducers) are inside one.
  """
  mult: dict[str, float] = {}
  control: set[str] = set()

  def visit(name: str, times: float, unknown_depth: int, is_control: bool) -> None:
    mult[name] = mult.get(name, 0.0) + times
    if is_control:
      control.add(name)
    for ins in comps.get(name, ()):
      trips, depth = 1.0, unknown_depth
      if ins.op == "while":
        known = _TRIP.search(ins.attrs)
        cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
        bound = _constant_bound(comps.get(cond.group(1), [])) if cond else None
        if known or bound:
          trips = float(known.group(1)) if known else float(bound)
        else:
          trips = float(unknown_trips[min(unknown_depth, len(unknown_trips) - 1)])
          depth += 1
      for callee, kind in _callees(ins):
        if callee not in comps:
          continue
        loop = kind in ("body", "condition")
        ctrl = is_control and (loop or kind in ("branch", "true_computation",
                                                "false_computation")
                               or (kind == "to_apply" and ins.op == "call")
                               or (kind == "calls" and ins.op.startswith("async")))
        visit(callee, times * (trips if loop else 1.0), depth if loop else unknown_depth, ctrl)

  visit(entry, 1.0, 0, True)
  return mult, control


def _constant_bound(cond: list[Instr]) -> int | None:
  """N of a loop condition `counter < N` with N a constant (a scan: counter from 0 by 1; TPU
  programs carry no known_trip_count), else None."""
  root = cond[-1] if cond else None
  if root is None or root.op != "compare" or "direction=LT" not in root.attrs:
    return None
  consts = {i.name: i.args for i in cond if i.op == "constant"}
  rhs = consts.get(root.operands[1]) if len(root.operands) == 2 else None
  return int(rhs) if rhs is not None and rhs.lstrip("-").isdigit() else None


def _fusion_bytes(ins: Instr, body: list[Instr], shapes: dict[str, str],
                  comps: dict[str, list[Instr]]) -> float:
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
  roots = [root] if root is not None and root.op != "tuple" else \
    [i for i in body if root is not None and i.name in root.operands]
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
      parts = [_sliced_bytes(params[k], sub, comps) if k in params else None
               for k, o in enumerate(u.operands) if o == name]
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
  out = math.prod(_dims(ins.shape))
  if ins.op == "dot":
    lhs = _dims(shapes.get(ins.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
    return 2.0 * out * k
  lhs = _dims(shapes.get(ins.operands[0], ""))
  rhs = _dims(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
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

  @property
  def total_collective_bytes(self) -> float:
    return sum(self.collective_bytes.values())


def program_cost(hlo_text: str, unknown_trips: Sequence[int] = (1,), *, top: int = 0,
                 kernel_bytes: dict[str, float] | None = None) -> ProgramCost:
  """The cost of one compiled program (its optimized HLO text); see the module docstring.

  top > 0: also keep the `top` instructions that move the most HBM bytes (ProgramCost.top).
  kernel_bytes: {key: HBM bytes per call} for custom calls whose name or attributes (target,
  metadata) contain the key: a kernel whose reads follow data its operands do not show (the
  paged attention kernel reads the live pages of one layer, not the whole pool) counted at a
  stated fill. Must be > 0; it wins over the call's own cost estimate.
  """
  if any(b <= 0 for b in (kernel_bytes or {}).values()):
    raise ValueError(f"kernel_bytes must be > 0: {kernel_bytes}")
  comps, entry = parse_hlo(hlo_text)
  mult, control = multipliers(comps, entry, unknown_trips)
  flops = 0.0
  coll = dict.fromkeys(COLLECTIVES, 0.0)
  gathers: list[tuple[str, float]] = []
  moved: list[tuple[float, str, str, float]] = []  # (bytes x times, name, op, times)
  customs = 0
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
        leaves = [float(shape_bytes(f"{d}[{s}]")) for d, s in _ARRAY.findall(ins.shape)]
        sent = max(leaves, default=0.0) if kind == "all-gather" else operands
        coll[kind] += times * sent
        if kind == "all-gather":
          gathers.append((ins.shape, times * sent))
      if ins.op == "custom-call":
        customs += 1
        est = _custom_call_estimate(ins)
        flops += times * est[0] if est else 0.0
      b = _kernel_bytes(ins, kernel_bytes) or _instr_bytes(ins, comps, shapes)
      moved.append((times * b, ins.name, ins.op, times))
  cost = ProgramCost(flops, sum(m[0] for m in moved), coll, gathers, customs)
  cost.top = sorted(moved, reverse=True)[:top]
  return cost


def _kernel_bytes(ins: Instr, kernel_bytes: dict[str, float] | None) -> float | None:
  """The stated bytes per call of a custom call named by a key of kernel_bytes, else None."""
  if ins.op != "custom-call":
    return None
  return next((b for key, b in (kernel_bytes or {}).items()
               if key in ins.name or key in ins.attrs), None)


def _instr_bytes(ins: Instr, comps: dict[str, list[Instr]], shapes: dict[str, str]) -> float:
  """HBM bytes one top-level instruction moves (see the module docstring)."""
  operands = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
  if ins.op.removesuffix("-start") in COLLECTIVES:
    leaves = [float(shape_bytes(f"{d}[{s}]")) for d, s in _ARRAY.findall(ins.shape)]
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


def roofline_seconds(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip
                     ) -> float:
  """The slowest of compute at peak, HBM at full bandwidth, collectives over all ICI links."""
  return max(flops / chip.bf16_flops, hbm_bytes / chip.hbm_bandwidth,
             collective_bytes / chip.ici_bandwidth)


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
    m = _ARRAY.search(shape)
    if m and m.group(1) in _FLOATS and squeeze(tuple(_dims(shape))) in wanted:
      out += b
  return out


# verl's measured share of an RL step (generate / old log-probs / update), DAPO-style runs.
VERL_SPLIT = {"generate": (0.41, 0.50), "old_log_prob": (0.12, 0.19), "update": (0.32, 0.38)}


@dataclasses.dataclass(frozen=True)
class RLStep:
  """The work of one RL step, in calls of each compiled program."""

  prompts: int  # rl.train_batch_size (dynamic sampling's extra rounds not counted)
  responses: int  # prompts x rl.n
  mean_prompt: int
  mean_response: int
  num_slots: int  # concurrent decode slots, all busy (the long tail not counted)
  prefill_rows: int  # prompts per prefill call
  insert_rows: int  # requests per insert call
  updates: int  # rl.num_mini_batches x rl.ppo_epochs train_step calls
  log_prob_passes: int  # rl.num_mini_batches x (1, or 2 with the KL term's reference pass)


def rl_step_seconds(step: RLStep, seconds: dict[str, float], chips: int) -> dict:
  """The predicted RL step from each program's roofline seconds per call.

  seconds: train_step, old_log_prob, handover, prefill, insert, and `decode` = one decode step
  of all slots at the mean fill. Returns the step's seconds, its split, tokens/s per chip.
  """
  decode_steps = math.ceil(step.responses * step.mean_response / step.num_slots)
  generate = (decode_steps * seconds["decode"] + seconds["handover"]
              + math.ceil(step.prompts / step.prefill_rows) * seconds["prefill"]
              + math.ceil(step.responses / step.insert_rows) * seconds["insert"])
  parts = {"generate": generate,
           "old_log_prob": step.log_prob_passes * seconds["old_log_prob"],
           "update": step.updates * seconds["train_step"]}
  total = sum(parts.values())
  tokens = step.responses * (step.mean_prompt + step.mean_response)
  return dict(rl_step_seconds=total, rl_step_seconds_by_phase=parts,
              rl_step_split={k: v / total for k, v in parts.items()},
              verl_split=VERL_SPLIT, decode_steps_per_rl_step=decode_steps,
              rl_tokens_per_s_per_chip=tokens / total / chips)


def main(argv: Sequence[str]) -> None:
  """`python -m fipo_jax.perf_model HLO_DIR CHIP STEPS_PER_CALL BLOCKS`: each phase's cost from
  the HLO `fipo_jax.aot --hlo_dir` saved (decode per step, its attention loop at BLOCKS)."""
  import pathlib  # noqa: PLC0415

  hlo_dir, chip = pathlib.Path(argv[0]), CHIPS[argv[1]]
  k, blocks = int(argv[2]), int(argv[3])
  for path in sorted(hlo_dir.glob("*.hlo.txt")):
    name = path.name.removesuffix(".hlo.txt")
    per = k if name == "decode" else 1
    c = program_cost(path.read_text(), (k, blocks) if name == "decode" else (1,))
    f, b, x = c.flops / per, c.hbm_bytes / per, c.total_collective_bytes / per
    print(f"{name:<13} flops {f:10.3e}  hbm {b / 1e9:10.3f} GB  collectives {x / 1e9:8.3f} GB  "
          f"roofline {roofline_seconds(f, b, x, chip) * 1e3:10.2f} ms")


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
