"""Host-side packing of variable-length sequences into rows of a token budget (pure numpy).

The trainer's model passes run on a packed layout (docs/fipo_spec.md §2.9, "remove padding"):
the real tokens of several sequences (prompt + response, no padding) sit end to end in rows of
`row_len` tokens, each with a segment id (1, 2, ... within its row; 0 = padding) and its own
position. The loss keeps the response layout: per-token log-probs are gathered back to one
slot [T] per sequence, so future-KL, the clip modes, sequence drop and aggregation see exactly
what the padded layout gives them.

One mini-batch of M sequences becomes, for W batch shards (devices along the batch axes):

  tokens   [NM, W, R, S]  NM micro-batches, R rows per shard, S = row_len tokens per row
  response [NM, W, E, T]  E sequence slots per shard, T = max response length

Micro-batch membership:
  - fixed (`num_micro` given, verl without dynamic batch size): micro-batch j holds rows
    j, j + NM, j + 2 NM, ... of the mini-batch, exactly verl's micro-batch split,
    and slot i of it goes to shard i // ceil(M / NM / W), where the padded layout puts it;
    each (micro-batch, shard) packs its sequences first-fit decreasing into R rows.
  - dynamic (verl's use_dynamic_bsz): all M sequences are packed first-fit decreasing into rows
    of S tokens (a budget of real tokens per device per micro-batch, as verl's
    ppo_max_token_len_per_gpu); row b goes to micro-batch b // W, shard b % W (R = 1).

  - padded (`plan_padded`, rl.use_remove_padding=False): one sequence per row of P + T tokens,
    the prompt left-padded, the response right-padded (E = R); micro-batches as in fixed mode.

Shapes are static: NM (dynamic mode), R and E are rounded up to `bucket` sizes, so a new length
mix reuses a compiled step. Padding micro-batches hold no sequence; the train step skips them.
`pack_rollouts` packs a rollout batch on a `Layout` (rl/layouts.py: a run's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Bucket sizes: powers of two and 1.5x powers of two (1, 2, 3, 4, 6, 8, 12, ...), so rounding
# up wastes at most a third.
DEFAULT_BUCKETS = tuple(sorted({b << k for k in range(24) for b in (2, 3)} | {1}))


def bucket(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket size >= n (n itself past the largest bucket)."""
  for b in buckets:
    if b >= n:
      return int(b)
  return int(n)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins of item indices, each bin's lengths summing to <= capacity (first fit, longest first).

  Ties keep index order, so the result is deterministic; every index appears exactly once.
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and lengths.max() > capacity:
    raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds the row budget {capacity}")
  bins: list[list[int]] = []
  free: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    for b, room in enumerate(free):
      if room >= n:
        bins[b].append(int(i))
        free[b] -= n
        break
    else:
      bins.append([int(i)])
      free.append(capacity - n)
  return bins


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where each of the M sequences of one mini-batch goes (all arrays int64[M])."""

  micro: np.ndarray  # micro-batch
  shard: np.ndarray  # batch shard
  row: np.ndarray  # row within (micro-batch, shard)
  offset: np.ndarray  # first token within the row
  slot: np.ndarray  # response slot within (micro-batch, shard)
  lengths: np.ndarray  # tokens (prompt + response)
  num_micro: int  # micro-batches holding sequences
  rows: int  # most rows any (micro-batch, shard) needs
  slots: int  # most sequences any (micro-batch, shard) holds
  num_shards: int
  row_len: int


@dataclasses.dataclass(frozen=True)
class Shape:
  """Static packed layout of a mini-batch: [num_micro, num_shards, rows | slots, ...]."""

  num_micro: int
  num_shards: int
  rows: int
  slots: int
  row_len: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """The packer's settings for a run's mini-batches (`layouts.for_run` builds a run's).

  padded: one sequence per row of row_len = P + T tokens (rl.use_remove_padding=False), the
  fixed micro-batches of `num_micro`; else packed rows of row_len tokens, num_micro None for
  token-budget micro-batches (verl's use_dynamic_bsz).
  """

  row_len: int
  num_micro: int | None
  num_shards: int
  padded: bool = False

  def __post_init__(self):
    if self.padded and self.num_micro is None:
      raise ValueError("the padded layout has fixed micro-batches (num_micro)")


def _place(
  groups: list[tuple[int, int, list[int]]], lengths: np.ndarray, row_len: int, num_shards: int
) -> Plan:
  """Plan from (micro-batch, shard, row) bins, each a list of sequence indices.

  Slots within a (micro-batch, shard) follow sequence order, so in fixed mode the response
  layout of a micro-batch is the padded path's micro-batch, row for row.
  """
  m = len(lengths)
  out = {k: np.full(m, -1, np.int64) for k in ("micro", "shard", "row", "offset", "slot")}
  rows: dict[tuple[int, int], int] = {}
  for micro, shard, row_items in groups:
    r = rows.get((micro, shard), 0)
    rows[(micro, shard)] = r + 1
    starts = np.cumsum([0] + [int(lengths[i]) for i in row_items])
    for i, start in zip(row_items, starts, strict=False):
      out["micro"][i], out["shard"][i], out["row"][i], out["offset"][i] = micro, shard, r, start
  if (out["micro"] < 0).any():
    raise AssertionError("a sequence was not placed")
  slots = 1
  for key in rows:
    members = np.flatnonzero((out["micro"] == key[0]) & (out["shard"] == key[1]))
    out["slot"][members] = np.arange(len(members))  # np.flatnonzero is in sequence order
    slots = max(slots, len(members))
  return Plan(
    **out,
    lengths=lengths,
    num_micro=1 + max((k[0] for k in rows), default=0),
    rows=max(rows.values(), default=1),
    slots=slots,
    num_shards=num_shards,
    row_len=row_len,
  )


def plan_mini_batch(
  lengths: Sequence[int], *, num_shards: int, row_len: int, num_micro: int | None = None
) -> Plan:
  """Assigns M sequences of `lengths` tokens to micro-batches, shards, rows and slots.

  num_micro=None packs by token budget (dynamic); otherwise micro-batch j is rows j::num_micro
  of the mini-batch (the padded path's micro-batches), see the module docstring.
  """
  lengths = np.asarray(lengths, np.int64)
  m = len(lengths)
  if num_micro is None:
    bins = first_fit_decreasing(lengths, row_len)
    # Fullest rows first (FFD order): the last micro-batch takes the leftovers.
    groups = [(b // num_shards, b % num_shards, sorted(items)) for b, items in enumerate(bins)]
    return _place(groups, lengths, row_len, num_shards)
  if m % num_micro:
    raise ValueError(f"{m} sequences do not split into {num_micro} equal micro-batches")
  groups = []
  per_shard = -(-(m // num_micro) // num_shards)
  for j in range(num_micro):
    members = np.arange(j, m, num_micro)
    for d in range(num_shards):
      mine = members[d * per_shard : (d + 1) * per_shard]
      for items in first_fit_decreasing(lengths[mine], row_len):
        groups.append((j, d, sorted(int(mine[i]) for i in items)))
  plan = _place(groups, lengths, row_len, num_shards)
  return dataclasses.replace(plan, num_micro=num_micro)


def plan_padded(
  prompt_lengths: Sequence[int],
  response_lengths: Sequence[int],
  *,
  num_shards: int,
  num_micro: int,
  max_prompt_length: int,
  row_len: int,
) -> Plan:
  """The padded layout as a plan: one sequence per row (of row_len = P + T), its prompt ending at
  P (left padding) and its response starting there (right padding).

  Micro-batch j is sequences j, j + NM, ... (verl's split); slot (= row) i of it goes to shard
  i // ceil(M / NM / W), so every shard holds a contiguous share, as the fixed mode above.
  """
  prompt_lengths = np.asarray(prompt_lengths, np.int64)
  lengths = prompt_lengths + np.asarray(response_lengths, np.int64)
  m = len(prompt_lengths)
  if m and (max_prompt_length + lengths - prompt_lengths).max() > row_len:
    raise ValueError(f"a padded row of {row_len} tokens cannot hold P + a response")
  if m % num_micro:
    raise ValueError(f"{m} sequences do not split into {num_micro} equal micro-batches")
  per_shard = -(-(m // num_micro) // num_shards)
  k = np.arange(m) // num_micro  # position within the micro-batch
  return Plan(
    micro=np.arange(m) % num_micro,
    shard=k // per_shard,
    row=k % per_shard,
    offset=max_prompt_length - prompt_lengths,
    slot=k % per_shard,
    lengths=lengths,
    num_micro=num_micro,
    rows=per_shard,
    slots=per_shard,
    num_shards=num_shards,
    row_len=row_len,
  )


def layout_shape(
  plans: Sequence[Plan], *, dynamic: bool, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> Shape:
  """One static shape for several mini-batches' plans: maxima rounded up to buckets.

  The number of micro-batches is bucketed only in dynamic mode (fixed mode has exactly the
  configured number).
  """
  first = plans[0]
  nm = max(p.num_micro for p in plans)
  return Shape(
    num_micro=bucket(nm, buckets) if dynamic else nm,
    num_shards=first.num_shards,
    rows=bucket(max(p.rows for p in plans), buckets),
    slots=bucket(max(p.slots for p in plans), buckets),
    row_len=first.row_len,
  )


def pack_tokens(
  plan: Plan,
  shape: Shape,
  prompts: Sequence[np.ndarray],
  responses: Sequence[np.ndarray],
  *,
  response_len: int,
  pad_id: int,
  shards: slice | None = None,
) -> dict[str, np.ndarray]:
  """The packed token arrays of shards `shards` (default all) of one mini-batch.

  prompts/responses: the M sequences' ids, already truncated to the allowed lengths
  (responses to at most response_len = T). Returns input_ids / segment_ids / positions
  int32[NM, W', R, S] and token_index int32[NM, W', E, T], W' = the selected shards:
  token_index[j, w, e, t] is the index, in shard w's flattened [R * S] next-token log-probs,
  of response token t of the sequence in slot e (0 where there is none).
  """
  lo, hi, _ = (shards or slice(0, shape.num_shards)).indices(shape.num_shards)
  nm, nd, rows, length = shape.num_micro, hi - lo, shape.rows, shape.row_len
  ids = np.full((nm, nd, rows, length), pad_id, np.int32)
  seg = np.zeros((nm, nd, rows, length), np.int32)
  pos = np.zeros((nm, nd, rows, length), np.int32)
  index = np.zeros((nm, nd, shape.slots, response_len), np.int32)
  seg_in_row: dict[tuple[int, int, int], int] = {}
  for i in np.argsort(plan.offset, kind="stable"):  # segments numbered left to right
    d = int(plan.shard[i]) - lo
    if not 0 <= d < nd:
      continue
    j, r, o = int(plan.micro[i]), int(plan.row[i]), int(plan.offset[i])
    p, resp = np.asarray(prompts[i], np.int32), np.asarray(responses[i], np.int32)
    n = len(p) + len(resp)
    if n != plan.lengths[i] or len(resp) > response_len:
      raise ValueError(
        f"sequence {i}: {len(p)} + {len(resp)} tokens, planned "
        f"{plan.lengths[i]} with responses <= {response_len}"
      )
    key = (j, d, r)
    seg_in_row[key] = seg_in_row.get(key, 0) + 1
    ids[j, d, r, o : o + n] = np.concatenate([p, resp])
    seg[j, d, r, o : o + n] = seg_in_row[key]
    pos[j, d, r, o : o + n] = np.arange(n)
    # Response token t is predicted from the token before it: packed position o + len(p) + t - 1.
    index[j, d, plan.slot[i], : len(resp)] = r * length + o + len(p) - 1 + np.arange(len(resp))
  return {"input_ids": ids, "segment_ids": seg, "positions": pos, "token_index": index}


def to_slots(
  plan: Plan, shape: Shape, x: np.ndarray, *, shards: slice | None = None, fill=0
) -> np.ndarray:
  """Per-sequence rows x [M, ...] -> the response layout [NM, W', E, ...] (empty slots: fill)."""
  lo, hi, _ = (shards or slice(0, shape.num_shards)).indices(shape.num_shards)
  x = np.asarray(x)
  out = np.full((shape.num_micro, hi - lo, shape.slots) + x.shape[1:], fill, x.dtype)
  mine = (plan.shard >= lo) & (plan.shard < hi)
  out[plan.micro[mine], plan.shard[mine] - lo, plan.slot[mine]] = x[mine]
  return out


def from_slots(plan: Plan, y: np.ndarray) -> np.ndarray:
  """The response layout y [NM, W, E, ...] (all shards) -> per-sequence rows [M, ...]."""
  return np.asarray(y)[plan.micro, plan.shard, plan.slot]


def useful_fraction(plan: Plan, shape: Shape) -> float:
  """Real tokens / tokens the packed layout runs the model on."""
  return float(plan.lengths.sum()) / float(
    shape.num_micro * shape.num_shards * shape.rows * shape.row_len
  )


def response_arrays(
  responses: Sequence[np.ndarray],
  logprobs: Sequence[np.ndarray],
  advantages: np.ndarray,
  response_len: int,
) -> dict[str, np.ndarray]:
  """The response layout [M, T] of both layouts: mask, sampler log-probs, advantages."""
  m = len(responses)
  mask = np.zeros((m, response_len), np.float32)
  lp = np.zeros((m, response_len), np.float32)
  for i, (r, x) in enumerate(zip(responses, logprobs, strict=True)):
    n = min(len(r), response_len)
    mask[i, :n] = 1.0
    lp[i, :n] = np.asarray(x, np.float32)[:n]
  adv = (np.asarray(advantages, np.float32)[:, None] * mask).astype(np.float32)
  return {"response_mask": mask, "old_log_probs": lp, "advantages": adv}


@dataclasses.dataclass(frozen=True)
class PackedRollouts:
  """Every mini-batch of a rollout batch on one packed layout."""

  batches: list[dict[str, np.ndarray]]  # steps.Batch fields per mini-batch (selected shards)
  plans: list[Plan]
  shape: Shape
  useful: float  # real tokens / tokens the model runs on, over the mini-batches


def _plan(layout: Layout, prompt_lengths, response_lengths, max_prompt_length: int) -> Plan:
  """The plan of one mini-batch of (prompt, response) lengths int[M] on `layout`."""
  kw = dict(num_shards=layout.num_shards, num_micro=layout.num_micro, row_len=layout.row_len)
  if layout.padded:
    return plan_padded(prompt_lengths, response_lengths, max_prompt_length=max_prompt_length, **kw)
  return plan_mini_batch(prompt_lengths + response_lengths, **kw)


def pack_rollouts(
  prompts: Sequence[np.ndarray],
  responses: Sequence[np.ndarray],
  logprobs: Sequence[np.ndarray],
  advantages: np.ndarray,
  *,
  mini: int,
  max_prompt_length: int,
  max_response_length: int,
  layout: Layout,
  pad_id: int,
  shards: slice | None = None,
) -> PackedRollouts:
  """Packs R = k * mini sequences, mini-batch by mini-batch, into one shared static Shape.

  Prompts keep their last max_prompt_length tokens and responses their first
  max_response_length. Every process plans all mini-batches (the plans agree everywhere) and
  fills only the batch shards `shards` its devices hold. The padded layout's shape is exact
  (R = E = its rows per shard), a packed one's is bucketed.
  """
  prompts = [np.asarray(p, np.int32)[-max_prompt_length:] for p in prompts]
  responses = [np.asarray(r, np.int32)[:max_response_length] for r in responses]
  plen, rlen = (np.asarray([len(x) for x in xs], np.int64) for xs in (prompts, responses))
  parts = [slice(i, i + mini) for i in range(0, len(prompts), mini)]
  plans = [_plan(layout, plen[s], rlen[s], max_prompt_length) for s in parts]
  buckets = () if layout.padded else DEFAULT_BUCKETS
  shape = layout_shape(plans, dynamic=layout.num_micro is None, buckets=buckets)
  resp = response_arrays(responses, logprobs, np.asarray(advantages), max_response_length)
  batches = []
  for s, plan in zip(parts, plans, strict=True):
    arrays = pack_tokens(
      plan,
      shape,
      prompts[s],
      responses[s],
      response_len=max_response_length,
      pad_id=pad_id,
      shards=shards,
    )
    for key, value in resp.items():
      arrays[key] = to_slots(plan, shape, value[s], shards=shards)
    rows = np.arange(len(plan.lengths), dtype=np.int32)
    arrays["seq_index"] = to_slots(plan, shape, rows, shards=shards, fill=-1)
    arrays["seq_mask"] = (arrays["seq_index"] >= 0).astype(np.float32)
    batches.append(arrays)
  useful = float(np.mean([useful_fraction(p, shape) for p in plans]))
  return PackedRollouts(batches=batches, plans=plans, shape=shape, useful=useful)
