"""Rows in the verl schema (DAPO-Math-17k, AIME-2024) from parquet and jsonl files.

A row:

  {"data_source": "math_dapo",
   "prompt": [{"role": "user", "content": "Solve ... Answer: $Answer"}],
   "ability": "MATH",
   "reward_model": {"ground_truth": "34", "style": "rule-lang"},
   "extra_info": {"index": "..."}}

`RowSource` gives random access to the raw rows of several files (what grain's `MapDataset.source`
needs); `parse_row` checks one row and returns a clean record or the reason it is malformed.
Reading never fails on a bad row: a row that is not a JSON object, is not UTF-8, or misses a field
comes back as `BadRow` and the pipeline skips and counts it. A missing or unreadable file raises
at construction, naming the path; files with no rows at all, or parquet files without a column the
schema needs, raise `DataError` there too (the trainer and the CLIs turn it into one line).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from fipo_jax import paths as paths_lib

SUFFIXES = (".parquet", ".jsonl", ".json")
REWARD_KEY, SOURCE_KEY = "reward_model", "data_source"  # columns every verl row needs


class DataError(ValueError):
  """Data files that cannot give a usable prompt: no rows, a missing column, no valid row, a
  prompt too long under truncation='error'. One clear sentence naming the file."""


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A row that could not be read or parsed; `reason` is one short phrase."""

  reason: str


@dataclasses.dataclass(frozen=True)
class Record:
  """One well-formed row."""

  messages: tuple[dict[str, str], ...]  # chat messages, each {"role", "content"}
  ground_truth: str
  data_source: str
  extra_info: dict[str, Any]


class _ParquetFile:
  """Row access into one parquet file (read once with pyarrow; rows converted on demand)."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq  # noqa: PLC0415 (pyarrow is heavy; only for parquet data)

    try:
      self._table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
      raise OSError(f"could not read parquet file {path}: {e}") from e

  def __len__(self) -> int:
    return self._table.num_rows

  @property
  def columns(self) -> list[str] | None:
    return list(self._table.column_names)

  def __getitem__(self, i: int) -> Any:
    try:
      return self._table.slice(i, 1).to_pylist()[0]
    except Exception as e:  # e.g. invalid UTF-8 in a string column
      return BadRow(f"unreadable row ({type(e).__name__})")


class _JsonlFile:
  """Row access into one JSON-lines file (bytes kept; each line decoded on demand)."""

  def __init__(self, path: str):
    try:
      with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    except OSError as e:
      raise OSError(f"could not read jsonl file {path}: {e}") from e
    self._lines = [line for line in lines if line.strip()]

  def __len__(self) -> int:
    return len(self._lines)

  columns = None  # free-form rows: checked one by one

  def __getitem__(self, i: int) -> Any:
    try:
      text = self._lines[i].decode("utf-8")
    except UnicodeDecodeError:
      return BadRow("not valid UTF-8")
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      return BadRow(f"invalid JSON ({e.msg})")


class RowSource(Sequence):
  """Random access over the rows of several files, in order (global row index)."""

  def __init__(self, paths: Sequence[str]):
    if isinstance(paths, str):
      paths = [paths]
    if not paths:
      raise DataError("no data files given")
    self.paths = list(paths)
    self._files = [_open(p) for p in self.paths]
    self._starts = [0]
    for f in self._files:
      self._starts.append(self._starts[-1] + len(f))
    if len(self) == 0:
      raise DataError(f"no rows in {describe_paths(self.paths)} (empty data file)")

  def require_columns(self, columns: Sequence[str]) -> None:
    """Raises DataError if a parquet file lacks one of `columns` (jsonl rows are checked one by
    one when read)."""
    for path, f in zip(self.paths, self._files, strict=True):
      missing = [c for c in columns if f.columns is not None and c not in f.columns]
      if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (it has "
                        f"{', '.join(f.columns)}); verl-schema rows need {', '.join(columns)}")

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    return self._files[k][index - self._starts[k]]

  def locate(self, index: int) -> tuple[str, int]:
    """Global row index -> (path, row within that file), for log messages."""
    k = bisect.bisect_right(self._starts, index) - 1
    return self.paths[k], index - self._starts[k]


def describe_paths(paths: Sequence[str]) -> str:
  """One path as itself, several as a bracketed list (for messages)."""
  return paths[0] if len(paths) == 1 else "[" + ", ".join(paths) + "]"


def _open(path: str):
  if not paths_lib.isfile(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if path.endswith(".parquet"):
    return _ParquetFile(paths_lib.local_copy(path))  # gs://: read from a local cached copy
  if path.endswith((".jsonl", ".json")):
    return _JsonlFile(paths_lib.local_copy(path))
  raise ValueError(f"unsupported data file type (expected {SUFFIXES}): {path}")


def parse_row(raw: Any, prompt_key: str = "prompt") -> Record | BadRow:
  """Checks one raw row against the verl schema."""
  if isinstance(raw, BadRow):
    return raw
  if not isinstance(raw, dict):
    return BadRow(f"row is a {type(raw).__name__}, not an object")
  messages = raw.get(prompt_key)
  if messages is None:
    return BadRow(f"missing '{prompt_key}'")
  if not isinstance(messages, (list, tuple)) or not messages:
    return BadRow(f"'{prompt_key}' is not a non-empty list of messages")
  clean = []
  for m in messages:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      return BadRow(f"'{prompt_key}' has a message without string 'role' and 'content'")
    if not _is_utf8(m["content"]) or not _is_utf8(m["role"]):
      return BadRow("message text is not valid UTF-8")
    clean.append({"role": m["role"], "content": m["content"]})
  if not any(m["content"].strip() for m in clean):
    return BadRow("empty prompt")
  reward = raw.get(REWARD_KEY)
  if not isinstance(reward, dict):
    return BadRow(f"missing '{REWARD_KEY}' object")
  truth = reward.get("ground_truth")
  if isinstance(truth, (int, float)) and not isinstance(truth, bool):
    truth = str(truth)  # some sets store integer answers
  if not isinstance(truth, str) or not truth.strip() or not _is_utf8(truth):
    return BadRow("missing or empty 'reward_model.ground_truth'")
  source = raw.get(SOURCE_KEY)
  if not isinstance(source, str) or not source:
    return BadRow(f"missing '{SOURCE_KEY}'")
  extra = raw.get("extra_info")
  if extra is None:
    extra = {}
  if not isinstance(extra, dict):
    return BadRow("'extra_info' is not an object")
  return Record(tuple(clean), truth, source, extra)


def _is_utf8(s: str) -> bool:
  try:
    s.encode("utf-8")  # fails on lone surrogates, e.g. from a "\udc80" JSON escape
  except UnicodeEncodeError:
    return False
  return True


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
  """Writes rows as JSON lines (used for the synthetic task and test data); local or gs://."""
  paths_lib.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return path


def write_parquet(path: str, rows: Sequence[dict[str, Any]]) -> str:
  """Writes rows as a parquet file with the verl column layout."""
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415

  with paths_lib.open_file(path, "wb") as f:
    pq.write_table(pa.Table.from_pylist(list(rows)), f)
  return path


def make_row(question: str, answer: str, *, data_source: str, index: int,
             split: str) -> dict[str, Any]:
  """A verl-schema row with one user message."""
  return {
    "data_source": data_source,
    "prompt": [{"role": "user", "content": question}],
    "ability": "MATH",
    "reward_model": {"ground_truth": answer, "style": "rule-lang"},
    "extra_info": {"index": index, "split": split},
  }
