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


def grouped_quantiles(
  values: jax.Array, group: jax.Array, qs: dict[int, tuple[float, ...]]
) -> dict[int, list[jax.Array]]:
  """torch.quantile (linear) of `values` within each group id, one sort for all groups.

  Args:
    values: [N] float32.
    group: [N] int32 group id; ids not in `qs` are ignored.
    qs: {group id: quantiles in [0, 1]}. 0 and 1 give the exact min and max.

  Returns:
    {group id: [f32[] per quantile]}; every quantile of an empty group is 0.0.
  """
  ids = sorted(qs)
  # Lexicographic sort on (group, value): each group becomes a contiguous sorted run.
  g_sorted, v_sorted = jax.lax.sort((group, values), num_keys=2)
  del g_sorted
  out = {}
  size = values.shape[0]
  for g in ids:
    n = jnp.sum((group == g).astype(jnp.int32))
    first = jnp.sum((group < g).astype(jnp.int32))  # the run of group g starts here
    res = []
    for q in qs[g]:
      rank = np.float32(q) * (n - 1).astype(jnp.float32)
      lo_i = jnp.floor(rank).astype(jnp.int32)
      hi_i = jnp.ceil(rank).astype(jnp.int32)
      v_lo = v_sorted[jnp.clip(first + lo_i, 0, size - 1)]
      v_hi = v_sorted[jnp.clip(first + hi_i, 0, size - 1)]
      val = _lerp_torch(v_lo, v_hi, rank - lo_i.astype(jnp.float32))
      res.append(jnp.where(n > 0, val, 0.0))
    out[g] = res
  return out
