"""HF safetensors in and out through ONE key-map table.

Each row maps an HF tensor name (a template; `{i}` is the layer) to our param path and a layout
transform. Loading writes every tensor straight into its final sharding with
`jax.make_array_from_callback` (each device shard reads only what it needs from memmapped
files); every shape is asserted; unmapped and missing keys raise one clear error.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fipo_jax import paths
from fipo_jax.models import build, safetensors_io
from fipo_jax.models import config as config_lib
from fipo_jax.models import transformer as transformer_lib

# (HF name template, our path, transform). Our stacked layer params live at ('layers', name).
KEY_MAP: tuple[tuple[str, tuple[str, ...], str], ...] = (
  ("model.embed_tokens.weight", ("embed",), "identity"),
  ("model.norm.weight", ("final_norm",), "identity"),
  ("lm_head.weight", ("lm_head",), "transpose"),
  ("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm"), "identity"),
  ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_norm"), "identity"),
  ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "q_proj"), "in_heads"),
  ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "k_proj"), "in_heads"),
  ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "v_proj"), "in_heads"),
  ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "o_proj"), "out_heads"),
  ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "q_bias"), "heads"),
  ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "k_bias"), "heads"),
  ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "v_bias"), "heads"),
  ("model.layers.{i}.self_attn.q_norm.weight", ("layers", "q_norm"), "identity"),
  ("model.layers.{i}.self_attn.k_norm.weight", ("layers", "k_norm"), "identity"),
  ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "gate_proj"), "transpose"),
  ("model.layers.{i}.mlp.up_proj.weight", ("layers", "up_proj"), "transpose"),
  ("model.layers.{i}.mlp.down_proj.weight", ("layers", "down_proj"), "transpose"),
)
# HF buffers that carry no weights.
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)
_PATTERNS = [(re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)") + "$"), path, kind)
             for t, path, kind in KEY_MAP]


def hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """HF shape of a tensor whose per-layer shape in our layout is `ours`."""
  if kind == "identity":
    return ours
  if kind == "transpose":
    return ours[::-1]
  if kind == "in_heads":  # ours [D, n, H] <- HF [n*H, D]
    return (ours[1] * ours[2], ours[0])
  if kind == "out_heads":  # ours [N, H, D] <- HF [D, N*H]
    return (ours[2], ours[0] * ours[1])
  if kind == "heads":  # ours [n, H] <- HF [n*H]
    return (ours[0] * ours[1],)
  raise ValueError(kind)


def to_ours(kind: str, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
  if kind == "identity":
    return x
  if kind in ("transpose", "in_heads", "out_heads"):
    return x.T.reshape(ours)
  return x.reshape(ours)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "identity":
    return x
  if kind == "transpose":
    return x.T
  if kind == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if kind == "out_heads":
    return x.reshape(-1, x.shape[-1]).T
  return x.reshape(-1)


def match_key(key: str) -> tuple[tuple[str, ...], int | None, str] | None:
  """HF key -> (our path, layer index or None, transform kind), or None when unmapped."""
  for pattern, path, kind in _PATTERNS:
    m = pattern.match(key)
    if m:
      return path, (int(m.group(1)) if m.groups() else None), kind
  return None


# config.json key of the exporting run's defaults (transformers keeps unknown keys, unused).
RUN_DEFAULTS_KEY = "fipo_jax_run"


def run_defaults(hf_dir) -> dict:
  """The defaults an export recorded (see save_pretrained); {} for any other HF directory."""
  return dict(read_config(hf_dir).get(RUN_DEFAULTS_KEY) or {})


def read_config(hf_dir) -> dict:
  """config.json of an HF directory (local or gs://); FileNotFoundError (one line) when there
  is none."""
  path = paths.join(hf_dir, "config.json")
  if not paths.isfile(path):
    what = "has no config.json (not an HF model directory)" if paths.isdir(hf_dir) \
      else "not found"
    raise FileNotFoundError(f"HF model directory {hf_dir}: {what}")
  return json.loads(paths.read_text(path))


def _index_checkpoint(files, cfg, flat_abs):
  """(path -> {layer: key}) for every param; raises on unmapped, missing or misshaped keys."""
  found: dict[tuple[str, ...], dict] = {}
  unmapped, bad_shape = [], []
  for key in files:
    hit = match_key(key)
    if hit is None:
      if not any(p.match(key) for p in _IGNORED):
        unmapped.append(key)
      continue
    path, layer, kind = hit
    if path == ("lm_head",) and cfg.tie_word_embeddings:
      continue  # tied: the embedding is the unembedding
    if path not in flat_abs:
      unmapped.append(key)
      continue
    shape = flat_abs[path].shape
    per_layer = shape[1:] if path[0] == "layers" else shape
    if layer is not None and not 0 <= layer < cfg.num_layers:
      unmapped.append(key)
      continue
    if files[key].shape(key) != hf_shape(kind, per_layer):
      bad_shape.append(f"{key}: file {files[key].shape(key)} != expected "
                       f"{hf_shape(kind, per_layer)}")
    found.setdefault(path, {})[layer] = (key, kind)
  missing = []
  for path in flat_abs:
    layers = list(range(cfg.num_layers)) if path[0] == "layers" else [None]
    for layer in layers:
      if layer not in found.get(path, {}):
        missing.append("/".join(path) + ("" if layer is None else f"[{layer}]"))
  if unmapped or missing or bad_shape:
    raise ValueError("HF checkpoint does not match the model config:\n"
                     f"  unmapped keys ({len(unmapped)}): {unmapped[:20]}\n"
                     f"  missing params ({len(missing)}): {missing[:20]}\n"
                     f"  wrong shapes ({len(bad_shape)}): {bad_shape[:20]}")
  return found


def _load_leaf(path, abs_var, sharding, files, entries, dtype):
  shape = abs_var.shape
  stacked = path[0] == "layers"

  def read(layer):
    key, kind = entries[layer]
    per_layer = shape[1:] if stacked else shape
    return to_ours(kind, files[key].get(key), per_layer)

  def callback(index):
    if not stacked:
      return np.asarray(read(None)[index], dtype=dtype)
    layers = range(*index[0].indices(shape[0]))
    return np.stack([np.asarray(read(i)[index[1:]], dtype=dtype) for i in layers])

  return jax.make_array_from_callback(shape, sharding, callback)


def from_pretrained(hf_dir, *, mesh: Mesh | None = None,
                    param_dtype: config_lib.DTypeLike = "float32",
                    dtype: config_lib.DTypeLike = "float32",
                    **cfg_overrides) -> transformer_lib.Transformer:
  """Loads an HF directory (config.json + safetensors) into a Transformer, sharded on mesh.

  Dtypes are names ('bfloat16') or dtypes (jnp.bfloat16, np.float32). A gs:// directory is
  read from a local cached copy (safetensors are memory-mapped).
  """
  hf_dir = paths.local_copy(hf_dir)
  cfg = config_lib.ModelConfig.from_hf_config(
    read_config(hf_dir), param_dtype=param_dtype, dtype=dtype, **cfg_overrides)
  graphdef, abs_state, shardings = build.param_shardings(cfg, mesh)
  files = safetensors_io.open_dir(hf_dir)
  flat_abs = {p: v.get_value() for p, v in nnx.to_flat_state(abs_state)}
  flat_sh = {p: v.get_value() for p, v in nnx.to_flat_state(shardings)}
  found = _index_checkpoint(files, cfg, flat_abs)
  np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  values = {p: _load_leaf(p, flat_abs[p], flat_sh[p], files, found[p], np_dtype)
            for p in flat_abs}
  flat = nnx.to_flat_state(abs_state)
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
  return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(model: transformer_lib.Transformer, dtype=None):
  """Yields (HF key, numpy array) for every parameter, one leaf on host at a time."""
  cfg = model.cfg
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    rows = [(t, kind) for t, p, kind in KEY_MAP if p == path]
    if len(rows) != 1:
      raise ValueError(f"param {'/'.join(path)} has {len(rows)} rows in KEY_MAP")
    template, kind = rows[0]
    arr = _to_host(var[...])
    if dtype is not None:
      arr = arr.astype(dtype)
    if path[0] == "layers":
      for i in range(cfg.num_layers):
        yield template.format(i=i), np.ascontiguousarray(to_hf(kind, arr[i]))
    else:
      yield template, np.ascontiguousarray(to_hf(kind, arr))


def save_pretrained(model: transformer_lib.Transformer, out_dir, *, tokenizer_dir=None,
                    dtype: config_lib.DTypeLike | None = None,
                    max_shard_bytes: int = 4 << 30, run_defaults: dict | None = None) -> None:
  """Writes config.json, model-XXXXX-of-YYYYY.safetensors and the index (process 0 writes).

  `run_defaults` (the trainer's prompt format and lengths, e.g. {'apply_chat_template': False})
  go into config.json under RUN_DEFAULTS_KEY, where eval and generate of the directory read them.

  With `tokenizer_dir`, its files are copied and its special ids go into config.json
  (bos/eos/pad) and generation_config.json (every id the trainer stops on, pad), so
  transformers' `generate` stops where our sampler does. Shards are flushed as they fill, so at
  most one shard (plus one leaf) is on host at a time.
  """
  out = pathlib.Path(out_dir)
  write = jax.process_index() == 0
  if write:
    out.mkdir(parents=True, exist_ok=True)
  np_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype else None
  files: list[list[str]] = []  # keys per flushed shard
  pending: dict[str, np.ndarray] = {}
  total, save_dtype = 0, None

  def flush():
    if pending and write:
      safetensors_io.write_file(out / f"tmp-{len(files):05d}.safetensors", pending)
    files.append(list(pending))
    pending.clear()

  for key, arr in hf_tensors(model, np_dtype):  # collective on multi-host: all processes run
    if pending and sum(a.nbytes for a in pending.values()) + arr.nbytes > max_shard_bytes:
      flush()
    pending[key] = arr
    total += arr.nbytes
    save_dtype = save_dtype or str(arr.dtype)
  flush()
  if not write:
    return
  weight_map = {}
  for i, keys in enumerate(files):
    name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    (out / f"tmp-{i:05d}.safetensors").replace(out / name)
    weight_map.update({k: name for k in keys})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  hf_cfg = model.cfg.to_hf_config(torch_dtype=save_dtype)
  if tokenizer_dir is not None:
    hf_cfg.update(_copy_tokenizer(tokenizer_dir, out, model.cfg.vocab_size))
  if run_defaults:
    hf_cfg[RUN_DEFAULTS_KEY] = dict(run_defaults)
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))


def _copy_tokenizer(tokenizer_dir, out: pathlib.Path, vocab_size: int) -> dict:
  """Copies the tokenizer files, writes generation_config.json; returns config.json's ids."""
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415 (transformers: slow)

  tok = tokenizer_lib.load_tokenizer(str(tokenizer_dir))
  if len(tok) > vocab_size:
    raise ValueError(f"tokenizer {tokenizer_dir} has {len(tok)} tokens but the model's "
                     f"vocab_size is {vocab_size}")
  for f in pathlib.Path(tokenizer_dir).iterdir():
    if f.is_file() and not _is_weight_file(f.name):
      shutil.copy2(f, out / f.name)
  ids = tokenizer_lib.special_token_ids(tok)
  gen_path = out / "generation_config.json"
  # A source generation_config (e.g. Qwen's sampling defaults) is kept; the stop ids are ours.
  gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
  gen.pop("_from_model_config", None)  # no longer derived from config.json: never regenerated
  gen.update(ids, eos_token_id=tokenizer_lib.eos_token_ids(tok))
  gen_path.write_text(json.dumps(gen, indent=2))
  return ids


def _is_weight_file(name: str) -> bool:
  return (name.endswith((".safetensors", ".bin"))
          or name in ("config.json", "model.safetensors.index.json"))
