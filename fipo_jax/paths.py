"""One path layer for every file the trainer, the CLIs and the metric writers touch.

A path is a plain string: a local path or a URL that `etils.epath` understands (`gs://bucket/run`,
the same layer orbax writes checkpoints through). Local paths behave exactly as with `os`:

  paths.makedirs("gs://bucket/run")
  paths.write_text(paths.join("gs://bucket/run", "config.json"), text)   # atomic when local
  local = paths.local_copy("gs://bucket/models/qwen")  # a local cached copy for readers that
                                                       # need one (safetensors memmap, tokenizers)
  paths.upload("/tmp/mirror/tensorboard", "gs://bucket/run/tensorboard")

`gs://` needs fsspec's GCS filesystem, `gcsfs` (orbax's gs:// checkpoints also need
`google-cloud-storage`): both are the `[gcs]` extra, part of `[tpu]`. Use this module rather than
`os`/`open` for any path that may be a URL: `os.makedirs("gs://b/run")` creates `./gs:/b/run`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import IO

from etils import epath

# Where `local_copy` keeps downloaded files (one folder per remote path).
CACHE_ENV = "FIPO_JAX_CACHE"


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs (`gs://...`): anything not on the local filesystem."""
  return "://" in os.fspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`os.path.join` that keeps a URL's `scheme://` intact."""
  if not is_remote(base):
    return os.path.join(os.fspath(base), *parts)
  return os.fspath(epath.Path(base).joinpath(*parts))


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL unchanged (orbax and tensorstore want either)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
  """A file object for reading or (over)writing. A local write creates the parent directory
  (object stores have none to create)."""
  path = os.fspath(path)
  if any(c in mode for c in "wax") and not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return epath.Path(path).open(mode)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` whole: locally through a temporary file and a rename, so a reader never sees
  half a file; on a bucket an object upload is already all-or-nothing."""
  path = os.fspath(path)
  if is_remote(path):
    with open_file(path, "wb") as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def upload(local: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
  """Copies a local file, or a directory tree, to `dest` (overwriting); returns the files
  written. Used to mirror files that only local writers can produce (TensorBoard, tokenizers)."""
  local, dest = os.fspath(local), os.fspath(dest)
  if os.path.isfile(local):
    _copy_stream(local, dest)
    return [dest]
  written = []
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    target = dest if rel == "." else join(dest, *rel.split(os.sep))
    makedirs(target)
    for name in sorted(files):
      written.append(_copy_stream(os.path.join(root, name), join(target, name)))
  return written


def local_copy(path: str | os.PathLike, cache_dir: str | None = None) -> str:
  """A local path with the contents of `path` (a file or a directory tree).

  Local paths come back unchanged. A URL is downloaded into `cache_dir` (default
  $FIPO_JAX_CACHE or ~/.cache/fipo_jax/remote), one folder per URL; a file already there is
  downloaded again only if its size or modification time changed.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return path
  src = epath.Path(path)
  if not src.exists():
    raise FileNotFoundError(f"not found: {path}")
  root = (
    cache_dir
    or os.environ.get(CACHE_ENV)
    or os.path.join(os.path.expanduser("~"), ".cache", "fipo_jax", "remote")
  )
  tag = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
  name = os.path.basename(path.rstrip("/"))
  out = os.path.join(root, tag, "data", name)
  _download_tree(src, out, os.path.join(root, tag, "stamps", name))
  return out


def _download_tree(src: epath.Path, dst: str, stamp: str) -> None:
  """Copies a file or directory `src` (any epath) to the local `dst`; `stamp` mirrors `dst`
  with each file's source size and mtime (iterdir keeps the URL's scheme on every child,
  unlike fsspec's walk)."""
  if not src.is_dir():
    _download(src, dst, stamp)
    return
  os.makedirs(dst, exist_ok=True)
  for child in src.iterdir():
    _download_tree(child, os.path.join(dst, child.name), os.path.join(stamp, child.name))


def _copy_stream(src: str, dst: str) -> str:
  with open(src, "rb") as fin, open_file(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 20)
  return dst


def _download(src: epath.Path, dst: str, stamp_file: str) -> None:
  """Downloads `src` to `dst` unless the copy there came from the same size and mtime (an
  unknown mtime always downloads)."""
  st = src.stat()
  stamp = f"{st.length} {st.mtime}"
  if st.mtime and os.path.isfile(dst) and os.path.isfile(stamp_file):
    with open(stamp_file) as f:
      if f.read() == stamp:
        return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = f"{dst}.part{os.getpid()}"  # per process: hosts sharing a cache never mix halves
  with src.open("rb") as fin, open(tmp, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 20)
  os.replace(tmp, dst)
  write_bytes(stamp_file, stamp.encode())
