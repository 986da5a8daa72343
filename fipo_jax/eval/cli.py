"""Printing and saving eval results: a plain-text table and a JSON file.

`results` maps a row name (an eval set or data source, e.g. 'aime24') to its metrics
(`estimators.summarize` output). The table has one row per set and one column per metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fipo_jax import paths

# Columns shown first, in this order, when present; the rest follow alphabetically.
_FIRST = ("num_prompts", "num_samples")


def _columns(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
  if columns is not None:
    return list(columns)
  keys = {k for metrics in results.values() for k in metrics}

  def order(k: str):
    head = _FIRST.index(k) if k in _FIRST else len(_FIRST)
    name, _, at = k.partition("@")
    # avg@n, cons@n, pass@k grouped, with k sorted numerically.
    return (head, k.startswith("response_length/"), name, int(at) if at.isdigit() else 0, k)

  return sorted(keys, key=order)


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / jax scalars
    v = v.item()
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    if v.is_integer() and abs(v) >= 1:
      return str(int(v))
    return f"{v:.4f}"
  return str(v)


def format_table(results: Mapping[str, Any], columns: Sequence[str] | None = None) -> str:
  """Results as an aligned text table (missing values shown as '-').

  `results` is either {set name: {metric: value}} (one row per set, one column per metric) or
  a flat {metric: value} dict (two columns: metric, value).
  """
  if not any(isinstance(v, Mapping) for v in results.values()):
    keys = list(columns) if columns is not None else _columns({"": results}, None)
    return _render(["metric", "value"], [[k, _fmt(results.get(k))] for k in keys])
  cols = _columns(results, columns)
  rows = [[name, *(_fmt(m.get(c)) for c in cols)] for name, m in results.items()]
  return _render(["set", *cols], rows)


def _render(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "  ".join(s.rjust(w) if i else s.ljust(w)
                             for i, (s, w) in enumerate(zip(r, widths, strict=True)))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _jsonable(v: Any) -> Any:
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / jax scalars
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None  # strict JSON has no NaN/inf
  return v


def write_json(path: str, payload: Mapping[str, Any]) -> str:
  """Writes `payload` (results plus any run info) as indented JSON, atomically (local or gs://)."""
  text = json.dumps(_jsonable(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
  paths.write_text(path, text)
  return path
