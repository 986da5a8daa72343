"""Recipes against the spec tables (docs/fipo_spec.md §4, §5.1, §5.3 Tables 2-3); config checks."""

import importlib
import json

import pytest

from fipo_jax import config as config_lib

RECIPES = ("fipo_qwen2_5_32b", "dapo_qwen2_5_32b", "fipo_qwen2_5_7b_math",
           "dapo_qwen2_5_7b_math", "grpo_qwen2_5_7b_math", "tiny_cpu")

# Written from docs/fipo_spec.md §5.3 (Tables 2 and 3) and §5.1 (the 32B launchers). Keys: dotted
# config paths; every recipe must match its column exactly.
_SHARED = {  # rows identical in all four paper columns
  "rl.train_batch_size": 512, "optim.lr": 1e-6, "optim.schedule": "constant",
  "optim.warmup_steps": 10, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
  "data.max_prompt_length": 2048, "sampling.temperature": 1.0, "sampling.top_p": 1.0,
  "rl.clip_ratio_c": 10.0, "rl.clip_ratio_low": 0.2, "rl.clip_ratio_high": 0.28,
  "rl.kl_loss_coef": 0.0, "rl.use_kl_loss": False, "rl.entropy_coeff": 0.0,
  "rl.loss_agg_mode": "token-mean", "rl.ppo_epochs": 1, "rl.filter_groups_enable": True,
  "rl.filter_groups_metric": "acc", "rl.max_num_gen_batches": 10,
  "rl.norm_adv_by_std_in_grpo": True, "rl.overlong_buffer_enable": True,
  "rl.overlong_penalty_factor": 1.0, "rl.reward_fn": "math_dapo", "eval.temperature": 1.0,
  "eval.top_p": 0.7, "data.truncation": "left", "data.prompt_key": "prompt",
}
SPEC = {
  "fipo_qwen2_5_32b": {
    **_SHARED, "model.preset": "qwen2.5-32b", "rl.loss_mode": "fipo", "rl.n": 16,
    "rl.max_response_length": 20480, "rl.overlong_buffer_len": 4096,
    "rl.ppo_mini_batch_size": 64, "rl.gen_batch_size": 2048, "rl.decay_rate": 32.0,
    "rl.chunk_size": 128, "rl.future_kl_clip_ratio": 0.2, "rl.future_kl_clip_high_only": True,
    "rl.safety_thresh": 10.0, "rl.use_dynamic_bsz": True,
    "rl.ppo_max_token_len_per_device": 22528, "sampling.top_k": -1, "eval_every": 5,
    "checkpoint_every": 5,
  },
  "dapo_qwen2_5_32b": {
    **_SHARED, "model.preset": "qwen2.5-32b", "rl.loss_mode": "dapo", "rl.n": 16,
    "rl.max_response_length": 20480, "rl.overlong_buffer_len": 4096,
    "rl.ppo_mini_batch_size": 32, "rl.gen_batch_size": 1536, "rl.use_dynamic_bsz": True,
    "rl.ppo_max_token_len_per_device": 22528,
  },
  "fipo_qwen2_5_7b_math": {
    **_SHARED, "model.preset": "qwen2.5-math-7b", "rl.loss_mode": "fipo", "rl.n": 32,
    "rl.max_response_length": 10240, "rl.overlong_buffer_len": 2048,
    "rl.ppo_mini_batch_size": 64, "rl.decay_rate": 32.0, "rl.future_kl_clip_ratio": 0.2,
    "rl.future_kl_clip_high_only": False, "rl.safety_thresh": 3.0,
  },
  "dapo_qwen2_5_7b_math": {
    **_SHARED, "model.preset": "qwen2.5-math-7b", "rl.loss_mode": "dapo", "rl.n": 16,
    "rl.max_response_length": 8192, "rl.overlong_buffer_len": 4096,
    "rl.ppo_mini_batch_size": 32,
  },
}


def _get(cfg, dotted):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def _recipe(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_matches_spec_table(name):
  cfg = _recipe(name)
  wrong = {k: (_get(cfg, k), v) for k, v in SPEC[name].items() if _get(cfg, k) != v}
  assert not wrong, f"{name}: (got, spec) {wrong}"


def test_fipo_32b_batch_arithmetic():
  rc = config_lib.validate(_recipe("fipo_qwen2_5_32b"), check_paths=False)
  assert rc.rl.num_mini_batches == 8  # FIPO active on mini-batches 2-8
  assert rc.rl.train_batch_size * rc.rl.n == 8192
  assert rc.rl.ppo_max_token_len_per_device == rc.data.max_prompt_length + \
    rc.rl.max_response_length
  expected_len = rc.rl.max_response_length - rc.rl.overlong_buffer_len
  assert expected_len == 16384
  assert config_lib.validate(_recipe("dapo_qwen2_5_32b"), check_paths=False).rl \
    .num_mini_batches == 16


def test_grpo_baseline():
  rc = config_lib.validate(_recipe("grpo_qwen2_5_7b_math"), check_paths=False)
  assert rc.rl.loss_mode == "grpo"
  assert rc.rl.clip_ratio_low == rc.rl.clip_ratio_high == 0.2
  assert not rc.rl.filter_groups_enable and not rc.rl.overlong_buffer_enable
  assert rc.rl.use_kl_loss and rc.rl.kl_loss_coef > 0


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_recipe_validates_and_lists_the_whole_schema(name, arg):
  cfg = _recipe(name, arg)
  rc = config_lib.validate(cfg, num_devices=8, check_paths=False)
  assert isinstance(rc, config_lib.RunConfig)

  def keys(tree, prefix=""):
    out = set()
    for k, v in tree.items():
      if isinstance(v, dict) and k not in ("overrides", "preset_overrides"):
        out |= keys(v, f"{prefix}{k}.")
      else:
        out.add(prefix + k)
    return out

  # Recipes spell out every schema field (nothing silently defaulted).
  assert keys(cfg.to_dict()) == keys(config_lib.schema())
  doc = importlib.import_module(f"configs.{name}").__doc__
  assert f"python -m fipo_jax.main --config configs/{name}.py" in doc


@pytest.mark.parametrize("name", RECIPES)
def test_runlocal_is_small_and_keeps_fipo_active(name):
  rc = config_lib.validate(_recipe(name, "runlocal"), num_devices=8)  # paths checked too
  assert rc.data.task == "synthetic"
  assert rc.model.overrides["hidden_size"] <= 64
  # tiny_cpu answers take 13 tokens and its overlong buffer 4 more: 32 is still laptop-small.
  assert rc.rl.max_response_length <= 32 and rc.rl.train_batch_size * rc.rl.n <= 64
  if name != "tiny_cpu":  # the Qwen2.5 chat template around a DAPO-Math prompt: <= 200 tokens
    assert rc.data.max_prompt_length >= 256
  assert rc.rl.num_mini_batches >= 2
  full = config_lib.validate(_recipe(name), check_paths=False)
  for k in ("loss_mode", "clip_ratio_low", "clip_ratio_high", "future_kl_clip_high_only",
            "safety_thresh"):
    assert getattr(rc.rl, k) == getattr(full.rl, k), k


def test_unknown_recipe_arg():
  with pytest.raises(ValueError, match="unknown config arg"):
    _recipe("tiny_cpu", "runglobal")


def _err(mutate, **kw):
  cfg = _recipe("tiny_cpu")
  mutate(cfg)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg, **kw)
  msg = str(info.value)
  assert "\n" not in msg
  return msg


@pytest.mark.parametrize("mutate, field, fragment", [
  (lambda c: setattr(c.rl, "clip_ratio_low", 0.3), "rl.clip_ratio_low", "<= rl.clip_ratio_high"),
  (lambda c: setattr(c.rl, "clip_ratio_high", -0.1), "rl.clip_ratio_high", "must be >= 0"),
  (lambda c: setattr(c.rl, "clip_ratio_c", 1.0), "rl.clip_ratio_c", "> 1.0"),
  (lambda c: setattr(c.rl, "train_batch_size", 18), "rl.train_batch_size", "divisible"),
  (lambda c: setattr(c.rl, "gen_batch_size", 8), "rl.gen_batch_size", ">= rl.train_batch_size"),
  (lambda c: setattr(c.rl, "loss_mode", "ppo"), "rl.loss_mode", "one of"),
  (lambda c: setattr(c.rl, "n", 1), "rl.n", ">= 2"),
  (lambda c: setattr(c.rl, "future_kl_clip_ratio", 1.5), "rl.future_kl_clip_ratio", "< 1"),
  (lambda c: setattr(c.rl, "overlong_buffer_len", c.rl.max_response_length),
   "rl.overlong_buffer_len", "in (0,"),
  (lambda c: c.rl.update(use_dynamic_bsz=True, ppo_max_token_len_per_device=32),
   "rl.ppo_max_token_len_per_device", ">= data.max_prompt_length + rl.max_response_length"),
  (lambda c: setattr(c.data, "truncation", "right"), "data.truncation", "one of"),
  (lambda c: setattr(c.data.synthetic, "max_digits", 0), "data.synthetic.max_digits", ">="),
  (lambda c: setattr(c.optim, "schedule", "linear"), "optim.schedule", "one of"),
  (lambda c: setattr(c.optim, "lr", 0.0), "optim.lr", "> 0"),
  (lambda c: setattr(c.sampling, "top_p", 0.0), "sampling.top_p", "(0, 1]"),
  (lambda c: setattr(c.sampling, "refill_fraction", 0.0), "sampling.refill_fraction", "(0, 1]"),
  (lambda c: setattr(c.eval, "n", 0), "eval.n", ">= 1"),
  (lambda c: setattr(c.model, "dtype", "fp8"), "model.dtype", "one of"),
  (lambda c: setattr(c.model, "preset", "qwen9-1t"), "model.preset", "unknown preset"),
  (lambda c: c.model.update(preset=None, hf_dir=None), "model.preset", "model.hf_dir"),
  (lambda c: setattr(c, "log_every", 0), "log_every", ">= 1"),
  (lambda c: setattr(c.mesh, "tensor", -1), "mesh.tensor", "at most one"),
  (lambda c: c.mesh.update(data=-1, fsdp=-1), "mesh.data", "at most one"),
  (lambda c: c.model.overrides.update(hidden=8), "model.overrides.hidden",
   "not a ModelConfig field"),
  (lambda c: setattr(c.model.overrides, "dtype", "float32"), "model.overrides.dtype",
   "set model.dtype instead"),
  (lambda c: c.data.update(train_files=("a.parquet",)), "data.train_files",
   "empty for task 'synthetic'"),
  (lambda c: setattr(c.model, "param_dtype", 3), "model.param_dtype", "expected str"),
])
def test_bad_values_name_the_field(mutate, field, fragment):
  msg = _err(mutate)
  assert msg.startswith(field + ":"), msg
  assert fragment in msg, msg


def test_unknown_keys_and_wrong_types():
  def typo(c):
    c.rl.decay_rat = 8.0

  assert _err(typo) == ("rl.decay_rat: unknown key (not in the schema); did you mean "
                        "rl.decay_rate?")

  def new_section(c):
    c.trainer = {"x": 1}

  assert _err(new_section).startswith("trainer: unknown key")
  raw = _recipe("tiny_cpu").to_dict()  # plain dicts are accepted too (and type-checked)
  raw["rl"]["n"] = 2.5
  with pytest.raises(config_lib.ConfigError, match=r"^rl.n: expected int, got float 2.5$"):
    config_lib.validate(raw)
  raw = _recipe("tiny_cpu").to_dict()
  raw["rl"]["filter_groups_enable"] = "yes"
  with pytest.raises(config_lib.ConfigError, match="rl.filter_groups_enable: expected bool"):
    config_lib.validate(raw)
  raw = _recipe("tiny_cpu").to_dict()
  raw["rl"] = 3
  with pytest.raises(config_lib.ConfigError, match="rl: must be a section"):
    config_lib.validate(raw)


def test_mesh_against_device_count():
  cfg = _recipe("tiny_cpu")
  assert config_lib.validate(cfg, num_devices=8).mesh.resolve(8) == (1, 8, 1)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  assert config_lib.validate(cfg, num_devices=8).mesh.resolve(8) == (2, 2, 2)
  assert _err(lambda c: c.mesh.update(data=2, fsdp=2, tensor=1), num_devices=8) == (
    "mesh.data: mesh (2, 2, 1) has 4 devices but 8 are available")
  assert _err(lambda c: setattr(c.mesh, "data", 3), num_devices=8).startswith(
    "mesh.data: fixed mesh axes (mesh.data=3, mesh.fsdp=-1, mesh.tensor=1, product 3) do not "
    "divide the 8 devices")
  # The axis named is the one that does not fit (not mesh.fsdp, the one left at -1).
  assert _err(lambda c: setattr(c.mesh, "tensor", 3), num_devices=8).startswith("mesh.tensor:")
  assert _err(lambda c: c.mesh.update(data=1, fsdp=1, tensor=4), num_devices=8) == (
    "mesh.tensor: mesh (1, 1, 4) has 4 devices but 8 are available")
  config_lib.validate(_recipe("tiny_cpu"))  # without num_devices the mesh is not checked


def test_missing_paths_are_named(tmp_path):
  missing = str(tmp_path / "dapo.parquet")

  def verl_data(c):
    c.data.update(task="verl", train_files=[missing], val_files=[missing])
    c.model.tokenizer_dir = str(tmp_path)

  assert _err(verl_data) == f"data.train_files: file not found: {missing}"

  def no_tokenizer(c):
    c.data.update(task="verl", train_files=[missing], val_files=[missing])

  assert _err(no_tokenizer).startswith("model.tokenizer_dir: task 'verl' needs a tokenizer")

  def hf_dir(path):
    def mutate(c):
      c.model.hf_dir, c.model.overrides = str(path), {}  # tiny_cpu's tiny architecture goes
    return mutate

  hf = str(tmp_path / "Qwen2.5-32B")
  assert _err(hf_dir(hf)) == f"model.hf_dir: directory not found: {hf}"
  (tmp_path / "empty").mkdir()
  assert _err(hf_dir(tmp_path / "empty")).startswith("model.hf_dir: no config.json")
  cfg = _recipe("tiny_cpu")
  cfg.data.update(task="verl", train_files=[missing], val_files=[missing])
  config_lib.validate(cfg, check_paths=False)  # structure only


def test_run_config_is_frozen_and_a_single_path_is_a_list():
  cfg = _recipe("tiny_cpu")
  rc = config_lib.validate(cfg)
  with pytest.raises(AttributeError):
    rc.rl.n = 3
  with pytest.raises(TypeError):
    rc.model.overrides["hidden_size"] = 3
  raw = cfg.to_dict()  # a plain dict may hold a single path as a string, or a comma list
  raw["data"].update(task="verl", train_files="a.parquet", val_files=["b.parquet, c.parquet"])
  data = config_lib.validate(raw, check_paths=False).data
  assert (data.train_files, data.val_files) == (("a.parquet",), ("b.parquet", "c.parquet"))


def test_dtypes_as_names_or_jnp_dtypes():
  import jax.numpy as jnp
  import numpy as np

  cfg = _recipe("tiny_cpu")
  cfg.model.param_dtype, cfg.model.dtype = jnp.float32, jnp.bfloat16  # the JAX habit
  model = config_lib.validate(cfg).model
  assert (model.param_dtype, model.dtype) == ("float32", "bfloat16")
  raw = _recipe("tiny_cpu").to_dict()
  raw["model"].update(param_dtype=np.dtype("float16"), dtype="float32")
  assert config_lib.validate(raw).model.param_dtype == "float16"
  assert _err(lambda c: setattr(c.model, "dtype", jnp.int32)).startswith("model.dtype: must be")


def test_saved_run_config_keeps_dtypes_as_names(tmp_path):
  import jax.numpy as jnp

  from fipo_jax import policy as policy_lib

  cfg = _recipe("tiny_cpu")
  cfg.model.param_dtype = jnp.bfloat16
  policy_lib.save_run_config(cfg, str(tmp_path))  # what eval/generate/export rebuild from
  saved = json.loads((tmp_path / policy_lib.RUN_CONFIG_FILE).read_text())
  assert saved["model"]["param_dtype"] == "bfloat16"
  assert config_lib.validate(saved).model.param_dtype == "bfloat16"
