"""Loss aggregation and masked statistics, with verl's semantics and no NaN on empty masks.

Micro-batch scaling (verl, docs/fipo_spec.md §2.9): a policy loss here is the aggregate over ONE
micro-batch. verl multiplies each micro-batch loss by `n_seqs_micro / n_seqs_mini` (dynamic
batch size; `1 / grad_accum` without it) before backward and accumulates gradients over the
mini-batch. A trainer reproduces that with `microbatch_scale` below:

    loss, metrics = compute_policy_loss(...)              # per micro-batch
    scaled = loss * microbatch_scale(n_seqs_micro, n_seqs_mini)
    grads = sum over micro-batches of grad(scaled)         # then one optimizer step

The logged `actor/pg_loss` (and `actor/kl_loss`) in verl is the scaled value: dp_actor appends
`loss * scale` per micro-batch and the trainer logs the mean of that list. `compute_policy_loss`
returns the unscaled one (as the golden files do); the train steps scale their metrics with
`scale_loss_metrics`, so that our curves overlay an official run's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def torch_clamp(x: jax.Array, lo, hi) -> jax.Array:
  """torch.clamp with torch's gradient: 1 inside [lo, hi] including the ends, 0 outside."""
  return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


LOSS_METRICS = ("actor/pg_loss", "actor/kl_loss")  # logged scaled by verl's dp_actor


def scale_loss_metrics(metrics: dict, scale) -> dict:
  """`metrics` with the micro-batch losses (LOSS_METRICS) times the micro-batch's loss scale,
  as verl's dp_actor logs them; averaged over the step's micro-batches they are verl's
  `actor/pg_loss` and `actor/kl_loss`. Other metrics (fractions, weights) are not scaled."""
  return {k: (v * scale if k in LOSS_METRICS else v) for k, v in metrics.items()}

def microbatch_scale(n_seqs_micro: int, n_seqs_mini: int) -> float:
  """verl's per-micro-batch loss factor: sequences in this micro-batch / in the mini-batch."""
  if n_seqs_mini <= 0:
    raise ValueError(f"n_seqs_mini must be positive, got {n_seqs_mini}")
  return float(n_seqs_micro) / float(n_seqs_mini)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Sum of x where mask; `where` (not multiply) so inf/nan outside the mask never leak."""
  return jnp.sum(jnp.where(mask.astype(bool), x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """verl_F.masked_mean: sum(x * m) / (sum(m) + 1e-8); 0 for an empty mask."""
  return masked_sum(x, mask) / (jnp.sum(mask.astype(jnp.float32)) + 1e-8)


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
  """min over masked entries; 0 when the mask is empty (torch would raise)."""
  m = mask.astype(bool)
  return jnp.where(jnp.any(m), jnp.min(jnp.where(m, x, jnp.inf)), 0.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """max over masked entries; 0 when the mask is empty (torch would raise)."""
  m = mask.astype(bool)
  return jnp.where(jnp.any(m), jnp.max(jnp.where(m, x, -jnp.inf)), 0.0)


def masked_means(xs: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
  """`masked_mean` of several [B, T] arrays (bool or float) over one mask (one shared count).

  One reduction per array: a single reduction over the stacked arrays measured 2x slower on
  XLA:CPU.
  """
  m = mask.astype(bool)
  denom = jnp.sum(m.astype(jnp.float32)) + 1e-8
  return {k: masked_sum(x.astype(jnp.float32), m) / denom for k, x in xs.items()}


def masked_extrema(xs: dict[str, jax.Array], mask: jax.Array) -> dict[str, tuple]:
  """(masked_min, masked_max) of several [B, T] arrays over one mask."""
  return {k: (masked_min(x, mask), masked_max(x, mask)) for k, x in xs.items()}


def agg_rows(row_sum: jax.Array, row_count: jax.Array, num_cols: int, mode: str) -> jax.Array:
  """`agg_loss` from per-row sums and token counts ([B] each; a dropped row has both 0).

  Every aggregation mode is a function of these, so a loss that masks whole rows (FIPO's
  sequence drop) zeroes two [B] vectors instead of building a [B, T] mask.
  """
  if mode == "token-mean":
    return jnp.sum(row_sum) / (jnp.sum(row_count) + 1e-8)
  if mode == "seq-mean-token-sum":
    return jnp.mean(row_sum)
  if mode == "seq-mean-token-mean":
    has = row_count > 0
    row_mean = jnp.where(has, row_sum / jnp.where(has, row_count, 1.0), 0.0)
    return jnp.sum(row_mean) / (jnp.sum(has.astype(jnp.float32)) + 1e-8)
  if mode == "seq-mean-token-sum-norm":
    return jnp.sum(row_sum) / num_cols
  raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {AGG_MODES}")


def agg_loss(loss_mat: jax.Array, mask: jax.Array, mode: str = "token-mean") -> jax.Array:
  """Aggregates a [B, T] per-token loss into a scalar (verl `agg_loss`).

  Args:
    loss_mat: [B, T] per-token loss. Entries outside `mask` are ignored even if non-finite.
    mask: [B, T] bool or 0/1 float.
    mode: 'token-mean' sum/(tokens + 1e-8); 'seq-mean-token-sum' mean over all B rows of row
      sums; 'seq-mean-token-mean' mean over non-empty rows of row means (rows with no tokens,
      e.g. dropped sequences, are left out instead of giving NaN as old verl did);
      'seq-mean-token-sum-norm' (Dr.GRPO) sum of row sums / T.

  Returns:
    f32[] loss; 0 for an all-masked batch.
  """
  row_sum = masked_sum(loss_mat.astype(jnp.float32), mask, axis=-1)  # [B]
  row_count = jnp.sum(mask.astype(jnp.float32), axis=-1)  # [B]
  return agg_rows(row_sum, row_count, loss_mat.shape[-1], mode)


def _lerp_torch(lo: jax.Array, hi: jax.Array, w: jax.Array) -> jax.Array:
  # torch.lerp's two-sided formula, so interpolated quantiles round like torch.quantile.
  return jnp.where(w < 0.5, lo + w * (hi - lo), hi - (hi - lo) * (1.0 - w))


def _sortable_keys(x: jax.Array) -> jax.Array:
  """uint32 keys with the same order as the float32 values (sign-magnitude -> offset)."""
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  flip = jnp.where(u >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
  return u ^ flip


def _from_sortable_keys(k: jax.Array) -> jax.Array:
  flip = jnp.where(k >> 31 == 1, jnp.uint32(0x80000000), jnp.uint32(0xFFFFFFFF))
  return jax.lax.bitcast_convert_type(k ^ flip, jnp.float32)


_F32_EXACT_INT = 1 << 24  # float32 holds every integer count below this exactly


def _cumsum_bins(hist: jax.Array, total: int) -> jax.Array:
  """Inclusive cumsum of int32 [r, nb] counts along the bins, nb small.

  XLA:CPU lowers cumsum to a windowed reduction that costs ~0.25 ms even for [8, 256] (as much
  as the rest of a radix level), so on CPU it is one float32 matmul with an upper-triangular
  ones matrix, exact while every partial sum (at most `total`) is below 2^24. Other backends,
  and larger totals, use cumsum.
  """
  nb = hist.shape[-1]
  upper = np.triu(np.ones((nb, nb), np.float32))  # upper[i, j] = 1 where i <= j

  def by_matmul(h):
    c = jnp.matmul(h.astype(jnp.float32), upper, precision=jax.lax.Precision.HIGHEST)
    return c.astype(jnp.int32)

  if total >= _F32_EXACT_INT:
    return jnp.cumsum(hist, axis=-1)
  return jax.lax.platform_dependent(hist, cpu=by_matmul, default=lambda h: jnp.cumsum(h, -1))


def _locate(hist: jax.Array, ranks: jax.Array, total: int) -> tuple[jax.Array, jax.Array]:
  """Bin of the element with 0-based rank k in each [r, 256] histogram row, and k inside it."""
  cum = _cumsum_bins(hist, total)
  digit = jnp.minimum(jnp.sum(cum <= ranks[:, None], axis=-1), 255)
  before = jnp.where(digit > 0, jnp.take_along_axis(cum, (digit - 1)[:, None], 1)[:, 0], 0)
  return digit, ranks - before


def _radix_select(keys, slot, k, *, rank_slot, n_slots: int) -> jax.Array:
  """Key of the k-th smallest (0-based) element of each rank's slot, 8 bits per level from the
  top: each element is counted once, for the first rank whose slot and already-chosen high
  bits it shares (one scatter-add per level, no sort). Level 0 has one histogram per slot.

  keys: [n] uint32; slot: [n] int32 in [0, n_slots) or -1 (ignored); rank_slot: static [r]
  slot of each rank; k: [r] int32 ranks. Returns [r] uint32 keys.
  """
  n_r = len(rank_slot)
  rank_slot = np.asarray(rank_slot, np.int32)
  same_slot = rank_slot[:, None] == rank_slot[None, :]
  in_slot = slot[None, :] == jnp.asarray(rank_slot)[:, None]  # [r, n], fused into its users
  prefix = jnp.zeros((n_r,), jnp.uint32)
  for level in range(4):
    shift = 24 - 8 * level
    digit = ((keys >> shift) & 0xFF).astype(jnp.int32)
    if level == 0:
      row, n_rows, first = slot, n_slots, jnp.asarray(rank_slot)
    else:
      match = in_slot & ((keys >> (shift + 8))[None, :] == prefix[:, None])
      row = jnp.min(jnp.where(match, jnp.arange(n_r)[:, None], n_r), axis=0)  # [n] owner rank
      row = jnp.where(row < n_r, row, -1)
      n_rows = n_r
      first = jnp.argmax(same_slot & (prefix[:, None] == prefix[None, :]), axis=1)
    idx = jnp.where(row >= 0, row * 256 + digit, n_rows * 256)
    hist = jnp.zeros(n_rows * 256 + 1, jnp.int32).at[idx].add(1)[:-1].reshape(n_rows, 256)
    d, k = _locate(hist[first], k, keys.shape[0])
    prefix = (prefix << 8) | d.astype(jnp.uint32)
  return prefix


def _sort_select(keys, slot, k, *, rank_slot, n_slots: int) -> jax.Array:
  """What `_radix_select` returns, from one sort of (slot, key) pairs: the better choice where
  sorting is fast (GPU, TPU). Unused elements (slot -1) sort last."""
  del n_slots
  slot_key = jnp.where(slot >= 0, slot, jnp.iinfo(jnp.int32).max)
  _, sorted_keys = jax.lax.sort((slot_key, keys), num_keys=2)
  rank_slot = jnp.asarray(np.asarray(rank_slot, np.int32))
  start = jnp.sum((slot[None, :] >= 0) & (slot[None, :] < rank_slot[:, None]), axis=1)  # [r]
  return sorted_keys[start + k]


def grouped_quantiles(
  values: jax.Array, group: jax.Array, qs: dict[int, tuple[float, ...]], method: str = "auto"
) -> dict[int, list[jax.Array]]:
  """torch.quantile (linear interpolation) of `values` within each group, exactly, no sort.

  A full sort of B*T ratios costs far more than the loss on CPU (XLA's float sort is ~40-100
  ms at 8 x 20480), so every order statistic needed (min, max, and for each other quantile the
  two interpolation points) comes from one radix select on order-preserving uint32 keys of the
  floats (`_radix_select`: four 256-bin scatter-add levels). The results are the exact
  elements a sort would give.

  Args:
    values: [n] float32 (finite).
    group: [n] int32 group id; ids not in `qs` are ignored.
    qs: {group id: quantiles in [0, 1]}; 0 and 1 give the exact min and max.
    method: 'radix' (`_radix_select`), 'sort' (`_sort_select`, one sort of n pairs) or 'auto':
      radix on CPU, sort elsewhere. Both return the same elements.

  Returns:
    {group id: [f32[] per quantile]}; every quantile of an empty group is 0.0.
  """
  ids = sorted(qs)
  slot = jnp.full(group.shape, -1, jnp.int32)
  for i, g in enumerate(ids):
    slot = jnp.where(group == g, i, slot)
  counts = jnp.stack([jnp.sum((slot == i).astype(jnp.int32)) for i in range(len(ids))])

  # Every quantile needs the order statistics at floor(pos) and the one after it (pos =
  # q (n - 1) in float32, as torch computes it); q = 0 and q = 1 need only the first. All of
  # them are ranks of one radix select (ranks sharing high bits share its histograms).
  wanted = [(i, q) for i, g in enumerate(ids) for q in qs[g]]
  ranks = [(i, q, side) for i, q in wanted for side in ((0,) if q in (0.0, 1.0) else (0, 1))]
  last = jnp.maximum(counts - 1, 0)
  pos = {(i, q): np.float32(q) * (counts[i] - 1).astype(jnp.float32) for i, q in wanted}
  k = jnp.stack(
    [
      jnp.minimum(jnp.clip(jnp.floor(pos[i, q]).astype(jnp.int32), 0, last[i]) + side, last[i])
      for i, q, side in ranks
    ]
  )
  rank_slot = [i for i, _, _ in ranks]
  # rank_slot and the slot count are static: bind them, pass only arrays.
  select = {
    name: functools.partial(fn, rank_slot=rank_slot, n_slots=len(ids))
    for name, fn in (("radix", _radix_select), ("sort", _sort_select))
  }
  if method == "auto":
    keys = jax.lax.platform_dependent(
      _sortable_keys(values), slot, k, cpu=select["radix"], default=select["sort"]
    )
  elif method in select:
    keys = select[method](_sortable_keys(values), slot, k=k)
  else:
    raise ValueError(f"method must be 'auto', 'radix' or 'sort', got {method!r}")
  point = dict(zip(ranks, _from_sortable_keys(keys), strict=True))

  out = {}
  for i, g in enumerate(ids):
    res = []
    for q in qs[g]:
      lo = point[i, q, 0]
      hi = point.get((i, q, 1), lo)
      v = _lerp_torch(lo, hi, pos[i, q] - jnp.floor(pos[i, q]))
      res.append(jnp.where(counts[i] > 0, v, 0.0).astype(jnp.float32))
    out[g] = res
  return out
