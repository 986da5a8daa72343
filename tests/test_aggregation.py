"""fipo_jax.algo.aggregation: micro-batch scaling and the official ratio-quantile metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import algo
from fipo_jax.algo import aggregation


def test_microbatch_scale():
  assert algo.microbatch_scale(8, 32) == 0.25
  with pytest.raises(ValueError):
    algo.microbatch_scale(1, 0)


def _torch_style_quantile(x, q):
  """torch.quantile(linear) on float32: rank in float32, torch.lerp's two-sided formula."""
  if x.size == 0:
    return 0.0
  s = np.sort(x.astype(np.float32))
  pos = np.float32(q) * np.float32(s.size - 1)
  lo, hi = s[int(np.floor(pos))], s[int(np.ceil(pos))]
  w = np.float32(pos - np.floor(pos))
  return lo + w * (hi - lo) if w < 0.5 else hi - (hi - lo) * (np.float32(1) - w)


# Ranks asked per group (as in the FIPO metrics); group 3 is left empty by the inputs.
_QS = {0: (1.0, 0.995, 0.999, 0.75), 1: (1.0, 0.5, 0.75, 0.25, 0.0), 3: (0.5,)}


@functools.partial(jax.jit, static_argnames="method")
def _quantiles(values, group, method="auto"):
  return aggregation.grouped_quantiles(
    values,
    group,
    _QS,
    method=method,
  )


@pytest.mark.parametrize("method", ["radix", "sort"])
def test_grouped_quantiles_match_sorting(method):
  rng = np.random.default_rng(0)
  for trial in range(4):
    values = np.exp(rng.normal(0, 0.5, 3000)).astype(np.float32)
    values[rng.random(3000) < 0.3] = 1.0  # many exact ties (on-policy ratios)
    if trial == 1:
      values = rng.normal(0, 2, 3000).astype(np.float32)  # negative values and -0.0 too
      values[:5] = -0.0
    group = rng.integers(0, 3 if trial < 3 else 1, 3000).astype(np.int32)  # group 3 empty
    got = _quantiles(jnp.asarray(values), jnp.asarray(group), method)
    for g, qs in _QS.items():
      for q, v in zip(qs, got[g], strict=True):
        want = _torch_style_quantile(values[group == g], q)
        assert float(v) == float(want), (trial, g, q, float(v), want)


def test_grouped_quantiles_radix_equals_sort_at_scale():
  """160k on-policy-like ratios (heavy ties at 1.0, three groups): both selections agree."""
  rng = np.random.default_rng(7)
  n = 8 * 20480
  values = np.exp(rng.normal(0, 0.05, n)).astype(np.float32)
  values[rng.random(n) < 0.5] = 1.0
  group = rng.integers(0, 3, n).astype(np.int32)
  radix = _quantiles(jnp.asarray(values), jnp.asarray(group), "radix")
  by_sort = _quantiles(jnp.asarray(values), jnp.asarray(group), "sort")
  for g in radix:
    assert [float(v) for v in radix[g]] == [float(v) for v in by_sort[g]], g
  assert float(radix[1][1]) == float(np.quantile(values[group == 1], 0.5))
