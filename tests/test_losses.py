"""Policy losses: every golden FIPO case, numpy references for fipo/dapo/grpo, properties."""

import functools
import json
import types

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import GOLDEN_DIR  # noqa: E402

from fipo_jax import algo
from fipo_jax.algo import aggregation, losses
from fipo_jax.algo.fkl import future_kl_reference

_GOLDEN_JSON = GOLDEN_DIR / "fipo_loss_cases.json"
_CASE_IDS = (
  [c["case_id"] for c in json.loads(_GOLDEN_JSON.read_text())["cases"]]
  if _GOLDEN_JSON.exists()
  else ["golden-files-missing"]
)
_INPUTS = ("log_prob", "old_log_prob", "advantages", "response_mask")
_KNOBS = (
  "clip_ratio_low",
  "clip_ratio_high",
  "clip_ratio_c",
  "future_kl_clip_ratio",
  "future_kl_clip_high_only",
  "safety_thresh",
)
_MASKS = ("participation_mask", "safety_mask", "lower_clip_mask", "seq_valid_mask", "final_mask")
_FLOATS = (
  "negative_approx_kl",
  "ratio",
  "kl_response",
  "future_kl",
  "influence_weights_pre_safety",
  "influence_weights",
  "weighted_advantages",
  "pg_losses1",
  "pg_losses2",
  "pg_losses3",
  "clip_pg_losses1",
  "clip_pg_losses2",
  "pg_losses",
)
# Quantile metrics, and exp(F) statistics whose relative error is F's absolute error.
_LOOSE = ("influence_weights_mean_raw", "raw_influence_weights_min", "raw_influence_weights_max")


@pytest.fixture(scope="module")
def golden(golden_dir):
  meta = json.loads((golden_dir / "fipo_loss_cases.json").read_text())
  arrays = np.load(golden_dir / "fipo_loss_cases.npz")
  return meta, {c["case_id"]: c for c in meta["cases"]}, arrays


@functools.partial(jax.jit, static_argnames=("decay_rate", "chunk_size"))
def _run_fipo(inputs, knobs, *, decay_rate, chunk_size):
  """Loss, metrics, d loss/d log_prob and intermediates; knobs are traced, so the 36 cases
  compile once per (shape, decay_rate) instead of once per config. `terms["iw_grad"]` is the
  gradient of sum(influence_weights) wrt log_prob, which must be exactly zero."""
  cfg = types.SimpleNamespace(
    **knobs, decay_rate=decay_rate, chunk_size=chunk_size, loss_agg_mode="token-mean"
  )
  lp, old, adv, mask = inputs

  def f(x):
    return losses.fipo_loss(x, old, adv, mask, cfg)

  def weights(x):
    return jnp.sum(losses.fipo_terms(x, old, adv, mask, cfg)["influence_weights"])

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
  terms = losses.fipo_terms(lp, old, adv, mask, cfg)
  return loss, metrics, grad, {**terms, "iw_grad": jax.grad(weights)(lp)}


def _pad(x, b, t):
  """Extra fully-masked rows and columns: by the loss semantics they change no output."""
  return np.pad(x, ((0, b - x.shape[0]), (0, t - x.shape[1])))


# Every FIPO run is padded to one shape, so the whole file compiles _run_fipo once per decay
# rate. 2050 is the longest golden T and deliberately not a multiple of the 128-token chunk.
_PAD_B, _PAD_T = 8, 2050


def _fipo_padded(lp, old, adv, mask, knobs, decay_rate, chunk_size=128):
  """_run_fipo on inputs padded to [8, bucket(T)] (shared compiles), outputs cut back."""
  b, t = np.shape(lp)
  knobs = {
    k: jnp.asarray(knobs[k], bool if k.endswith("high_only") else jnp.float32) for k in _KNOBS
  }
  inputs = tuple(
    jnp.asarray(_pad(np.asarray(x, np.float32), _PAD_B, _PAD_T)) for x in (lp, old, adv, mask)
  )
  loss, metrics, grad, terms = _run_fipo(
    inputs, knobs, decay_rate=float(decay_rate), chunk_size=int(chunk_size)
  )
  terms = {
    k: np.asarray(v)[:b, :t] if np.ndim(v) == 2 else np.asarray(v)[:b] for k, v in terms.items()
  }
  return loss, metrics, np.asarray(grad)[:b, :t], terms


def _check(name, ours, want, rtol, atol=1e-7):
  ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(want), err_msg=name)
  fin = np.isfinite(want)
  np.testing.assert_array_equal(ours[~fin], want[~fin], err_msg=name)
  np.testing.assert_allclose(ours[fin], want[fin], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_golden_fipo_case(golden, case_id):
  meta, cases, arrays = golden
  case = cases[case_id]
  g = {k.split("__", 1)[1]: arrays[k] for k in arrays.files if k.startswith(case_id + "__")}
  pl = case["config"]["policy_loss"]
  loss, metrics, grad, terms = _fipo_padded(
    *(g[k] for k in _INPUTS), {**case["config"], **pl}, pl["decay_rate"], pl["chunk_size"]
  )
  mask = g["response_mask"].astype(bool)
  assert not terms["iw_grad"].any()  # the influence weights are detached

  _check("pg_loss", loss, g["pg_loss"], 1e-5)
  scale = max(float(np.abs(g["grad_log_prob"]).max()), 1e-30)
  np.testing.assert_allclose(grad, g["grad_log_prob"], rtol=0, atol=1e-5 * scale)
  # XLA on CPU flushes float32 subnormals: an official weight f ~ 1e-42 is exactly 0 there, so
  # such tokens leave the two clip fractions (README: fipo_046). Where the backend flushes,
  # recompute those from the stored official per-token arrays without them; where it keeps
  # subnormals (XLA:GPU does), the official values must match as they are.
  sub = mask & (g["influence_weights"] > 0) & (g["influence_weights"] < np.finfo(np.float32).tiny)
  flushes = float(jax.jit(jnp.exp)(jnp.float32(-95.0))) == 0.0
  want = {k: g[k] for k in meta["returned_order"][:-1]}
  if sub.any() and flushes:
    n = mask.sum()
    want["pg_clipfrac"] = ((g["pg_losses2"] > g["pg_losses1"]) & mask & ~sub).sum() / n
    want["pg_clipfrac_lower"] = (g["lower_clip_mask"] & ~sub).sum() / n
  for name, value in want.items():
    loose = "_is_" in name or name in _LOOSE
    _check(name, metrics[meta["logged_metric_names"][name]], value, 2e-4 if loose else 1e-5)
  _check(
    "negative_approx_kl_masked",
    terms["negative_approx_kl"] * mask,
    g["negative_approx_kl_masked"],
    1e-5,
  )

  for name in _MASKS:
    np.testing.assert_array_equal(terms[name], g[name], err_msg=name)
  # Per-token values: golden README gives <= 1e-5 absolute for F, f and per-token losses (the
  # suffix sums cancel, so near-zero F has no meaningful relative error).
  for name in _FLOATS:
    _check(name, terms[name], g[name], 1e-5, atol=1e-5)
  _check("raw_influence_weights", terms["raw_influence_weights"], g["raw_influence_weights"], 2e-4)


def test_public_api_on_golden_case(golden):
  """compute_policy_loss with the case's own (nested, verl-style) config dict and a ConfigDict."""
  meta, cases, arrays = golden
  case = next(c for c in meta["cases"] if c["category"] == "official32b" and c["T"] > 7)
  g = {n: jnp.asarray(arrays[f"{case['case_id']}__{n}"]) for n in _INPUTS}
  cfg_dict = case["config"]
  run = jax.jit(
    lambda lp: algo.compute_policy_loss(
      "future_kl", lp, *[g[n] for n in _INPUTS[1:]], ml_collections.ConfigDict(cfg_dict)
    )
  )
  loss, metrics = run(g["log_prob"])
  np.testing.assert_allclose(loss, arrays[f"{case['case_id']}__pg_loss"], rtol=1e-5)
  assert set(metrics) == set(meta["logged_metric_names"].values()) - {
    meta["logged_metric_names"]["negative_approx_kl_masked"]
  }
  assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
  assert losses.PolicyLossConfig.from_config(cfg_dict) == losses.PolicyLossConfig.from_config(
    {**cfg_dict, **cfg_dict["policy_loss"]}
  )
  assert algo.get_policy_loss("future_kl") is algo.get_policy_loss("fipo")


# ----------------------------------------------------------------------------------------------
# numpy references (float64), written from docs/fipo_spec.md §2 independently of the jax code.


def _np_surrogate(adv_w, adv, ratio, low, high, c):
  """Per-token loss, its derivative d loss / d log_prob (before normalisation), and masks."""
  l1 = -adv_w * ratio
  l2 = -adv_w * np.clip(ratio, 1 - low, 1 + high)
  lc = np.maximum(l1, l2)
  in_range = (ratio >= 1 - low) & (ratio <= 1 + high)
  dlc = np.where(in_range | (l1 > l2), -adv_w * ratio, 0.0)
  if c is None:
    return lc, dlc, l1, l2, np.zeros_like(lc, bool)
  l3 = -adv_w * c
  neg = adv_w < 0
  pg = np.where(neg, np.minimum(l3, lc), lc)
  dpg = np.where(neg & (lc > l3), 0.0, dlc)
  return pg, dpg, l1, l2, (lc > l3) & (adv < 0)


def _np_agg(pg, mask, mode):
  m = mask.astype(np.float64)
  rows = (pg * m).sum(-1)
  if mode == "token-mean":
    return rows.sum() / (m.sum() + 1e-8), np.full_like(m, 1 / (m.sum() + 1e-8))
  if mode == "seq-mean-token-sum":
    return rows.mean(), np.full_like(m, 1 / m.shape[0])
  if mode == "seq-mean-token-mean":
    n = m.sum(-1)
    has = n > 0
    per_row = np.where(has, 1 / np.maximum(n, 1), 0.0) / max(has.sum(), 1)
    return (rows * per_row).sum(), np.broadcast_to(per_row[:, None], m.shape)
  return rows.sum() / m.shape[1], np.full_like(m, 1 / m.shape[1])


def _np_policy_loss(mode, lp, old, adv, mask, cfg: losses.PolicyLossConfig):
  """Returns loss, grad wrt lp and the metrics (by official logged name)."""
  mask = mask.astype(bool)
  raw_d = lp.astype(np.float64) - old
  d = np.clip(raw_d, -20, 20)
  ratio = np.exp(d)
  mm = lambda x, m=mask: float((x * m).sum() / (m.sum() + 1e-8))  # noqa: E731
  metrics = {"actor/ppo_kl": mm(-d)}
  f, final = np.ones_like(d), mask
  if mode == "fipo":
    keep = d <= np.log(cfg.clip_ratio_c)
    future = future_kl_reference(d * mask * keep, mask, cfg.decay_rate)
    raw = np.exp(future)
    e = cfg.future_kl_clip_ratio
    lo, hi = (0.0, 10.0) if e == 0 else ((1.0 if cfg.future_kl_clip_high_only else 1 - e), 1 + e)
    f = np.clip(raw, lo, hi)
    f = np.where((adv < 0) & (ratio > cfg.safety_thresh), np.clip(f, 0.8, 1.0), f)
  # 'grpo' is verl's 'vanilla' loss (verl has no GRPO loss of its own), the same as 'dapo'.
  low, high, c = cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
  pg, dpg, l1, l2, lower = _np_surrogate(adv * f, adv, ratio, low, high, c)
  if mode == "fipo":
    final = mask & ((lower & mask).sum(-1) <= 1)[:, None]
  loss, weight = _np_agg(pg, final, cfg.loss_agg_mode)
  grad = np.where(final & (np.abs(raw_d) <= 20), dpg * ratio / ratio * weight, 0.0)
  metrics.update(
    {"actor/pg_loss": loss, "actor/pg_clipfrac": mm(l2 > l1), "actor/pg_clipfrac_lower": mm(lower)}
  )
  if mode == "fipo":
    sel = lambda x, m: x[m] if m.any() else np.zeros(1)  # noqa: E731
    neg, pos = (adv < 0) & mask, (adv > 0) & mask
    upper_frac, lower_frac = mm(f >= hi - 1e-7), mm(f <= lo + 1e-7)
    metrics.update(
      {
        "actor/influence_weights_mean": mm(f),
        "actor/influence_weights_min": sel(f, mask).min(),
        "actor/influence_weights_max": sel(f, mask).max(),
        "actor/IW_upper_clip_ratio": upper_frac,
        "actor/IW_lower_clip_ratio": lower_frac,
        "actor/IW_overall_clip_ratio": upper_frac + lower_frac,
        "actor/influence_weights_mean_raw": mm(raw),
        "actor/raw_influence_weights_min": sel(raw, mask).min(),
        "actor/raw_influence_weights_max": sel(raw, mask).max(),
        "actor/neg_ratio_2_3": mm(neg & (ratio >= 2) & (ratio < 3)),
        "actor/neg_ratio_3_4": mm(neg & (ratio >= 3) & (ratio < 4)),
        "actor/neg_ratio_4_10": mm(neg & (ratio >= 4) & (ratio < c)),
        "actor/pos_mini_frac": mm(pos & (ratio < 1e-3)),
      }
    )
    for name, q in [("max", 1), ("p995", 0.995), ("p999", 0.999), ("p75", 0.75)]:
      metrics[f"actor/neg_is_{name}"] = np.quantile(sel(ratio, neg), q)
    for name, q in [
      ("max", 1),
      ("min", 0),
      ("median", 0.5),
      ("p25", 0.25),
      ("p75", 0.75),
      ("p995", 0.995),
      ("p999", 0.999),
    ]:
      metrics[f"actor/pos_is_{name}"] = np.quantile(sel(ratio, pos), q)
  return loss, grad, metrics


def _random_batch(seed, b=4, t=37):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.0, 0.5, (b, t)).astype(np.float32)
  delta = rng.normal(0.0, 0.4, (b, t))
  spikes = rng.random((b, t))
  delta = np.where(
    spikes < 0.04, 2.6, np.where(spikes > 0.97, rng.choice([-25.0, 25.0, -7.0], (b, t)), delta)
  )
  lengths = rng.integers(0, t + 1, b)
  lengths[0], lengths[1] = t, 0  # a full row and a fully masked row
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  adv = rng.choice([-1.3, -0.6, 0.0, 0.8, 1.5], b)[:, None] * mask
  return (old + delta).astype(np.float32), old, adv.astype(np.float32), mask


# Aggregation is shared code: every mode with FIPO, two with DAPO and GRPO (compile time).
_MODE_AGG = [("fipo", agg) for agg in aggregation.AGG_MODES] + [
  (mode, agg) for mode in ("dapo", "grpo") for agg in ("token-mean", "seq-mean-token-mean")
]


def _ref_cfg(agg):
  return losses.PolicyLossConfig(
    loss_agg_mode=agg,
    decay_rate=8.0,
    chunk_size=16,
    future_kl_clip_ratio=0.2,
    future_kl_clip_high_only=False,
    safety_thresh=3.0,
  )


@jax.jit
def _every_loss_and_grad(lp, old, adv, mask):
  """{(mode, agg): ((loss, metrics), grad)} for every loss and aggregation, one compile."""
  return {
    (mode, agg): jax.value_and_grad(
      lambda x, mode=mode, agg=agg: algo.compute_policy_loss(
        mode, x, old, adv, mask, _ref_cfg(agg)
      ),
      has_aux=True,
    )(lp)
    for mode, agg in _MODE_AGG
  }


def _compare(got_loss, got_metrics, got_grad, ref):
  loss, grad, metrics = ref
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-6 * max(1, np.abs(grad).max()))
  assert set(metrics) <= set(got_metrics)
  for name, want in metrics.items():
    rtol = 2e-4 if ("_is_" in name or "raw" in name) else 1e-5
    np.testing.assert_allclose(got_metrics[name], want, rtol=rtol, atol=1e-6, err_msg=name)


def test_losses_match_numpy_reference():
  lp, old, adv, mask = _random_batch(seed=5)
  results = _every_loss_and_grad(lp, old, adv, mask)
  for (mode, agg), ((loss, metrics), grad) in results.items():
    ref = _np_policy_loss(mode, lp, old, adv, mask, _ref_cfg(agg))
    _compare(loss, metrics, grad, ref)
    assert all(np.isfinite(v) for v in metrics.values()), (mode, agg)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
  seed=st.integers(0, 10_000),
  decay=st.sampled_from([2.0, 32.0]),
  low=st.floats(0.1, 0.3),
  high=st.floats(0.2, 0.4),
  c=st.sampled_from([3.0, 10.0]),
  e=st.sampled_from([0.0, 0.2]),
  high_only=st.booleans(),
  safety=st.sampled_from([3.0, 10.0]),
)
def test_fipo_matches_numpy_reference_over_knobs(seed, decay, low, high, c, e, high_only, safety):
  lp, old, adv, mask = _random_batch(seed, b=4, t=40)
  cfg = losses.PolicyLossConfig(
    clip_ratio_low=low,
    clip_ratio_high=high,
    clip_ratio_c=c,
    decay_rate=decay,
    future_kl_clip_ratio=e,
    future_kl_clip_high_only=high_only,
    safety_thresh=safety,
  )
  knobs = {k: getattr(cfg, k) for k in _KNOBS}
  loss, metrics, grad, terms = _fipo_padded(lp, old, adv, mask, knobs, decay)
  _compare(loss, metrics, grad, _np_policy_loss("fipo", lp, old, adv, mask, cfg))
  # Gradient is exactly zero wherever the token is clipped, dropped, clamped or masked.
  clipped = (
    (terms["pg_losses"] != terms["pg_losses1"]) | ~terms["final_mask"] | (np.abs(lp - old) > 20)
  )
  assert (grad[clipped] == 0).all() and not terms["iw_grad"].any()


def test_spec_worked_example():
  """docs/fipo_spec.md §9: the four hand-checked cases (losses and gradients to 6 digits)."""
  old = np.array([[-1.2, -0.5, -2.0, -0.1, -1.0, -0.7], [-0.8, -3.0, -1.5, -0.4, -2.0, 0.0]])
  delta = np.array([[0.1, -0.05, 0.2, 0.0, -0.3, 0.15], [0.05, 2.5, -0.1, 0.02, -0.25, 0.0]])
  mask = np.array([[1.0] * 6, [1.0] * 5 + [0.0]])
  adv = np.array([[1.0] * 6, [-1.0] * 5 + [0.0]])
  official = {
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.28,
    "clip_ratio_c": 10.0,
    "future_kl_clip_ratio": 0.2,
    "future_kl_clip_high_only": True,
    "safety_thresh": 10.0,
  }
  seven_b = {**official, "future_kl_clip_high_only": False, "safety_thresh": 3.0}
  drop = delta.copy()
  drop[1, 3] = 2.4
  cases = [
    (official, 32.0, delta, 0.656378),
    (seven_b, 32.0, delta, 0.428124),
    (official, 2.0, delta, 0.647014),
    (official, 32.0, drop, -1.092692),
  ]
  for knobs, decay, dl, want in cases:
    loss, metrics, grad, _ = _fipo_padded(old + dl, old, adv, mask, knobs, decay)
    np.testing.assert_allclose(loss, want, atol=2e-6)
  loss, metrics, grad, _ = _fipo_padded(old + delta, old, adv, mask, official, 32.0)
  np.testing.assert_allclose(
    grad,
    [
      [-0.111269, -0.086661, -0.117113, -0.090909, -0.067347, -0.122714],
      [0.095570, 0, 0.082258, 0.092746, 0, 0],
    ],
    atol=2e-6,
  )
  np.testing.assert_allclose(metrics["actor/ppo_kl"], -0.210909, atol=2e-6)
  np.testing.assert_allclose(metrics["actor/influence_weights_mean"], 1.029654, atol=2e-6)
  np.testing.assert_allclose(metrics["actor/IW_lower_clip_ratio"], 0.636364, atol=2e-6)


def test_all_masked_batch_gives_zeros_not_nan():
  lp = jnp.asarray(np.random.default_rng(0).normal(size=(4, 37)) * 30, jnp.float32)
  zeros = jnp.zeros((4, 37), jnp.float32)
  for key, ((loss, metrics), grad) in _every_loss_and_grad(lp, zeros, zeros, zeros).items():
    assert float(loss) == 0.0 and not np.asarray(grad).any(), key
    assert all(float(v) == 0.0 for v in metrics.values()), key


def test_no_recompile_for_equal_shapes():
  cfg = {"decay_rate": 16.0, "chunk_size": 8}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(lp, old, adv, mask):
    return jax.value_and_grad(
      lambda x: algo.compute_policy_loss("fipo", x, old, adv, mask, cfg), has_aux=True
    )(lp)

  chex.clear_trace_counter()
  for seed in range(3):
    step(*map(jnp.asarray, _random_batch(seed, b=2, t=9)))


def test_config_defaults_and_validation():
  cfg = losses.PolicyLossConfig.from_config({})
  assert cfg == losses.PolicyLossConfig()
  assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.28, 10.0)
  assert (cfg.decay_rate, cfg.chunk_size, cfg.future_kl_clip_ratio) == (32.0, 128, 0.2)
  assert cfg.future_kl_clip_high_only and cfg.safety_thresh == 10.0
  assert cfg.loss_agg_mode == "token-mean"
  assert hash(cfg) == hash(losses.PolicyLossConfig())  # usable as a static jit argument
  sym = losses.PolicyLossConfig.from_config(
    {"clip_ratio": 0.1, "clip_ratio_low": None, "unrelated": 1}
  )
  assert sym.clip_ratio_low == 0.1 and sym.clip_ratio_high == 0.1
  for bad in (
    {"clip_ratio_c": 1.0},
    {"loss_agg_mode": "mean"},
    {"decay_rate": 0.0},
    {"clip_ratio_high": -0.1},
  ):
    with pytest.raises(ValueError):
      losses.PolicyLossConfig.from_config(bad)
  with pytest.raises(ValueError):
    algo.get_policy_loss("nope")


def test_registry_accepts_new_losses():
  @algo.register_policy_loss("test_zero")
  def zero(log_prob, old_log_prob, advantages, response_mask, cfg):
    return jnp.zeros(()), {}

  assert algo.get_policy_loss("test_zero") is zero
  loss, metrics = algo.compute_policy_loss("test_zero", *[jnp.zeros((1, 2))] * 4, {})
  assert float(loss) == 0.0 and metrics == {}
