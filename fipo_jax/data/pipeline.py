"""Prompt pipelines with grain: verl rows -> tokenized prompts -> batches with resumable state.

  tokenizer = pipeline.resolve_tokenizer(cfg, workdir)
  train, val = pipeline.make_datasets(cfg.data, tokenizer, workdir)
  it = pipeline.PromptIterator(train, batch_size=cfg.rl.gen_batch_size,
                               shuffle=cfg.data.shuffle, seed=cfg.data.shuffle_seed)
  batch = next(it)            # list of examples (dicts, see PromptDataset.get)
  state = it.get_state()      # JSON-able; goes into the checkpoint's `extra`
  it.set_state(state)         # resumes exactly

Each epoch is a fresh permutation (grain's `MapDataset.shuffle` reseeds every epoch). Malformed
rows are skipped, logged once with their index and file (the first 10), and counted in
`skipped_rows` (reported as `data/skipped_rows`); they never stop a run. Prompts longer than
max_prompt_length are cut inside their last user message ('left'), dropped ('drop') or refused
('error'); the first of each is logged with its length, and all are counted
(`data/truncated_prompts`, `data/dropped_prompts`). Data that cannot give one usable prompt (no
rows, a missing column, no valid row) raises `DataError`, before the trainer compiles anything.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from fipo_jax import paths
from fipo_jax.data import synthetic, truncation, verl
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.data.verl import DataError

log = logging.getLogger(__name__)
MAX_LOGGED_ROWS = 10  # malformed rows logged one by one; later ones are only counted


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A row that gives no example: malformed, or `dropped` for its length."""

  reason: str
  dropped: bool = False


class PromptTooLongError(DataError):
  """A prompt over data.max_prompt_length under truncation='error'."""


class PromptDataset:
  """Tokenized prompts of verl-schema files; `get(i)` is None for a row that is skipped.

  Prompts over `max_prompt_length` are, per `truncation`: 'left' cut inside their last user
  message, keeping its tail (`truncation.truncate_left`; the chat template's head and the
  generation prompt survive); 'drop' skipped; 'error' refused with PromptTooLongError. The
  first prompt truncated and the first dropped are logged with their length; later ones are only
  counted (by PromptIterator: data/truncated_prompts, data/dropped_prompts).
  """

  def __init__(self, files: Sequence[str], tokenizer: Any, *, max_prompt_length: int,
               prompt_key: str = "prompt", apply_chat_template: bool = True,
               truncation: str = "left"):
    if truncation not in ("left", "error", "drop"):
      raise ValueError(f"truncation must be 'left', 'error' or 'drop', got {truncation!r}")
    self.rows = verl.RowSource(files)
    self.rows.require_columns([prompt_key, verl.REWARD_KEY, verl.SOURCE_KEY])
    self.tokenizer = tokenizer
    self.max_prompt_length = max_prompt_length
    self.prompt_key = prompt_key
    self.apply_chat_template = apply_chat_template
    self.truncation = truncation
    self._logged: set[int] = set()
    self._warned: set[str] = set()  # 'truncated' / 'dropped': their first example was logged
    self._quiet = False  # set while `check` scans
    # Random access through grain: source -> parse+tokenize by index.
    self.source = grain.MapDataset.source(self.rows).map_with_index(self._example)

  def __len__(self) -> int:
    return len(self.rows)

  def get(self, index: int) -> dict[str, Any] | None:
    """Row `index` as {prompt_ids int32[P], ground_truth, data_source, index, truncated}, or
    None."""
    item = self.lookup(index)
    return None if isinstance(item, Skipped) else item

  def lookup(self, index: int) -> dict[str, Any] | Skipped:
    """As `get`, with the reason of a skipped row; skips are logged (the first 10 rows)."""
    item = self.source[index]
    if isinstance(item, Skipped) and not item.dropped and index not in self._logged:
      if len(self._logged) < MAX_LOGGED_ROWS:
        path, row = self.rows.locate(index)
        more = (" (later skipped rows are counted in data/skipped_rows, not logged)"
                if len(self._logged) == MAX_LOGGED_ROWS - 1 else "")
        log.warning("skipping row %d of %s (global index %d): %s%s", row, path, index,
                    item.reason, more)
      self._logged.add(index)
    return item

  def _example(self, index: int, raw: Any) -> dict[str, Any] | Skipped:
    rec = verl.parse_row(raw, self.prompt_key)
    if isinstance(rec, verl.BadRow):
      return Skipped(rec.reason)
    try:
      ids = tokenizer_lib.encode_prompt(self.tokenizer, rec.messages, self.apply_chat_template)
    except Exception as e:  # a template or tokenizer failure on odd content is a bad row
      return Skipped(f"tokenization failed ({type(e).__name__}: {e})")
    if not ids:
      return Skipped("prompt tokenizes to nothing")
    n, truncated = len(ids), False
    if n > self.max_prompt_length:
      ids, truncated = self._fit(index, rec.messages, n)
      if ids is None:
        return Skipped(f"{n} tokens > max_prompt_length", dropped=True)
    return {"prompt_ids": np.asarray(ids, np.int32), "ground_truth": rec.ground_truth,
            "data_source": rec.data_source, "index": int(index), "truncated": truncated}

  def _fit(self, index: int, messages, n: int) -> tuple[list[int] | None, bool]:
    """(ids cut to fit, True), or (None, False) to drop, for a prompt of n > max tokens."""
    path, row = self.rows.locate(index)
    where = (f"row {row} of {path} (global index {index}): prompt of {n} tokens > "
             f"data.max_prompt_length={self.max_prompt_length}")
    if self.truncation == "error":
      raise PromptTooLongError(f"{where} (data.truncation='error')")
    cut = None
    if self.truncation == "left":
      cut = truncation.truncate_left(self.tokenizer, messages, max_length=self.max_prompt_length,
                                     apply_chat_template=self.apply_chat_template)
    if cut is None:
      why = ("the chat template without the user message does not fit"
             if self.truncation == "left" else "data.truncation='drop'")
      self._warn_once("dropped", f"{where}: dropped ({why})")
      return None, False
    ids, kept = cut
    total = len(messages[truncation.last_user_message(messages)]["content"])
    self._warn_once("truncated", f"{where}: its last user message keeps its last {kept} of "
                    f"{total} characters, {len(ids)} tokens (data.truncation='left')")
    return ids, True

  def _warn_once(self, kind: str, message: str) -> None:
    if kind not in self._warned and not self._quiet:
      self._warned.add(kind)
      log.warning("%s; later %s prompts are only counted (data/%s_prompts)", message, kind, kind)

  def check(self, role: str) -> None:
    """Raises DataError unless a row gives an example (all rows, each refused if too long,
    under truncation='error'); what the trainer runs on its train and val files before
    compiling anything, so bad data ends the run in one line."""
    first: tuple[int, Skipped] | None = None
    found, self._quiet = False, True  # a scan logs nothing: its verdict is the one line
    try:
      for i in range(len(self)):
        item = self.source[i]
        if not isinstance(item, Skipped):
          found = True
          if self.truncation != "error":
            return
        elif first is None:
          first = (i, item)
    finally:
      self._quiet = False
    if not found:
      path, row = self.rows.locate(first[0])
      raise DataError(f"no usable {role} rows in {verl.describe_paths(self.rows.paths)}: all "
                      f"{len(self)} skipped (row {row} of {path}: {first[1].reason})")

  def examples(self, max_examples: int = -1) -> tuple[list[dict[str, Any]], int]:
    """All valid examples in file order (for eval) and the number of skipped rows."""
    out, skipped = [], 0
    for i in range(len(self)):
      if 0 <= max_examples <= len(out):
        break
      ex = self.get(i)
      if ex is None:
        skipped += 1
      else:
        out.append(ex)
    return out, skipped


class PromptIterator(Iterator):
  """Endless batches of `batch_size` valid examples, epoch after epoch, with exact resume.

  State: {'epoch', 'position' (next row within the epoch's order), 'seed', 'shuffle',
  'skipped_rows', 'truncated_prompts', 'dropped_prompts', 'num_rows'}. Rows are counted each
  time they are met: skipped (malformed or dropped), of which dropped for their length, and
  prompts truncated to fit.
  """

  def __init__(self, dataset: PromptDataset, *, batch_size: int, shuffle: bool = True,
               seed: int = 0):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
    self.dataset = dataset
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = int(seed)
    self.epoch = 0
    self.position = 0
    self.skipped_rows = 0
    self.truncated_prompts = 0
    self.dropped_prompts = 0
    order = grain.MapDataset.range(len(dataset))
    # Indexing past len(order) continues into the next epoch with seed + epoch.
    self._order = order.shuffle(seed=self.seed % 2**32) if shuffle else order

  def _row_index(self) -> int:
    n = len(self.dataset)
    return int(self._order[self.epoch * n + self.position]) % n

  def __next__(self) -> list[dict[str, Any]]:
    return self.next_batch(self.batch_size)

  def next_batch(self, size: int) -> list[dict[str, Any]]:
    """The next `size` valid examples (crossing epoch boundaries as needed)."""
    n = len(self.dataset)
    batch = []
    misses = 0  # consecutive skipped rows; a full epoch of them means no usable data
    while len(batch) < size:
      item = self.dataset.lookup(self._row_index())
      self.position += 1
      if self.position == n:
        self.epoch, self.position = self.epoch + 1, 0
      if isinstance(item, Skipped):
        self.skipped_rows += 1
        self.dropped_prompts += item.dropped
        misses += 1
        if misses >= n:
          raise DataError(f"no valid rows in {self.dataset.rows.paths} (all {n} skipped; "
                          "see the warnings above)")
      else:
        misses = 0
        self.truncated_prompts += item["truncated"]
        batch.append(item)
    return batch

  def metrics(self) -> dict[str, int]:
    """Counts of rows met so far: `data/skipped_rows` (malformed or dropped),
    `data/dropped_prompts` (too long, dropped), `data/truncated_prompts`; and `data/epoch`."""
    return {"data/skipped_rows": self.skipped_rows, "data/dropped_prompts": self.dropped_prompts,
            "data/truncated_prompts": self.truncated_prompts, "data/epoch": self.epoch}

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "shuffle": self.shuffle, "skipped_rows": self.skipped_rows,
            "truncated_prompts": self.truncated_prompts, "dropped_prompts": self.dropped_prompts,
            "num_rows": len(self.dataset)}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["num_rows"]) != len(self.dataset):
      raise ValueError(f"data iterator state is for {state['num_rows']} rows but the data files "
                       f"now have {len(self.dataset)}; the train files changed since the "
                       "checkpoint")
    if int(state["seed"]) != self.seed or bool(state["shuffle"]) != self.shuffle:
      raise ValueError(f"data iterator state has seed={state['seed']} shuffle={state['shuffle']}"
                       f" but the config has seed={self.seed} shuffle={self.shuffle}")
    self.epoch = int(state["epoch"])
    self.position = int(state["position"])
    self.skipped_rows = int(state["skipped_rows"])
    # Checkpoints from before these counters resume them from 0.
    self.truncated_prompts = int(state.get("truncated_prompts", 0))
    self.dropped_prompts = int(state.get("dropped_prompts", 0))


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts: ids int32[B, P] and mask int32[B, P] (1 = token)."""
  length = max(len(s) for s in seqs) if length is None else length
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {b} has {len(s)} tokens > pad length {length}")
    if len(s):
      ids[b, length - len(s):] = s
      mask[b, length - len(s):] = 1
  return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int,
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads responses: ids int32[B, T] and mask int32[B, T] (1 = token)."""
  length = max(len(s) for s in seqs) if length is None else length
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {b} has {len(s)} tokens > pad length {length}")
    ids[b, :len(s)] = s
    mask[b, :len(s)] = 1
  return ids, mask


def resolve_tokenizer(cfg: Any, workdir: str) -> Any:
  """The run's tokenizer: model.tokenizer_dir, else model.hf_dir, else (synthetic task) the
  character-level tokenizer built into WORKDIR/tokenizer."""
  path = cfg.model.tokenizer_dir or cfg.model.hf_dir
  if not path:
    if cfg.data.task != "synthetic":
      raise ValueError("model.tokenizer_dir: task 'verl' needs model.tokenizer_dir or "
                       "model.hf_dir")
    path = paths.join(workdir, "tokenizer")
    if not paths.isfile(paths.join(path, "tokenizer.json")):
      with tempfile.TemporaryDirectory() as tmp:  # transformers saves to local files only
        paths.upload(tokenizer_lib.build_tokenizer(tmp), path)
  # A gs:// tokenizer (or hf_dir) is read from a local cached copy.
  return tokenizer_lib.load_tokenizer(paths.local_copy(path))


def data_files(data_cfg: Any, workdir: str) -> tuple[list[str], list[str]]:
  """(train_files, val_files); for the synthetic task they are written to WORKDIR/data."""
  if data_cfg.task == "synthetic":
    train, val = synthetic.write_dataset(paths.join(workdir, "data"), data_cfg.synthetic)
    return [train], [val]
  return list(data_cfg.train_files), list(data_cfg.val_files)


def make_datasets(data_cfg: Any, tokenizer: Any,
                  workdir: str) -> tuple[PromptDataset, PromptDataset | None]:
  """Train and val PromptDatasets of the `data` config section (val None without files)."""
  train_files, val_files = data_files(data_cfg, workdir)
  kw = dict(max_prompt_length=data_cfg.max_prompt_length, prompt_key=data_cfg.prompt_key,
            apply_chat_template=data_cfg.apply_chat_template, truncation=data_cfg.truncation)
  train = PromptDataset(train_files, tokenizer, **kw)
  val = PromptDataset(val_files, tokenizer, **kw) if val_files else None
  return train, val


def build_datasets(rc: Any, tokenizer: Any, *,
                   workdir: str) -> tuple[PromptIterator, list[dict[str, Any]]]:
  """The trainer's data: a train PromptIterator of rl.gen_batch_size prompts per batch, and the
  held-out examples (at most eval.max_prompts; [] without val files).

  Train and val files pass the same checks (`PromptDataset.check`), so data that cannot train
  raises DataError here, before anything is compiled.
  """
  train, val = make_datasets(rc.data, tokenizer, workdir)
  train.check("train")
  if val is not None:
    val.check("val")
  it = PromptIterator(train, batch_size=rc.rl.gen_batch_size, shuffle=rc.data.shuffle,
                      seed=rc.data.shuffle_seed)
  val_examples: list[dict[str, Any]] = []
  if val is not None:
    val_examples, skipped = val.examples(rc.eval.max_prompts)
    truncated = sum(ex["truncated"] for ex in val_examples)
    if skipped or truncated:
      log.warning("val rows in %s: %d skipped (malformed or dropped), %d prompts truncated",
                  verl.describe_paths(val.rows.paths), skipped, truncated)
  return it, val_examples
