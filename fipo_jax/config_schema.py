"""Mapping -> frozen dataclass, with one-line errors: the machinery under `fipo_jax.config`.

`build(cls, raw)` instantiates a (nested) dataclass from a plain mapping, rejecting unknown keys
(with a "did you mean" hint) and values of the wrong type; each section's `__post_init__` then
checks its own values through the `Section` helpers. The schema itself (the sections and
their defaults) lives in `fipo_jax.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

DTYPES = ("float32", "bfloat16", "float16")  # the names a dtype field accepts


class ConfigError(ValueError):
  """A bad config value; `str(err)` is one line `section.field: reason`."""

  def __init__(self, field: str, reason: str):
    super().__init__(f"{field}: {reason}")
    self.field = field
    self.reason = reason


class Section:
  """Mixin: `self._fail(name, reason)` raises ConfigError for `<section>.<name>`."""

  SECTION: ClassVar[str] = ""

  def _fail(self, name: str, reason: str):
    raise ConfigError(f"{self.SECTION}.{name}" if self.SECTION else name, reason)

  def _require(self, ok: bool, name: str, reason: str):
    if not ok:
      self._fail(name, f"{reason}, got {getattr(self, name)!r}")

  def _one_of(self, name: str, allowed: tuple[str, ...]):
    self._require(getattr(self, name) in allowed, name, f"must be one of {allowed}")


def schema_of(cls) -> dict[str, Any]:
  """{field: default} of dataclass `cls`, nested sections as dicts."""
  out = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out[f.name] = schema_of(hints[f.name])
    else:
      out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
  return out


def as_dict(obj: Any) -> Any:
  """A built (nested) dataclass as plain dicts, lists and scalars (JSON-serialisable)."""
  if dataclasses.is_dataclass(obj):
    return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {k: as_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [as_dict(v) for v in obj]
  return obj


def build(cls, raw: Mapping[str, Any], prefix: str = ""):
  """Instantiates dataclass `cls` from `raw`, rejecting unknown keys and wrong types."""
  if not isinstance(raw, Mapping):
    raise ConfigError(prefix.rstrip("."), f"must be a section (dict), got {type(raw).__name__}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - names)
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {sorted(names)}"
    raise ConfigError(prefix + unknown[0], f"unknown key (not in the schema); {hint}")
  kwargs = {}
  for key in names - set(raw):  # a missing section is built from its defaults (and checked)
    if dataclasses.is_dataclass(hints[key]):
      kwargs[key] = build(hints[key], {}, f"{prefix}{key}.")
  for key, value in raw.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      kwargs[key] = build(hint, value if value is not None else {}, f"{prefix}{key}.")
    else:
      kwargs[key] = coerce(value, hint, prefix + key)
  return cls(**kwargs)


def coerce(value: Any, hint: Any, field: str) -> Any:
  """Checks `value` against a field type; int -> float is allowed, and a tuple of strings may
  be given as a list or as one (comma-separated) string."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (types.UnionType, typing.Union):
    if value is None and type(None) in args:
      return None
    (hint,) = [a for a in args if a is not type(None)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is bool:
    ok = isinstance(value, bool)
  elif hint is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif hint is str:
    ok = isinstance(value, str)
  elif origin is tuple:
    if isinstance(value, str):  # a single path given on the command line
      value = (value,)
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    value = _split_commas(value) if ok else value
  elif origin is Mapping or hint is Mapping:
    ok = isinstance(value, Mapping)
  else:  # pragma: no cover - a schema type this function does not know
    raise TypeError(f"{field}: unsupported schema type {hint}")
  if not ok:
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(field, f"expected {name}, got {type(value).__name__} {value!r}")
  return value


def _split_commas(values) -> tuple[str, ...]:
  """('a.parquet,b.parquet', ' c ', '') -> ('a.parquet', 'b.parquet', 'c'): the command line's
  comma-separated form; empty entries (e.g. an empty --config value) are dropped."""
  return tuple(v.strip() for entry in values for v in entry.split(",") if v.strip())
