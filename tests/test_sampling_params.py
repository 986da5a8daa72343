"""Token selection: greedy, temperature, top-k, top-p match their distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fipo_jax.sampling import params as params_lib

_LOGITS = np.array([2.0, 1.5, 0.5, 0.0, -0.5, -1.0, -3.0, 1.0], np.float32)  # V = 8
_N = 20_000


def _expected(method: params_lib.Sampling) -> np.ndarray:
  """Numpy reference: tempered softmax, top-k then top-p truncation, renormalised."""
  z = _LOGITS.astype(np.float64) / method.temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  keep = np.ones_like(p, bool)
  if method.top_k > 0:
    keep &= z >= np.sort(z)[::-1][method.top_k - 1]
  q = np.where(keep, p, 0.0)
  q /= q.sum()
  if method.top_p < 1.0:
    order = np.argsort(-q)
    before = np.cumsum(q[order]) - q[order]
    kept = np.zeros_like(keep)
    kept[order[before < method.top_p]] = True
    q = np.where(kept, q, 0.0)
    q /= q.sum()
  return q


def _draw(method, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  keys = jax.random.split(jax.random.key(seed), _N)
  logits = jnp.broadcast_to(jnp.asarray(_LOGITS), (_N, _LOGITS.size))
  tokens, logp = jax.jit(method.select)(logits, keys)
  return np.asarray(tokens), np.asarray(logp)


@pytest.mark.parametrize(
  "method",
  [
    params_lib.Sampling(temperature=1.0),
    params_lib.Sampling(temperature=0.7),
    params_lib.Sampling(temperature=1.5, top_k=3),
    params_lib.Sampling(temperature=1.0, top_p=0.8),
    params_lib.Sampling(temperature=0.9, top_k=5, top_p=0.9),
  ],
  ids=str,
)
def test_sampling_matches_distribution_chi_square(method):
  tokens, _ = _draw(method)
  expected = _expected(method)
  counts = np.bincount(tokens, minlength=_LOGITS.size)
  support = expected > 0
  assert counts[~support].sum() == 0, "sampled a truncated token"
  chi2, pvalue = stats.chisquare(counts[support], _N * expected[support])
  assert pvalue > 1e-3, (counts, _N * expected, chi2)


def test_chi_square_detects_wrong_temperature():
  # The test above has power: samples at T=1 are rejected against the T=0.7 distribution.
  tokens, _ = _draw(params_lib.Sampling(temperature=1.0))
  counts = np.bincount(tokens, minlength=_LOGITS.size)
  expected = _expected(params_lib.Sampling(temperature=0.7))
  assert stats.chisquare(counts, _N * expected).pvalue < 1e-6


@pytest.mark.parametrize(
  "method",
  [params_lib.Sampling(temperature=0.6, top_k=2, top_p=0.5), params_lib.Greedy(temperature=0.6)],
  ids=str,
)
def test_log_probs_are_pre_truncation_at_temperature(method):
  tokens, logp = _draw(method, seed=3)
  ref = jax.nn.log_softmax(jnp.asarray(_LOGITS) / 0.6)
  np.testing.assert_allclose(logp, np.asarray(ref)[tokens], rtol=0, atol=1e-6)


def test_top_k_off_and_top_k_at_least_vocab_keep_every_token():
  logits = jnp.asarray(np.stack([_LOGITS, _LOGITS[::-1]]))
  full = logits / 0.8
  for top_k in (params_lib.TOP_K_OFF, _LOGITS.size, _LOGITS.size + 5):
    got = params_lib.Sampling(temperature=0.8, top_k=top_k).truncated_logits(logits)
    np.testing.assert_array_equal(got, full)
  kept = params_lib.Sampling(temperature=0.8, top_k=1).truncated_logits(logits)
  assert (np.isfinite(np.asarray(kept)).sum(axis=-1) == 1).all()


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(1), (16, 32))
  tokens, _ = params_lib.Greedy().select(logits, jax.random.split(jax.random.key(0), 16))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_same_seed_same_samples_different_seed_differs():
  method = params_lib.Sampling(temperature=1.0, top_p=0.95)
  a, _ = _draw(method, seed=7)
  b, _ = _draw(method, seed=7)
  c, _ = _draw(method, seed=8)
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.3


def test_validation_and_flags():
  with pytest.raises(ValueError, match="temperature"):
    params_lib.Sampling(temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    params_lib.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match=r"top_k must be -1 \(off\) or > 0, got 0"):
    params_lib.Sampling(top_k=0)  # one "off" value: -1, as in the configs
  assert params_lib.Sampling().top_k == params_lib.TOP_K_OFF == -1
  assert params_lib.from_flags(0.8, 0.9) == params_lib.Sampling(0.8, 0.9, -1)
  assert params_lib.from_flags(0.0) == params_lib.Greedy()
  assert params_lib.from_flags(0.8, 0.9, 5) == params_lib.Sampling(0.8, 0.9, 5)
  assert hash(params_lib.Sampling(0.8)) == hash(params_lib.Sampling(0.8))
