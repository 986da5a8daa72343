"""Model loading for every CLI: the model config of a run, and a policy to sample from.

The trainer writes WORKDIR/config.json (`save_run_config`); `load_policy` rebuilds the model
from it and restores a checkpoint's params, or loads an HF directory. generate, eval and export
load their model here, without the RL setup (fipo_jax/rl/setup.py), which builds the trainer's
data, optimizer and sampler on top of `model_config`.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax import models, paths
from fipo_jax.models import build as build_lib

RUN_CONFIG_FILE = "config.json"


def model_config(rc: config_lib.RunConfig) -> models.ModelConfig:
  """The run's architecture (from model.hf_dir's config.json, else the preset) and exec options."""
  m = rc.model
  exec_opts = dict(
    param_dtype=m.param_dtype,
    dtype=m.dtype,
    attention_impl=m.attention_impl,
    remat_policy=m.remat_policy,
  )
  if m.hf_dir:
    hf_cfg = json.loads(paths.read_text(paths.join(m.hf_dir, "config.json")))
    return models.ModelConfig.from_hf_config(hf_cfg, **exec_opts, **dict(m.overrides))
  return models.get_preset(m.preset, **exec_opts, **dict(m.overrides))


def save_run_config(config, workdir: str) -> None:
  """WORKDIR/config.json: what `load_policy` (eval, generate, export) rebuilds the model from."""
  if jax.process_index() != 0:
    return
  raw = config_lib.to_dict(config)  # dtypes as names
  paths.write_text(
    paths.join(workdir, RUN_CONFIG_FILE), json.dumps(raw, indent=2, sort_keys=True, default=str)
  )


@dataclasses.dataclass
class Policy:
  """A model ready to sample from: config, graph, params and its tokenizer."""

  model_cfg: models.ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer_dir: str
  max_response_length: int | None = None
  run_config: config_lib.RunConfig | None = None  # the trainer's config, for checkpoints


def load_policy(
  *, checkpoint_dir: str | None = None, hf_dir: str | None = None, step: int | None = None
) -> Policy:
  """The policy of a trainer workdir (its latest or given checkpoint) or of an HF directory.

  A checkpoint that cannot be read raises checkpoints.CheckpointUnreadable (a ValueError) naming
  the step, the reason and the other kept steps."""
  from fipo_jax import checkpoints as ckpt_lib  # noqa: PLC0415

  if hf_dir:
    hf_dir = paths.local_copy(hf_dir)
    model = models.from_pretrained(hf_dir)
    graphdef, params = nnx.split(model)
    return Policy(model.cfg, graphdef, params, hf_dir)
  cfg_path = paths.join(checkpoint_dir, RUN_CONFIG_FILE)
  if not paths.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: is {checkpoint_dir} a fipo_jax workdir?")
  rc = config_lib.validate(json.loads(paths.read_text(cfg_path)), check_paths=False)
  cfg = model_config(rc)
  graphdef, abstract, shardings = build_lib.param_shardings(cfg, None)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  manager = ckpt_lib.CheckpointManager(
    paths.join(checkpoint_dir, "checkpoints"), keep=rc.keep_checkpoints
  )
  _, params = manager.restore_params(params=target, step=step)
  tok_dir = rc.model.tokenizer_dir or rc.model.hf_dir or paths.join(checkpoint_dir, "tokenizer")
  if paths.is_remote(tok_dir) and paths.isdir(tok_dir):
    tok_dir = paths.local_copy(tok_dir)  # transformers reads tokenizers from local files only
  return Policy(cfg, graphdef, params, tok_dir, rc.rl.max_response_length, rc)
