"""Optimized HLO text as data: computations, instructions, and how often each computation runs.

The parsing half of fipo_jax.perf_model (which holds the cost rules). Pure functions over
`compiled.as_text()`; shapes are HLO shape strings, sizes in bytes.

How often a computation runs (`multipliers`):
  - a while loop's body and condition run its trip count: XLA:CPU's `known_trip_count`, else the
    count of a loop `i = init; while i < bound: i += step` read from the condition, the loop's
    initial tuple and the body (how the TPU compiler writes scans, and its windowed einsums that
    step by 2); a loop of neither form takes the next entry of `unknown_trips`, outermost first;
  - a conditional runs one branch: the one `choose` picks (program_cost: the costliest), so a
    cheap skip branch is not added to the work branch;
  - called computations run once per call.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "s4": 0.5,
  "u4": 0.5,
}
ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BRANCHES = ("true_computation", "false_computation")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (arrays summed over a tuple; layouts ignored)."""
  total = 0.0
  for dtype, dims in ARRAY.findall(shape):
    size = _DTYPE_BYTES.get(dtype)
    if size is not None:
      total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def dims(shape: str) -> list[int]:
  """The dimensions of the first array in an HLO shape string."""
  m = ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # result shape string
  op: str
  operands: list[str]
  attrs: str
  args: str = ""  # the operand text as written (a parameter's number, a constant's value)


def _split_rhs(rhs: str) -> tuple[str, str, str, str]:
  """'SHAPE op(operands), attrs' -> (shape, op, operands, attrs)."""
  if rhs.startswith("("):  # a tuple shape: up to the matching parenthesis
    end = _closing(rhs, 0)
    shape, rest = rhs[: end + 1], rhs[end + 2 :]
  else:
    shape, _, rest = rhs.partition(" ")
  op, _, rest = rest.partition("(")
  end = _closing(rest, 1)
  return shape, op.strip(), rest[:end], rest[end + 1 :]


def _closing(text: str, depth: int) -> int:
  """Index of the parenthesis that closes at `depth` open ones before text (len if none)."""
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return i
  return len(text)


def _logical_lines(text: str) -> list[str]:
  """The text's lines with an instruction's continuation lines joined to it: a Pallas kernel's
  metadata string carries newlines, and its backend config (cost estimate) follows them."""
  out: list[str] = []
  for line in text.splitlines():
    starts = (
      not out
      or _HEADER.match(line)
      or _INSTR.match(line)
      or line.strip() in ("", "}")
      or line.startswith("HloModule")
    )
    if starts:
      out.append(line)
    else:
      out[-1] += line
  return out


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: instructions}, the entry computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in _logical_lines(text):
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
      comps[current].append(
        Instr(m.group(1), shape, op, re.findall(r"%([\w.\-]+)", operands), attrs, operands.strip())
      )
  return comps, entry


def callees(ins: Instr) -> list[tuple[str, str]]:
  """(computation, edge kind) pairs an instruction calls."""
  out = []
  for key in ("body", "condition", "calls", "to_apply") + _BRANCHES:
    for name in re.findall(rf"\b{key}=%?([\w.\-]+)", ins.attrs):
      out.append((name, key))
  for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
    out += [(n, "branch") for n in re.findall(r"%?([\w.\-]+)", group)]
  return out


Chooser = Callable[[Instr, list[str]], str]


def multipliers(
  comps: dict[str, list[Instr]],
  entry: str,
  unknown_trips: Sequence[int] = (1,),
  choose: Chooser | None = None,
) -> tuple[dict[str, float], set[str]]:
  """({computation: times it runs per call of the program}, control computations).

  Control computations (entry, loop bodies and conditions, called and branch computations) hold
  the instructions that touch HBM; the others (fusion bodies, reducers) are inside one.
  choose(conditional, branch names) -> the branch that runs (default: the first).
  """
  mult: dict[str, float] = {}
  control: set[str] = set()

  def visit(name: str, times: float, unknown_depth: int, is_control: bool) -> None:
    mult[name] = mult.get(name, 0.0) + times
    if is_control:
      control.add(name)
    body = comps.get(name, ())
    for ins in body:
      trips, depth = 1.0, unknown_depth
      if ins.op == "while":
        n = trip_count(ins, body, comps)
        if n is None:
          n = float(unknown_trips[min(unknown_depth, len(unknown_trips) - 1)])
          depth += 1
        trips = float(n)
      edges = callees(ins)
      branches = [c for c, kind in edges if kind in ("branch",) + _BRANCHES]
      if ins.op == "conditional" and branches:
        ran = (choose or (lambda _, names: names[0]))(ins, branches)
        edges = [(c, k) for c, k in edges if c not in branches or c == ran]
      for callee, kind in edges:
        if callee not in comps:
          continue
        loop = kind in ("body", "condition")
        ctrl = is_control and (
          loop
          or kind in ("branch",) + _BRANCHES
          or (kind == "to_apply" and ins.op == "call")
          or (kind == "calls" and ins.op.startswith("async"))
        )
        visit(callee, times * (trips if loop else 1.0), depth if loop else unknown_depth, ctrl)

  visit(entry, 1.0, 0, True)
  return mult, control


def trip_count(loop: Instr, parent: list[Instr], comps: dict[str, list[Instr]]) -> int | None:
  """Iterations of a while loop: its known_trip_count, else those of `i = init; while i < bound:
  i += step` when the condition, the initial tuple (in `parent`) and the body show all three as
  constants, else None (unknown)."""
  known = _TRIP.search(loop.attrs)
  if known:
    return int(known.group(1))
  cond_name = re.search(r"condition=%?([\w.\-]+)", loop.attrs)
  body_name = re.search(r"body=%?([\w.\-]+)", loop.attrs)
  cond = comps.get(cond_name.group(1), []) if cond_name else []
  body = comps.get(body_name.group(1), []) if body_name else []
  if not cond or not body or cond[-1].op != "compare" or len(cond[-1].operands) != 2:
    return None
  by_name = {i.name: i for i in cond}
  lhs, rhs = (by_name.get(o) for o in cond[-1].operands)
  if "direction=GT" in cond[-1].attrs:  # bound > i
    lhs, rhs = rhs, lhs
  elif "direction=LT" not in cond[-1].attrs:
    return None
  index = _tuple_index(lhs)
  bound = _constant(rhs, by_name)
  init_tuple = next((i for i in parent if loop.operands and i.name == loop.operands[0]), None)
  if index is None or bound is None or init_tuple is None or init_tuple.op != "tuple":
    return None
  init = _constant(_operand(init_tuple, index, parent), {i.name: i for i in parent})
  step = _step(body, index)
  if init is None or not step or step < 0:
    return None
  return max(0, math.ceil((bound - init) / step))


def _tuple_index(ins: Instr | None) -> int | None:
  """k of `get-tuple-element(param), index=k` (through copies and bitcasts is not followed)."""
  if ins is None or ins.op != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", ins.attrs)
  return int(m.group(1)) if m else None


def _operand(tup: Instr, k: int, comp: list[Instr]) -> Instr | None:
  name = tup.operands[k] if k < len(tup.operands) else None
  return next((i for i in comp if i.name == name), None)


def _constant(ins: Instr | None, by_name: dict[str, Instr]) -> int | None:
  """The integer value of a scalar constant, seen through copies and converts."""
  while ins is not None and ins.op in ("copy", "convert", "bitcast") and ins.operands:
    ins = by_name.get(ins.operands[0])
  if ins is None or ins.op != "constant" or not ins.args.lstrip("-").isdigit():
    return None
  return int(ins.args)


def _step(body: list[Instr], k: int) -> int | None:
  """c of a body whose root tuple's element k is `get-tuple-element(param, k) + c`."""
  by_name = {i.name: i for i in body}
  root = body[-1]
  if root.op != "tuple" or k >= len(root.operands):
    return None
  new = by_name.get(root.operands[k])
  while new is not None and new.op in ("copy", "bitcast") and new.operands:
    new = by_name.get(new.operands[0])
  if new is None or new.op != "add" or len(new.operands) != 2:
    return None
  a, b = (by_name.get(o) for o in new.operands)
  for counter, inc in ((a, b), (b, a)):
    src = counter
    while src is not None and src.op in ("copy", "bitcast") and src.operands:
      src = by_name.get(src.operands[0])
    if _tuple_index(src) == k:
      return _constant(inc, by_name)
  return None
