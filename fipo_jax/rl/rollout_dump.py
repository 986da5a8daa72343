"""The per-step rollout dump (`dump_influence`): the official `rollout_data_dir` files plus FIPO.

verl with `trainer.rollout_data_dir` writes, per step, the generations and the masked per-token
log-ratio `negative_approx_kl_global_step_{k}.jsonl` (docs/fipo_spec.md §6). Here one file per
RL step k (1-based, the step metrics.jsonl logs) holds both, and FIPO's weights:

  WORKDIR/rollout_data/{k}.jsonl: one JSON object per response, at most `dump_max_rows` of
    the step's, the first ones of every mini-batch (`dumped_rows`), with
    step, index (row of the step), mini_batch, group, loss_mode, prompt, response (decoded with
    special tokens), tokens (each response token decoded alone), score (verifier + overlong
    penalty), acc, advantage;
    updates: the 1-based optimizer updates of the step that trained on the row (one per epoch);
    log_ratio, influence_weights, raw_influence_weights: [updates][T_i] lists, each taken just
      before that update: log pi_theta - log pi_old (the official negative_approx_kl), FIPO's
      clipped weight f and raw exp(F) (what FIPO would apply; only loss_mode 'fipo' does);
    log_ratio_after: [T_i], log pi after the step's last update - log pi_old (the step's move).
  WORKDIR/influence/step_{k}.npz: every row's weights as arrays [U, M, T] (U updates, M rows
    of a mini-batch) with response_mask, advantages and response_ids [num mini-batches, M, T].

Rows come back from the batch layout (padded or packed) through `row_arrays`. Only
process 0 writes (the arrays were gathered on every host).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from fipo_jax import paths

DIR = "rollout_data"
_DIGITS = 6  # decimals kept in the JSONL (float32 log-ratios are ~1e-7 apart near 0)


def dump_path(workdir: str, step: int) -> str:
  return paths.join(workdir, DIR, f"{step}.jsonl")


def rows_from_slots(seq_index: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The response layout y [NM, W, E, ...] -> per-sequence rows [M, ...]; seq_index
  int[NM, W, E] (-1 = empty) says each slot's row (`packing.from_slots` without the plan)."""
  seq_index, y = np.asarray(seq_index), np.asarray(y)
  used = seq_index >= 0
  out = np.zeros((int(used.sum()),) + y.shape[seq_index.ndim :], y.dtype)
  out[seq_index[used]] = y[used]
  return out


def response_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
  """The response token ids [NM, W, E, T] of a batch (token_index points one before)."""
  ids = np.asarray(batch["input_ids"])
  flat = ids.reshape(ids.shape[:2] + (-1,))
  nxt = np.minimum(np.asarray(batch["token_index"]) + 1, flat.shape[-1] - 1)
  got = np.take_along_axis(flat[:, :, None, :], nxt.reshape(nxt.shape[:3] + (-1,)), axis=-1)
  return np.where(np.asarray(batch["response_mask"]) > 0, got, 0)


def row_arrays(dumps: Sequence[dict], batches: Sequence[Any]):
  """Influence dumps (one per update: epochs x mini-batches) and the mini-batches, on the
  host -> [M, T] rows: (dumps, per mini-batch {response_mask, advantages, response_ids});
  update u belongs to mini-batch u % num_mini."""
  rows = lambda b, x: rows_from_slots(np.asarray(b.seq_index), np.asarray(x))
  out = [{k: rows(batches[i % len(batches)], v) for k, v in d.items()} for i, d in enumerate(dumps)]
  fields = []
  for b in batches:
    ids = response_ids(
      {k: np.asarray(getattr(b, k)) for k in ("input_ids", "token_index", "response_mask")}
    )
    fields.append(
      {
        "response_mask": rows(b, b.response_mask),
        "advantages": rows(b, b.advantages),
        "response_ids": rows(b, ids),
      }
    )
  return out, fields


def _write_npz(workdir: str, step: int, rows: list[dict], fields: list[dict]) -> None:
  stack = lambda key: np.stack([d[key] for d in rows])
  with paths.open_file(paths.join(workdir, "influence", f"step_{step}.npz"), "wb") as f:
    np.savez_compressed(
      f,
      influence_weights=stack("influence_weights"),
      raw_influence_weights=stack("raw_influence_weights"),
      **{
        k: np.stack([x[k] for x in fields]) for k in ("response_mask", "advantages", "response_ids")
      },
    )


def _floats(x: np.ndarray) -> list[float]:
  return np.round(np.asarray(x, np.float64), _DIGITS).tolist()


def _record(
  i: int, step: int, rollouts, advantages, tokenizer, rows, after, fields, *, loss_mode: str
) -> dict[str, Any]:
  """The JSON object of the step's response i."""
  mini = fields[0]["response_mask"].shape[0]
  j, m = divmod(i, mini)
  t = int(fields[j]["response_mask"][m].sum())
  ids = [int(x) for x in np.asarray(rollouts.response_ids[i])[:t]]
  if ids != [int(x) for x in fields[j]["response_ids"][m][:t]]:  # row order broken: say so
    raise RuntimeError(
      f"rollout dump: response {i} of step {step} is not row {m} of mini-batch {j}"
    )
  updates = list(range(j, len(rows), len(fields)))  # 0-based, one per epoch
  per_update = lambda key: [_floats(rows[u][key][m][:t]) for u in updates]
  return {
    "step": step,
    "index": i,
    "mini_batch": j,
    "group": int(rollouts.group_ids[i]),
    "loss_mode": loss_mode,
    "prompt": tokenizer.decode([int(x) for x in rollouts.prompt_ids[i]]),
    "response": tokenizer.decode(ids),
    "tokens": [tokenizer.decode([x]) for x in ids],
    "score": float(rollouts.scores[i]),
    "acc": bool(rollouts.acc[i]),
    "advantage": float(advantages[i]),
    "updates": [u + 1 for u in updates],
    "log_ratio": per_update("log_ratio"),
    "influence_weights": per_update("influence_weights"),
    "raw_influence_weights": per_update("raw_influence_weights"),
    "log_ratio_after": _floats(after[j]["log_ratio"][m][:t]),
  }


def dumped_rows(num_mini: int, mini: int, max_rows: int) -> list[int]:
  """The step's rows the JSONL keeps: the first ceil(max_rows / num_mini) of every mini-batch
  (at most max_rows in all), so that every update of the step is seen; FIPO's weights are 1 on
  the first mini-batch and move on the later ones."""
  per = min(mini, max(1, -(-max_rows // num_mini)))
  return [j * mini + m for j in range(num_mini) for m in range(per)][:max_rows]


def write_step(
  workdir: str,
  step: int,
  *,
  before: Sequence[dict],
  after: Sequence[dict],
  batches: Sequence[Any],
  rollouts,
  advantages: np.ndarray,
  tokenizer,
  max_rows: int,
  loss_mode: str,
) -> str:
  """Writes RL step `step`'s dumps; `before`: the influence step's output before each update
  (epochs x mini-batches, on the host), `after`: after the last update, one per mini-batch.
  Returns the JSONL's path."""
  rows, fields = row_arrays(before, batches)
  after_rows, _ = row_arrays(after, batches)
  _write_npz(workdir, step, rows, fields)
  lines = [
    json.dumps(
      _record(
        i, step, rollouts, advantages, tokenizer, rows, after_rows, fields, loss_mode=loss_mode
      )
    )
    for i in dumped_rows(len(fields), fields[0]["response_mask"].shape[0], max_rows)
  ]
  path = dump_path(workdir, step)
  paths.write_text(path, "".join(line + "\n" for line in lines))
  return path


def read_step(workdir: str, step: int) -> list[dict[str, Any]]:
  """The rows of WORKDIR/rollout_data/{step}.jsonl."""
  text = paths.read_text(dump_path(workdir, step))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def dumped_steps(workdir: str) -> list[int]:
  """The RL steps with a dump in WORKDIR/rollout_data, ascending."""
  d = paths.join(workdir, DIR)
  if not paths.isdir(d):
    return []
  stems = [p.name[: -len(".jsonl")] for p in epath.Path(d).glob("*.jsonl")]
  return sorted(int(s) for s in stems if s.isdigit())
