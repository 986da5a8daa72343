"""Policy losses chosen by name: 'fipo' (alias 'future_kl'), 'dapo' (aliases 'vanilla', 'grpo').

Every loss takes [B, T] float32 `log_prob` (differentiated), `old_log_prob`, `advantages`
(per-sequence value broadcast over tokens and masked) and `response_mask`, plus a frozen
`PolicyLossConfig`, and returns `(loss f32[], metrics {name: f32[]})`. Metric names are the
official logged ones (`actor/...`). Semantics follow the official verl/FIPO code
(docs/fipo_spec.md §2, §6; tests/testdata/golden/README.md), including its float32 corner cases.

`PolicyLossConfig` holds python scalars, so the losses jit with the config closed over or
passed as a static (hashable) argument. The trainer builds it once from the validated `rc.rl`
(`PolicyLossConfig.from_config`); only the public `compute_policy_loss` accepts a dict, and
converts it there. The registered loss functions only read attributes of `cfg`, and every
numeric knob except `decay_rate`, `chunk_size` and `loss_agg_mode` may also be a traced jax
scalar (pass any object with those attributes), so a sweep over clip ratios, safety thresholds
or weight-clip modes compiles once.

The KL-to-reference term (`kl_penalty`, `kl_loss`, in `algo.kl`, named here too) is verl's
actor-side `use_kl_loss`: it is added to the policy loss by the train step, not by the
registered losses.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.algo import aggregation, fkl
from fipo_jax.algo.kl import KL_TYPES, kl_loss, kl_penalty  # noqa: F401 (the KL term's names)

_LOG_RATIO_CLAMP = 20.0  # official: d = clamp(lp - old, -20, 20) before exp
_SAFETY_RANGE = (0.8, 1.0)  # official safety clamp for A < 0 and r > safety_thresh
_NO_CLIP_WEIGHT_MAX = 10.0  # official weight cap when future_kl_clip_ratio == 0


DEFAULT_LOSS_MODE = "fipo"  # rl.loss_mode's default (the official FIPO run)
HParam = bool | int | float | str  # a registered loss's own hyperparameter: a python scalar


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Flat policy-loss config with the official key names; defaults are the official 32B run.

  These defaults are the only ones: the config schema (`RLSection`) and the recipe base take
  theirs from here. `hparams` holds the own hyperparameters of registered losses (sorted
  (name, value) pairs, so the config stays hashable); a loss reads them as attributes
  (`cfg.my_coef`), like the fields.
  """

  clip_ratio: float = 0.2  # symmetric PPO clip: what from_config gives low/high set to None
  clip_ratio_low: float = 0.2  # eps_low
  clip_ratio_high: float = 0.28  # eps_high (clip-higher)
  clip_ratio_c: float = 10.0  # dual-clip constant c, also the Future-KL filter r <= c
  loss_agg_mode: str = "token-mean"
  decay_rate: float = 32.0  # tau, half-life in tokens: gamma = 2^(-1/tau)
  chunk_size: int = 128  # Future-KL chunk K (does not change results)
  future_kl_clip_ratio: float = 0.2  # eps_f; 0 means f = min(exp F, 10)
  future_kl_clip_high_only: bool = True  # f in [1, 1+eps_f] instead of [1-eps_f, 1+eps_f]
  safety_thresh: float = 10.0  # S: A<0 and r>S clamps f to [0.8, 1]
  hparams: tuple[tuple[str, HParam], ...] = ()  # registered losses' own, see register_policy_loss

  def __post_init__(self):
    if self.clip_ratio_c <= 1.0:
      raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {self.clip_ratio_c}")
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "future_kl_clip_ratio"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.decay_rate <= 0:
      raise ValueError(f"decay_rate must be > 0, got {self.decay_rate}")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
    if self.loss_agg_mode not in aggregation.AGG_MODES:
      raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} not in {aggregation.AGG_MODES}")
    # Every registered hyperparameter is present (with its default when not given): the
    # config a loss receives never lacks one, and equal settings hash equal.
    merged = {**loss_hparams(), **dict(self.hparams)}
    object.__setattr__(self, "hparams", tuple(sorted(merged.items())))

  def __getattr__(self, name: str):
    """A registered loss's own hyperparameter (only called for names that are not fields)."""
    for key, value in self.__dict__.get("hparams", ()):
      if key == name:
        return value
    raise AttributeError(f"PolicyLossConfig has no field or registered hyperparameter {name!r}")

  @classmethod
  def from_config(cls, cfg: Any = None) -> "PolicyLossConfig":
    """The one constructor. `cfg`: None (the defaults), a PolicyLossConfig, a mapping
    (dict / ConfigDict) with flat official keys, or an object holding them as attributes (the
    validated `rc.rl`, read once at setup).

    Mappings: a nested `policy_loss` section, as in verl's actor config, is read too; missing
    keys keep the defaults, unknown keys are ignored, and `clip_ratio_low/high` set to None
    fall back to `clip_ratio`. A registered loss's hyperparameters are read by their names
    (from a section, from its `loss_hparams`).
    """
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    if not hasattr(cfg, "items"):  # a validated section: every field it has is set
      kw = {n: getattr(cfg, n) for n in _FIELDS if hasattr(cfg, n)}
      return cls(**kw, hparams=tuple(dict(getattr(cfg, "loss_hparams", {})).items()))
    flat = dict(cfg.items())
    nested = flat.pop("policy_loss", None)
    if nested is not None and hasattr(nested, "items"):
      flat.update({k: v for k, v in nested.items() if k not in flat})
    kw = {k: v for k, v in flat.items() if k in _FIELDS and v is not None}
    if "clip_ratio" in kw:
      for side in ("clip_ratio_low", "clip_ratio_high"):
        if flat.get(side, None) is None:
          kw[side] = kw["clip_ratio"]
    typed = {f.name: f.type for f in dataclasses.fields(cls)}
    kw = {k: (str(v) if typed[k] is str else typed[k](v)) for k, v in kw.items()}
    hp = {k: type(d)(flat[k]) for k, d in loss_hparams().items() if flat.get(k) is not None}
    return cls(**kw, hparams=tuple(hp.items()))


_FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyLossConfig)) - {"hparams"}

PolicyLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
_REGISTRY: dict[str, PolicyLossFn] = {}
_HPARAMS: dict[str, dict[str, HParam]] = {}  # loss name -> its own {hyperparameter: default}


def register_policy_loss(
  *names: str, hparams: Mapping[str, HParam] | None = None
) -> Callable[[PolicyLossFn], PolicyLossFn]:
  """Decorator: registers `fn(log_prob, old_log_prob, advantages, mask, cfg)` under names.

  `hparams` declares the loss's own hyperparameters with their defaults, e.g.
  `{"pg_scale": 1.0}`: each becomes a config key `rl.pg_scale` (the recipe base lists every
  registered one; `--config.rl.pg_scale=0.5` sets it), typed like its default, and an attribute
  of the `cfg` the loss receives (`cfg.pg_scale`). A name may not shadow a PolicyLossConfig
  field, nor be declared by two losses with different defaults. Register before the config is
  built: a recipe file that imports the module defining the loss is enough.

  A loss that supports rollout correction also takes `rollout_is_weights=None` [B, T]
  (algo/rollout_correction.py); it is passed only when set."""
  hparams = dict(hparams or {})
  for key, default in hparams.items():
    if key in _FIELDS or key == "hparams":
      raise ValueError(f"loss hyperparameter {key!r} shadows a PolicyLossConfig field")
    if not isinstance(default, (bool, int, float, str)):
      raise ValueError(f"loss hyperparameter {key!r}: default must be a python scalar")
    known = loss_hparams()
    if key in known and (type(known[key]), known[key]) != (type(default), default):
      raise ValueError(f"loss hyperparameter {key!r} already declared with default {known[key]!r}")

  def decorator(fn: PolicyLossFn) -> PolicyLossFn:
    for name in names:
      _REGISTRY[name] = fn
      _HPARAMS[name] = hparams
    return fn

  return decorator


def loss_modes() -> tuple[str, ...]:
  """Every registered loss name (the values rl.loss_mode accepts), sorted."""
  return tuple(sorted(_REGISTRY))


def loss_hparams() -> dict[str, HParam]:
  """{hyperparameter: default} of every registered loss's own hyperparameters."""
  return {k: v for name in sorted(_HPARAMS) for k, v in _HPARAMS[name].items()}


def get_policy_loss(name: str) -> PolicyLossFn:
  if name not in _REGISTRY:
    raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def compute_policy_loss(loss_mode, log_prob, old_log_prob, advantages, response_mask, cfg=None,
                        rollout_is_weights=None):
  """Runs the registered loss `loss_mode` on [B, T] inputs; returns (loss f32[], metrics).

  `cfg`: dict, ConfigDict or PolicyLossConfig with the official flat keys (missing keys take
  the official 32B values); a mapping is converted here, at the public boundary (the trainer
  passes its PolicyLossConfig). The loss is the unscaled per-micro-batch aggregate; see
  `aggregation.microbatch_scale` for verl's micro-batch scaling. `rollout_is_weights` [B, T]
  (detached; None = off): verl's rollout correction, multiplying the per-token policy loss.
  """
  shape = log_prob.shape
  if len(shape) != 2 or any(a.shape != shape for a in (old_log_prob, advantages, response_mask)):
    raise ValueError("log_prob, old_log_prob, advantages, response_mask must all be [B, T]")
  fn = get_policy_loss(loss_mode)
  return fn(
    log_prob.astype(jnp.float32),
    old_log_prob.astype(jnp.float32),
    advantages.astype(jnp.float32),
    response_mask,
    PolicyLossConfig.from_config(cfg),
    **weights_kwarg(rollout_is_weights),
  )


def weights_kwarg(rollout_is_weights) -> dict[str, Any]:
  """{'rollout_is_weights': w}, or {} for None, so a registered loss that takes no weights
  still runs without them."""
  return {} if rollout_is_weights is None else {"rollout_is_weights": rollout_is_weights}


def _log_ratio(log_prob, old_log_prob):
  d = aggregation.torch_clamp(log_prob - old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  return d, jnp.exp(d)


def _dual_clip_terms(adv_w, ratio, low, high, c=None):
  """verl's PPO surrogate on weighted advantages [B, T]: clip to [1-low, 1+high], then (if c
  is given) the dual clip min(., -A c) on negative advantages."""
  clipped = aggregation.torch_clamp(ratio, 1.0 - low, 1.0 + high)
  t = {"pg_losses1": -adv_w * ratio, "pg_losses2": -adv_w * clipped}
  t["clip_pg_losses1"] = jnp.maximum(t["pg_losses1"], t["pg_losses2"])
  if c is None:
    t["pg_losses"] = t["clip_pg_losses1"]
    return t
  t["pg_losses3"] = -adv_w * c
  t["clip_pg_losses2"] = jnp.minimum(t["pg_losses3"], t["clip_pg_losses1"])
  t["pg_losses"] = jnp.where(adv_w < 0, t["clip_pg_losses2"], t["clip_pg_losses1"])
  return t


def _standard_metric_terms(t, d, advantages) -> dict[str, jax.Array]:
  """[B, T] per-token terms whose masked means are the standard PPO metrics."""
  m = {"actor/pg_clipfrac": t["pg_losses2"] > t["pg_losses1"], "actor/ppo_kl": -d}
  if "pg_losses3" in t:
    m["actor/pg_clipfrac_lower"] = (t["clip_pg_losses1"] > t["pg_losses3"]) & (advantages < 0)
  return m


def _weighted(pg_losses: jax.Array, rollout_is_weights: jax.Array | None) -> jax.Array:
  """verl: `pg_losses * rollout_is_weights` before aggregation (None: unchanged)."""
  return pg_losses if rollout_is_weights is None else pg_losses * rollout_is_weights


def _standard_metrics(t, d, advantages, mask) -> dict[str, jax.Array]:
  m = aggregation.masked_means(_standard_metric_terms(t, d, advantages), mask)
  m.setdefault("actor/pg_clipfrac_lower", jnp.zeros((), jnp.float32))
  return m


@register_policy_loss("dapo", "vanilla", "grpo")
def dapo_loss(log_prob, old_log_prob, advantages, response_mask, cfg: PolicyLossConfig,
              rollout_is_weights=None):
  """verl's 'vanilla' PPO loss: clip [1-eps_low, 1+eps_high] plus dual clip c on A < 0.

  Also 'grpo': verl has no GRPO policy loss of its own; GRPO (and DAPO) runs use 'vanilla',
  which reads clip_ratio_low/high and clip_ratio_c. They differ in advantages, sampling and
  aggregation, not here.
  """
  d, ratio = _log_ratio(log_prob, old_log_prob)
  t = _dual_clip_terms(advantages, ratio, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
  pg_losses = _weighted(t["pg_losses"], rollout_is_weights)
  loss = aggregation.agg_loss(pg_losses, response_mask, cfg.loss_agg_mode)
  return loss, {"actor/pg_loss": loss, **_standard_metrics(t, d, advantages, response_mask)}


def influence_weight_bounds(cfg) -> tuple[jax.Array, jax.Array]:
  """(lo, hi) of the influence-weight clip: [1, 1+e] high-only, [1-e, 1+e] symmetric, and
  [0, 10] when e == 0 (official `min(exp F, 10)`; exp F >= 0 so the 0 floor changes nothing)."""
  e = jnp.float32(cfg.future_kl_clip_ratio)
  no_clip = e == 0
  lo = jnp.where(no_clip, 0.0, jnp.where(cfg.future_kl_clip_high_only, 1.0, 1.0 - e))
  return lo, jnp.where(no_clip, _NO_CLIP_WEIGHT_MAX, 1.0 + e)


def fipo_terms(log_prob, old_log_prob, advantages, response_mask, cfg: PolicyLossConfig):
  """Every per-token FIPO intermediate, named as in the golden files ([B, T], [B] for rows)."""
  mask = response_mask.astype(bool)
  d, ratio = _log_ratio(log_prob, old_log_prob)
  t = {"negative_approx_kl": d, "ratio": ratio}
  # Filter tokens with r > c out of the Future-KL sum, for either advantage sign.
  t["participation_mask"] = d <= jnp.log(jnp.float32(cfg.clip_ratio_c))
  d_sg = jax.lax.stop_gradient(d)  # f is detached, so F needs no gradient at all
  t["kl_response"] = jnp.where(mask & t["participation_mask"], d_sg, 0.0)
  t["future_kl"] = fkl.future_kl(
    t["kl_response"], mask, decay_rate=cfg.decay_rate, chunk_size=cfg.chunk_size
  )
  t["raw_influence_weights"] = jnp.exp(t["future_kl"])
  t["influence_weights_pre_safety"] = jnp.clip(
    t["raw_influence_weights"], *influence_weight_bounds(cfg)
  )
  f = t["influence_weights_pre_safety"]
  t["safety_mask"] = (advantages < 0) & (ratio > cfg.safety_thresh)
  f = jnp.where(t["safety_mask"], jnp.clip(f, *_SAFETY_RANGE), f)
  t["influence_weights"] = jax.lax.stop_gradient(f)
  t["weighted_advantages"] = advantages * t["influence_weights"]
  t.update(
    _dual_clip_terms(
      t["weighted_advantages"],
      ratio,
      cfg.clip_ratio_low,
      cfg.clip_ratio_high,
      cfg.clip_ratio_c,
    )
  )
  # Drop a whole sequence with more than one dual-clipped negative token.
  t["lower_clip_mask"] = (advantages < 0) & (t["clip_pg_losses1"] > t["pg_losses3"]) & mask
  # float32 row count (exact below 2^24 tokens): an int32 row sum lowers to slow reduce-windows
  # on XLA:CPU.
  t["seq_valid_mask"] = jnp.sum(t["lower_clip_mask"].astype(jnp.float32), axis=-1) <= 1.0
  t["final_mask"] = mask & t["seq_valid_mask"][:, None]
  return t


_NEG, _POS = 0, 1
_NEG_QS = {"max": 1.0, "p995": 0.995, "p999": 0.999, "p75": 0.75}
_POS_QS = {
  "max": 1.0,
  "median": 0.5,
  "p75": 0.75,
  "p995": 0.995,
  "p999": 0.999,
  "p25": 0.25,
  "min": 0.0,
}


def _fipo_metrics(t, advantages, response_mask, cfg: PolicyLossConfig) -> dict[str, jax.Array]:
  """Official FIPO metrics plus the standard ones; all over `response_mask`, dropped sequences
  included."""
  mask = response_mask.astype(bool)
  f, raw, ratio = t["influence_weights"], t["raw_influence_weights"], t["ratio"]
  lo, hi = influence_weight_bounds(cfg)
  neg = (advantages < 0) & mask
  pos = (advantages > 0) & mask
  terms = _standard_metric_terms(t, t["negative_approx_kl"], advantages)
  terms.update(
    {
      "actor/influence_weights_mean": f,
      "actor/IW_upper_clip_ratio": f >= hi - np.float32(1e-7),
      "actor/IW_lower_clip_ratio": f <= lo + np.float32(1e-7),
      "actor/influence_weights_mean_raw": raw,
      "actor/neg_ratio_2_3": neg & (ratio >= 2.0) & (ratio < 3.0),
      "actor/neg_ratio_3_4": neg & (ratio >= 3.0) & (ratio < 4.0),
      "actor/neg_ratio_4_10": neg & (ratio >= 4.0) & (ratio < cfg.clip_ratio_c),
      "actor/pos_mini_frac": pos & (ratio < 1e-3),
    }
  )
  m = aggregation.masked_means(terms, mask)
  m["actor/IW_overall_clip_ratio"] = m["actor/IW_upper_clip_ratio"] + m["actor/IW_lower_clip_ratio"]
  ext = aggregation.masked_extrema({"f": f, "raw": raw}, mask)
  m["actor/influence_weights_min"], m["actor/influence_weights_max"] = ext["f"]
  m["actor/raw_influence_weights_min"], m["actor/raw_influence_weights_max"] = ext["raw"]
  group = jnp.where(neg, _NEG, jnp.where(pos, _POS, 2)).astype(jnp.int32).reshape(-1)
  qs = aggregation.grouped_quantiles(
    ratio.reshape(-1), group, {_NEG: tuple(_NEG_QS.values()), _POS: tuple(_POS_QS.values())}
  )
  m.update({f"actor/neg_is_{k}": v for k, v in zip(_NEG_QS, qs[_NEG], strict=True)})
  m.update({f"actor/pos_is_{k}": v for k, v in zip(_POS_QS, qs[_POS], strict=True)})
  return m


@register_policy_loss("fipo", "future_kl")
def fipo_loss(log_prob, old_log_prob, advantages, response_mask, cfg: PolicyLossConfig,
              rollout_is_weights=None):
  """FIPO: DAPO surrogate on A * f, f = clip(exp(Future-KL)) detached, with sequence drop."""
  t = fipo_terms(log_prob, old_log_prob, advantages, response_mask, cfg)
  # agg_loss(pg_losses, final_mask) from row sums over response_mask with dropped rows zeroed:
  # the same value, without a [B, T] final mask.
  valid = t["seq_valid_mask"]
  pg_losses = _weighted(t["pg_losses"], rollout_is_weights)
  row_sum = aggregation.masked_sum(pg_losses, response_mask, axis=-1)
  row_count = jnp.sum(response_mask.astype(jnp.float32), axis=-1)
  loss = aggregation.agg_rows(
    jnp.where(valid, row_sum, 0.0),
    jnp.where(valid, row_count, 0.0),
    log_prob.shape[-1],
    cfg.loss_agg_mode,
  )
  metrics = {"actor/pg_loss": loss}
  metrics.update(_fipo_metrics(t, advantages, response_mask, cfg))
  return loss, metrics
