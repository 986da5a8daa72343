"""Minimal safetensors reader/writer on numpy memmaps (bf16 via ml_dtypes, no torch)."""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy view of one .safetensors file: tensors are memmap slices, read on access."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self.header = header
    self._data_start = 8 + n
    self._mm = None

  def keys(self):
    return self.header.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self.header[key]
    start, end = info["data_offsets"]
    raw = self._mm[self._data_start + start:self._data_start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def open_dir(hf_dir: pathlib.Path) -> dict[str, SafetensorsFile]:
  """key -> file for a directory with model.safetensors or sharded files (+ index json)."""
  hf_dir = pathlib.Path(hf_dir)
  index = hf_dir / "model.safetensors.index.json"
  if index.exists():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    names = sorted(p.name for p in hf_dir.glob("*.safetensors"))
  if not names:
    raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
  out: dict[str, SafetensorsFile] = {}
  for name in names:
    f = SafetensorsFile(hf_dir / name)
    for key in f.keys():
      if key in out:
        raise ValueError(f"tensor {key!r} appears in both {out[key].path.name} and {name}")
      out[key] = f
  return out


def write_file(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for key, arr in tensors.items():
    nbytes = arr.nbytes
    header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((-len(blob)) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
