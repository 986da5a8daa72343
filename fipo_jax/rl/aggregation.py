"""Loss aggregation and masked statistics, with verl's semantics and no NaN on empty masks.

Micro-batch scaling (verl, FIPO_SPEC §2.9): a policy loss here is the aggregate over ONE
micro-batch. verl multiplies each micro-batch loss by `n_seqs_micro / n_seqs_mini` (dynamic
batch size; `1 / grad_accum` without it) before backward and accumulates gradients over the
mini-batch. A trainer reproduces that with `microbatch_scale` below:

    loss, metrics = compute_policy_loss(...)              # per micro-batch
    scaled = loss * microbatch_scale(n_seqs_micro, n_seqs_mini)
    grads = sum over micro-batches of grad(scaled)         # then one optimizer step

The logged `actor/pg_loss` in verl is the scaled value; `compute_policy_loss` returns the
unscaled one (as the golden files do), so a trainer that wants verl's log multiplies too.
"""

import jax
import jax.numpy as jnp
import numpy as np

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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
  m = mask.astype(jnp.float32)
  row_sum = masked_sum(loss_mat.astype(jnp.float32), mask, axis=-1)  # [B]
  if mode == "token-mean":
    return jnp.sum(row_sum) / (jnp.sum(m) + 1e-8)
  if mode == "seq-mean-token-sum":
    return jnp.mean(row_sum)
  if mode == "seq-mean-token-mean":
    n_tok = jnp.sum(m, axis=-1)
    has = n_tok > 0
    row_mean = jnp.where(has, row_sum / jnp.where(has, n_tok, 1.0), 0.0)
    return jnp.sum(row_mean) / (jnp.sum(has.astype(jnp.float32)) + 1e-8)
  if mode == "seq-mean-token-sum-norm":
    return jnp.sum(row_sum) / loss_mat.shape[-1]
  raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {AGG_MODES}")


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


def _locate(hist: jax.Array, ranks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bin of the element with 0-based rank k in each [R, 256] histogram row, and k inside it."""
  cum = jnp.cumsum(hist, axis=-1)
  digit = jnp.minimum(jnp.sum(cum <= ranks[:, None], axis=-1), 255)
  before = jnp.where(digit > 0, jnp.take_along_axis(cum, (digit - 1)[:, None], 1)[:, 0], 0)
  return digit, ranks - before


def _radix_select(keys, in_slot, rank_slot, k) -> jax.Array:
  """Key of the k-th smallest (0-based) element of each selection, 8 bits per level from the
  top: each element is counted once, for the first order statistic whose selection and
  already-chosen high bits it shares (one scatter-add per level, no sort).

  keys: [N] uint32; in_slot: [R, N] bool selections; rank_slot: static [R] selection ids
  (equal ids mean equal selections); k: [R] int32 ranks. Returns [R] uint32 keys.
  """
  n_r = in_slot.shape[0]
  same_slot = rank_slot[:, None] == rank_slot[None, :]
  prefix = jnp.zeros((n_r,), jnp.uint32)
  for level in range(4):
    shift = 24 - 8 * level
    digit = ((keys >> shift) & 0xFF).astype(jnp.int32)
    match = in_slot
    if level:
      match = match & ((keys >> (shift + 8))[None, :] == prefix[:, None])
    owner = jnp.min(jnp.where(match, jnp.arange(n_r)[:, None], n_r), axis=0)  # [N]
    idx = jnp.where(owner < n_r, owner * 256 + digit, n_r * 256)
    hist = jnp.zeros(n_r * 256 + 1, jnp.int32).at[idx].add(1)[:-1].reshape(n_r, 256)
    first = jnp.argmax(same_slot & (prefix[:, None] == prefix[None, :]), axis=1)
    d, k = _locate(hist[first], k)
    prefix = (prefix << 8) | d.astype(jnp.uint32)
  return prefix


def grouped_quantiles(
  values: jax.Array, group: jax.Array, qs: dict[int, tuple[float, ...]]
) -> dict[int, list[jax.Array]]:
  """torch.quantile (linear interpolation) of `values` within each group, exactly, no sort.

  A full sort of B*T ratios costs far more than the loss on CPU (XLA's float sort is ~100 ms
  at 8 x 20480), so max/min are masked reductions and the other order statistics come from a
  radix select on order-preserving uint32 keys of the floats (`_radix_select`: four 256-bin
  scatter-add levels), plus one pass for the element after each (the upper interpolation
  point). The results are the exact elements a sort would give.

  Args:
    values: [N] float32 (finite).
    group: [N] int32 group id; ids not in `qs` are ignored.
    qs: {group id: quantiles in [0, 1]}; 0 and 1 give the exact min and max.

  Returns:
    {group id: [f32[] per quantile]}; every quantile of an empty group is 0.0.
  """
  ids = sorted(qs)
  keys = _sortable_keys(values)
  slot = jnp.full(group.shape, -1, jnp.int32)
  for i, g in enumerate(ids):
    slot = jnp.where(group == g, i, slot)
  counts = jnp.stack([jnp.sum((slot == i).astype(jnp.int32)) for i in range(len(ids))])

  # Max and min are plain masked reductions; every other quantile needs the order statistic at
  # floor(pos), pos = q (n - 1) in float32 as torch computes it, and the one after it.
  radix = [(i, q) for i, g in enumerate(ids) for q in qs[g] if 0.0 < q < 1.0]
  n_r = len(radix)
  stats = {}
  if n_r:
    rank_slot = np.asarray([i for i, _ in radix], np.int32)
    pos = jnp.stack([np.float32(q) * (counts[i] - 1).astype(jnp.float32) for i, q in radix])
    k = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, jnp.maximum(counts[rank_slot] - 1, 0))
    in_slot = slot[None, :] == jnp.asarray(rank_slot)[:, None]  # [R, N]
    key_lo = _radix_select(keys, in_slot, rank_slot, k)
    n_le = jnp.sum(in_slot & (keys[None, :] <= key_lo[:, None]), axis=1)
    above = in_slot & (keys[None, :] > key_lo[:, None])
    nxt = jnp.min(jnp.where(above, keys[None, :], jnp.uint32(0xFFFFFFFF)), axis=1)
    key_hi = jnp.where((n_le > k + 1) | ~jnp.any(above, axis=1), key_lo, nxt)
    lo, hi = _from_sortable_keys(key_lo), _from_sortable_keys(key_hi)
    val = _lerp_torch(lo, hi, pos - jnp.floor(pos))
    stats = {r: val[j] for j, r in enumerate(radix)}

  out = {}
  for i, g in enumerate(ids):
    member = slot == i
    res = []
    for q in qs[g]:
      if q >= 1.0:
        v = masked_max(values, member)
      elif q <= 0.0:
        v = masked_min(values, member)
      else:
        v = stats[(i, q)]
      res.append(jnp.where(counts[i] > 0, v, 0.0).astype(jnp.float32))
    out[g] = res
  return out
