"""Validate a run's ConfigDict once, at the boundary, into frozen dataclasses.

`validate(config)` is called by the trainer before anything is compiled. It turns every config
section into a frozen dataclass whose `__post_init__` checks its values, and raises `ConfigError`
with one line naming the field, e.g.

  rl.clip_ratio_low: must be <= rl.clip_ratio_high (0.28), got 0.3

The dataclass fields ARE the schema: an unknown key is an error (a typo must not be silently
ignored), a missing key takes the field's default. `fipo_jax.recipes.base()` lists every field
with a comment. The mesh sections live in `fipo_jax.config_mesh`, the mapping-to-dataclass
machinery in `fipo_jax.config_schema`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fipo_jax import config_rl, config_rollout, config_schema, paths
from fipo_jax.config_mesh import MeshSection, SamplerMeshSection
from fipo_jax.config_rl import RLSection, SFTSection
from fipo_jax.config_rollout import RolloutSection
from fipo_jax.config_schema import DTYPES, ConfigError, Section

# Enum values of settings whose owners sit above this module (rl/, data/, metrics): restated
# here, and tests/test_config_enums.py checks that each agrees with its owner. The algorithm's
# (loss modes, aggregation modes, KL types, rollout-correction modes) come from fipo_jax.algo.
TRUNCATIONS = ("left", "error", "drop")
TASKS = ("verl", "synthetic", "auto")
SYNTHETIC_KINDS = ("arith", "copy", "parity")
SCHEDULES = ("constant", "cosine")
METRIC_BACKENDS = ("jsonl", "tensorboard", "wandb")  # fipo_jax.metrics, fipo_jax.wandb_backend


# ModelConfig fields that shape the parameters: an HF directory's config.json defines them.
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
               "num_heads", "num_kv_heads", "head_dim", "qkv_bias", "qk_norm",
               "tie_word_embeddings")
# ModelConfig fields with their own model.* key.
EXEC_FIELDS = ("param_dtype", "dtype", "attention_impl", "remat_policy")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
  """The model. Validated `overrides` are the ones that apply: `preset_overrides` (on the
  preset only, e.g. runlocal's tiny model) are merged into them when `hf_dir` is unset."""

  SECTION: ClassVar[str] = "model"
  preset: str | None = None
  hf_dir: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  preset_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  attention_impl: str = "auto"
  remat_policy: str = "none"
  tokenizer_dir: str | None = None

  def __post_init__(self):
    if not self.preset and not self.hf_dir:
      self._fail("preset", "set model.preset or model.hf_dir")
    self._one_of("param_dtype", DTYPES)
    self._one_of("dtype", DTYPES)
    for name in ("overrides", "preset_overrides"):
      self._check_override_keys(name)
    if self.hf_dir:  # the directory's config.json fixes the shapes its weights have
      arch = [k for k in self.overrides if k in ARCH_FIELDS]
      if arch:
        self._fail("overrides", f"{arch[0]}={self.overrides[arch[0]]!r} would change the "
                   f"architecture of model.hf_dir {self.hf_dir} (its config.json defines it); "
                   f"drop it, or unset model.hf_dir to use model.preset")
      merged = dict(self.overrides)
    else:
      merged = {**self.overrides, **self.preset_overrides}
    object.__setattr__(self, "overrides", types.MappingProxyType(merged))
    object.__setattr__(self, "preset_overrides",
                       types.MappingProxyType(dict(self.preset_overrides)))

  def _check_override_keys(self, name: str) -> None:
    fields = _model_config_fields()
    for key in getattr(self, name):
      if key in EXEC_FIELDS:
        self._fail(f"{name}.{key}", f"set model.{key} instead")
      if fields is not None and key not in fields:
        self._fail(f"{name}.{key}", f"not a ModelConfig field; known: {sorted(fields)}")


@dataclasses.dataclass(frozen=True)
class SyntheticSection(Section):
  SECTION: ClassVar[str] = "data.synthetic"
  kind: str = "arith"
  num_train: int = 2000
  num_val: int = 64
  min_digits: int = 1
  max_digits: int = 2
  num_operands: int = 2
  ops: str = "+"
  seed: int = 0

  def __post_init__(self):
    self._one_of("kind", SYNTHETIC_KINDS)
    self._require(self.num_train > 0, "num_train", "must be > 0")
    self._require(self.num_val > 0, "num_val", "must be > 0")
    self._require(self.min_digits >= 1, "min_digits", "must be >= 1")
    self._require(self.max_digits >= self.min_digits, "max_digits",
                  f"must be >= data.synthetic.min_digits ({self.min_digits})")
    self._require(self.num_operands >= 2, "num_operands", "must be >= 2")
    self._require(bool(self.ops) and set(self.ops) <= set("+-*"), "ops",
                  "must be a non-empty string over '+-*'")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
  SECTION: ClassVar[str] = "data"
  task: str = "verl"
  train_files: tuple[str, ...] = ()
  val_files: tuple[str, ...] = ()
  prompt_key: str = "prompt"
  max_prompt_length: int = 2048
  shuffle: bool = True
  shuffle_seed: int = 1
  apply_chat_template: bool = True
  truncation: str = "left"
  synthetic: SyntheticSection = dataclasses.field(default_factory=SyntheticSection)

  def __post_init__(self):
    self._one_of("task", TASKS)
    if self.task == "auto":  # runlocal: the given files, else the synthetic task
      object.__setattr__(self, "task", "verl" if self.train_files else "synthetic")
    for name in ("train_files", "val_files"):
      if self.task == "synthetic" and getattr(self, name):
        self._fail(name, "must be empty for task 'synthetic' (it writes its own data); "
                   f"set data.task=verl to use {getattr(self, name)}")
    self._one_of("truncation", TRUNCATIONS)
    self._require(self.max_prompt_length > 0, "max_prompt_length", "must be > 0")
    self._require(bool(self.prompt_key), "prompt_key", "must be non-empty")
    if self.task == "verl":
      self._require(len(self.train_files) > 0, "train_files", "must list >= 1 file for task 'verl'")


@dataclasses.dataclass(frozen=True)
class SamplingSection(Section):
  SECTION: ClassVar[str] = "sampling"
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1
  num_slots: int = 256
  decode_steps_per_call: int = 64
  refill_fraction: float = 0.125

  def __post_init__(self):
    _check_sampling(self)
    self._require(self.num_slots > 0, "num_slots", "must be > 0")
    self._require(self.decode_steps_per_call > 0, "decode_steps_per_call", "must be > 0")
    self._require(0.0 < self.refill_fraction <= 1.0, "refill_fraction", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
  SECTION: ClassVar[str] = "eval"
  n: int = 32
  temperature: float = 1.0
  top_p: float = 0.7
  top_k: int = -1
  max_prompts: int = -1

  def __post_init__(self):
    _check_sampling(self)
    self._require(self.n >= 1, "n", "must be >= 1")
    self._require(self.max_prompts == -1 or self.max_prompts > 0, "max_prompts",
                  "must be -1 (all) or > 0")


def _check_sampling(s) -> None:
  s._require(s.temperature > 0.0, "temperature", "must be > 0")
  s._require(0.0 < s.top_p <= 1.0, "top_p", "must be in (0, 1]")
  s._require(s.top_k == -1 or s.top_k > 0, "top_k", "must be -1 (off) or > 0")


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
  SECTION: ClassVar[str] = "optim"
  lr: float = 1e-6
  warmup_steps: int = 10
  schedule: str = "constant"
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    self._one_of("schedule", SCHEDULES)
    self._require(self.lr > 0.0, "lr", "must be > 0")
    self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    self._require(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")
    self._require(self.grad_clip >= 0.0, "grad_clip", "must be >= 0 (0 = off)")
    self._require(0.0 <= self.b1 < 1.0, "b1", "must be in [0, 1)")
    self._require(0.0 <= self.b2 < 1.0, "b2", "must be in [0, 1)")
    self._require(self.eps > 0.0, "eps", "must be > 0")


@dataclasses.dataclass(frozen=True)
class MetricsSection(Section):
  """Where metrics go: WORKDIR/metrics.jsonl, WORKDIR/tensorboard, Weights & Biases."""

  SECTION: ClassVar[str] = "metrics"
  backends: tuple[str, ...] = ("jsonl", "tensorboard")
  wandb_project: str = "fipo_jax"
  wandb_entity: str | None = None
  wandb_name: str | None = None
  wandb_group: str | None = None
  wandb_tags: tuple[str, ...] = ()

  def __post_init__(self):
    self._require(len(self.backends) > 0, "backends", f"must name >= 1 of {METRIC_BACKENDS}")
    self._require(set(self.backends) <= set(METRIC_BACKENDS), "backends",
                  f"must all be in {METRIC_BACKENDS}")
    self._require(len(set(self.backends)) == len(self.backends), "backends", "has a duplicate")
    if "wandb" in self.backends:
      self._require(bool(self.wandb_project), "wandb_project", "must be non-empty")
      if importlib.util.find_spec("wandb") is None:
        self._fail("backends", "'wandb' needs the wandb package: pip install 'fipo_jax[wandb]'")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
  """The whole validated run config; sections are attributes (`cfg.rl.n`)."""

  SECTION: ClassVar[str] = ""
  # Sections have no defaults: validate() builds a missing one from its own field defaults.
  model: ModelSection
  data: DataSection
  rl: RLSection
  sampling: SamplingSection
  eval: EvalSection
  optim: OptimSection
  mesh: MeshSection
  sampler_mesh: SamplerMeshSection
  sft: SFTSection
  metrics: MetricsSection
  rollout: RolloutSection
  seed: int = 0
  total_steps: int = 600
  eval_every: int = 5
  checkpoint_every: int = 5
  log_every: int = 1
  dump_influence: bool = False
  dump_max_rows: int = 64
  keep_checkpoints: int = 3
  max_consecutive_bad_steps: int = 3

  def __post_init__(self):
    self._require(self.total_steps >= 0, "total_steps", "must be >= 0")
    self._require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 = never)")
    self._require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = never)")
    self._require(self.log_every >= 1, "log_every", "must be >= 1")
    self._require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    self._require(self.dump_max_rows >= 1, "dump_max_rows", "must be >= 1 (responses per dump)")
    self._require(self.max_consecutive_bad_steps >= 1, "max_consecutive_bad_steps",
                  "must be >= 1")
    # Cross-section checks.
    if self.eval_every > 0 and self.data.task == "verl" and not self.data.val_files:
      raise ConfigError("data.val_files", f"is empty but eval_every={self.eval_every} evaluates "
                        "on it: list val files, or set eval_every=0")
    if self.optim.schedule == "cosine" and self.total_updates - 1 <= self.optim.warmup_steps:
      raise ConfigError("optim.warmup_steps", f"must be < the run's last optimizer update "
                        f"({self.total_updates - 1}: total_steps x rl.num_mini_batches x "
                        f"rl.ppo_epochs - 1) for optim.schedule='cosine' to decay, got "
                        f"{self.optim.warmup_steps}")
    if self.rl.use_dynamic_bsz:
      need = self.data.max_prompt_length + self.rl.max_response_length
      if self.rl.ppo_max_token_len_per_device < need:
        raise ConfigError("rl.ppo_max_token_len_per_device",
                          f"must be >= data.max_prompt_length + rl.max_response_length ({need}) "
                          f"so one sequence fits a micro-batch, got "
                          f"{self.rl.ppo_max_token_len_per_device}")
    if self.rl.old_log_prob_source == "sampler" and not self.rl.accept_sampler_mismatch:
      from fipo_jax.models import attention  # noqa: PLC0415 (lazy: config stays import-light)

      why = attention.sampler_mismatch(self.model.dtype, self.rl.sampler_dtype,
                                       self.model.attention_impl)
      if why:
        raise ConfigError("rl.old_log_prob_source",
                          f"'sampler' needs the sampler to compute as the trainer does, but {why}; "
                          "set rl.accept_sampler_mismatch=True to accept it")
    config_rollout.check(self)
    if self.model.preset:
      presets = _model_presets()
      if presets is not None and self.model.preset not in presets:
        raise ConfigError("model.preset",
                          f"unknown preset {self.model.preset!r}; known: {sorted(presets)}")

  @property
  def total_updates(self) -> int:
    """Optimizer updates of the whole run, the unit of the lr schedule (fipo_jax.rl.optimizer)."""
    return self.total_steps * self.rl.num_mini_batches * self.rl.ppo_epochs


def _model_config_fields() -> frozenset[str] | None:
  """The field names of fipo_jax.models.ModelConfig (imported lazily), or None without it."""
  try:
    from fipo_jax.models import config as model_config  # noqa: PLC0415
  except ImportError:
    return None
  return frozenset(f.name for f in dataclasses.fields(model_config.ModelConfig))


def _model_presets() -> Mapping[str, Any] | None:
  """fipo_jax.models.PRESETS if the model package provides it (imported lazily)."""
  try:
    from fipo_jax.models import presets  # noqa: PLC0415 (lazy: keeps validate() import-light)
  except ImportError:
    return None
  return getattr(presets, "PRESETS", None)


def schema() -> dict[str, Any]:
  """The accepted keys: {'seed': default, ..., 'rl': {'n': default, ...}, ...}; a registered
  loss's own hyperparameters are rl keys (validation gathers them into rl.loss_hparams)."""
  out = config_schema.schema_of(RunConfig)
  out["rl"].pop("loss_hparams")
  out["rl"].update(config_rl.loss_hparams())
  return out


def validate(config: Any, *, num_devices: int | None = None, num_processes: int = 1,
             check_paths: bool = True) -> RunConfig:
  """ConfigDict (or nested dict) -> RunConfig, raising ConfigError on the first bad field.

  Args:
    config: the run config (`ml_collections.ConfigDict` or a plain nested dict).
    num_devices: if given, the mesh sizes (and the sampler mesh's, when set) must multiply to
      it (-1 filled in); with rollout.mode='disaggregated', to the trainer's and the sampler's
      shares of it (`num_processes` processes, each split alike).
    check_paths: check that model/tokenizer dirs and data files exist (off for recipe tests on
      machines without the data).
  """
  cfg = config_schema.build(RunConfig, config_rl.gather_loss_hparams(to_dict(config)))
  if num_devices is not None:
    trainer_devices, sampler_devices = cfg.rollout.device_counts(num_devices, num_processes)
    cfg.mesh.resolve(trainer_devices)
    cfg.sampler_mesh.resolve(sampler_devices)
    from fipo_jax.models import kernels  # noqa: PLC0415 (lazy: config stays import-light)
    if why := kernels.unsupported(cfg.model.attention_impl, kernels.platform_of()):
      raise ConfigError("model.attention_impl", why)
  if check_paths:
    _check_paths(cfg)
  return cfg


def to_dict(config: Any) -> dict[str, Any]:
  """The config as the nested dict that validate() reads and WORKDIR/config.json stores:
  model.param_dtype / model.dtype given as jnp or numpy dtypes (the JAX habit) become names."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  model = raw.get("model")
  if not isinstance(model, Mapping):
    return raw
  model = dict(model)
  for key in ("param_dtype", "dtype"):
    value = model.get(key)
    if value is not None and not isinstance(value, str):
      try:
        model[key] = np.dtype(value).name
      except TypeError:
        pass  # left to the type check, which names the field
  return {**raw, "model": model}


def _check_paths(cfg: RunConfig) -> None:
  if cfg.data.task == "verl" and not (cfg.model.tokenizer_dir or cfg.model.hf_dir):
    raise ConfigError("model.tokenizer_dir",
                      "task 'verl' needs a tokenizer: set model.tokenizer_dir or model.hf_dir")
  for name in ("hf_dir", "tokenizer_dir"):
    path = getattr(cfg.model, name)
    if path and not paths.isdir(path):  # local or gs://
      raise ConfigError(f"model.{name}", f"directory not found: {path}")
  if cfg.model.hf_dir and not paths.isfile(paths.join(cfg.model.hf_dir, "config.json")):
    raise ConfigError("model.hf_dir", f"no config.json in {cfg.model.hf_dir}")
  if cfg.data.task == "verl":
    for name in ("train_files", "val_files"):
      for path in getattr(cfg.data, name):
        if not paths.isfile(path):
          raise ConfigError(f"data.{name}", f"file not found: {path}")
