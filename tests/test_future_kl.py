"""future_kl: exact against the plain reverse recursion and the official chunked matmul."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import algo
from fipo_jax.algo.fkl import decay_gamma, future_kl_reference


def _official_chunked(x: np.ndarray, decay_rate: float, chunk: int = 128) -> np.ndarray:
  """docs/fipo_spec.md §3: F += x[:, j0:j1] @ W^T, W[i, j] = gamma^(j - i) for j >= i; float64."""
  b, t = x.shape
  gamma = decay_gamma(decay_rate)
  out = np.zeros((b, t))
  i = np.arange(t)[:, None]
  for j0 in range(0, t, chunk):
    j = np.arange(j0, min(j0 + chunk, t))[None, :]
    w = np.where(j >= i, gamma ** np.maximum(j - i, 0).astype(np.float64), 0.0)  # [T, Kb]
    out += x[:, j0 : j0 + w.shape[1]] @ w.T
  return out


def _inputs(rng, b, t, p_mask=0.8):
  delta = rng.normal(0.0, 0.5, size=(b, t)).astype(np.float32)
  mask = rng.random((b, t)) < p_mask
  return delta, mask


def _assert_close_to_ref(out, ref):
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * scale)


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
  b=st.integers(1, 3),
  t=st.integers(1, 300),
  chunk=st.integers(1, 140),
  decay=st.sampled_from([0.5, 2.0, 8.0, 32.0, 128.0, 1000.0]),
  seed=st.integers(0, 2**16),
)
def test_matches_reverse_recursion(b, t, chunk, decay, seed):
  delta, mask = _inputs(np.random.default_rng(seed), b, t)
  out = algo.future_kl(jnp.asarray(delta), jnp.asarray(mask), decay_rate=decay, chunk_size=chunk)
  assert out.shape == (b, t) and out.dtype == jnp.float32
  # float32 rounding bound for a discounted sum: each of the ~min(T, 1/(1-gamma)) effective
  # terms adds at most ~eps relative error, measured against the sum of |x| (not of x).
  n_eff = min(t, 1.0 / (1.0 - decay_gamma(decay)))
  tol = 2 * np.finfo(np.float32).eps * n_eff * future_kl_reference(np.abs(delta), mask, decay)
  err = np.abs(np.asarray(out) - future_kl_reference(delta, mask, decay))
  assert (err <= tol + 1e-7).all(), float((err - tol).max())


@pytest.mark.parametrize("k", [2, 7, 32, 128, 200])
@pytest.mark.parametrize("t", [1, 127, 128, 129, 4099, 20000])
def test_suffix_sum_any_chunk(k, t):
  """The chunked recursion itself at chunk sizes the CPU path caps away (K > 32), including
  three recursion levels (T > K^2) and T not a multiple of K."""
  from fipo_jax.algo.fkl import _suffix_sum

  delta, mask = _inputs(np.random.default_rng(k * 100003 + t), 2, t)
  x = np.where(mask, delta, 0.0).astype(np.float32)
  out = jax.jit(lambda x: _suffix_sum(x, decay_gamma(32.0), k))(jnp.asarray(x))
  n_eff = min(t, 1.0 / (1.0 - decay_gamma(32.0)))
  tol = 2 * np.finfo(np.float32).eps * n_eff * future_kl_reference(np.abs(delta), mask, 32.0)
  err = np.abs(np.asarray(out) - future_kl_reference(delta, mask, 32.0))
  assert (err <= tol + 1e-7).all(), float((err - tol).max())


@pytest.mark.parametrize("t", [1, 127, 128, 129, 300, 2050])
def test_matches_official_chunked_matmul(t):
  delta, mask = _inputs(np.random.default_rng(t), 2, t)
  x = np.where(mask, delta, 0.0).astype(np.float64)
  out = algo.future_kl(jnp.asarray(delta), jnp.asarray(mask), decay_rate=32.0)
  _assert_close_to_ref(out, _official_chunked(x, 32.0))


def test_long_sequence_is_stable():
  # 32k tokens at the official decay: float32 stays ~1e-6 from float64, nothing overflows
  # (a global gamma**-t rescaling would reach gamma**-32768 = 2**1024).
  delta, mask = _inputs(np.random.default_rng(1), 2, 32768)
  for decay in (2.0, 32.0):
    out = np.asarray(algo.future_kl(jnp.asarray(delta), jnp.asarray(mask), decay_rate=decay))
    assert np.isfinite(out).all()
    _assert_close_to_ref(out, future_kl_reference(delta, mask, decay))


def test_hand_example_from_spec():
  # docs/fipo_spec.md §9 case 1, sequence 0 (all valid), tau = 32.
  x = np.array([[0.10, -0.05, 0.20, 0.00, -0.30, 0.15]], np.float32)
  out = algo.future_kl(jnp.asarray(x), jnp.ones_like(x), decay_rate=32.0)
  np.testing.assert_allclose(
    out[0], [0.102094, 0.002140, 0.053282, -0.149931, -0.153214, 0.150000], atol=2e-6
  )


def test_masked_positions_contribute_nothing_even_if_nonfinite():
  delta = np.array([[1.0, np.inf, np.nan, 2.0]], np.float32)
  mask = np.array([[True, False, False, True]])
  out = np.asarray(algo.future_kl(jnp.asarray(delta), jnp.asarray(mask), decay_rate=1.0))
  g = 0.5
  np.testing.assert_allclose(out[0], [1 + 2 * g**3, 2 * g**2, 2 * g, 2.0], rtol=1e-6)


def test_no_quadratic_buffer():
  # No intermediate of the traced computation may hold anything close to T x T elements.
  t = 4096
  jaxpr = jax.make_jaxpr(lambda d, m: algo.future_kl(d, m, decay_rate=32.0))(
    jnp.zeros((2, t)), jnp.ones((2, t), bool)
  )

  def sizes(jp):
    for eqn in jp.eqns:
      for v in eqn.outvars:
        yield int(np.prod(v.aval.shape))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from sizes(sub)

  assert max(sizes(jaxpr.jaxpr)) < t * t // 64


def test_no_recompile_for_equal_shapes():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(d, m):
    return algo.future_kl(d, m, decay_rate=32.0, chunk_size=16)

  chex.clear_trace_counter()
  rng = np.random.default_rng(0)
  for _ in range(3):
    delta, mask = _inputs(rng, 2, 50)
    f(jnp.asarray(delta), jnp.asarray(mask)).block_until_ready()


def test_rejects_bad_shapes():
  with pytest.raises(ValueError):
    algo.future_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)), decay_rate=32.0)
  with pytest.raises(ValueError):
    algo.future_kl(jnp.zeros((3,)), jnp.zeros((3,)), decay_rate=32.0)
