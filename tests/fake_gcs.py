"""A fake GCS bucket for tests: `gs://BUCKET/...` is served from a local directory.

  @pytest.fixture
  def bucket(tmp_path, monkeypatch):
    yield fake_gcs.install(tmp_path, monkeypatch)  # the local directory behind gs://
    fake_gcs.clear_caches()

  def test_x(bucket):
    paths.write_text("gs://b/run/a.txt", "hi")
    assert (bucket / "b" / "run" / "a.txt").read_text() == "hi"

Every layer that a real gs:// workdir goes through is pointed at the directory:
- fsspec's `gs`/`gcs` protocols (what `etils.epath`, and so `fipo_jax.paths` and orbax's file
  handling, use; on a real machine that is gcsfs), as a DirFileSystem that, like an object store,
  needs no parent directories;
- orbax's TensorStore kvstore spec for gs:// (its `gcs` driver talks HTTP to GCS) and its
  bucket lookup (the google-cloud-storage client, for the hierarchical-namespace check).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import types

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

# The module (the package's `fsspec.registry` attribute is a read-only view of its dict).
fsspec_registry = importlib.import_module("fsspec.registry")


class FakeGCSFileSystem(DirFileSystem):
  """fsspec filesystem for `gs://bucket/key`, stored at ROOT/bucket/key."""

  protocol = ("gs", "gcs")
  root: str | None = None

  def __init__(self, *args, **kwargs):
    del args, kwargs  # gcsfs options (e.g. finalize_on_close) mean nothing here
    if FakeGCSFileSystem.root is None:
      raise RuntimeError("fake GCS used outside the fake_gcs fixture")
    super().__init__(path=FakeGCSFileSystem.root, fs=LocalFileSystem(auto_mkdir=True))


def _kvstore(ckpt_path: str) -> dict:
  """TensorStore's spec for a gs:// path: the `file` driver under the fake bucket root."""
  assert ckpt_path.startswith("gs://"), ckpt_path
  return {"driver": "file", "path": os.path.join(FakeGCSFileSystem.root, ckpt_path[5:])}


def clear_caches() -> None:
  """Forgets filesystem instances (epath and fsspec cache them): call after the test."""
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCSFileSystem.clear_instance_cache()


def install(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
  """Serves gs:// from tmp_path/'gcs' (returned) until `monkeypatch` is undone; the test then
  runs in an empty cwd (tmp_path/'cwd') and local_copy caches under tmp_path/'cache'."""
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setattr(FakeGCSFileSystem, "root", str(root))
  for name in ("gs", "gcs"):
    monkeypatch.setitem(fsspec_registry._registry, name, FakeGCSFileSystem)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", _kvstore)
  monkeypatch.setattr(
    gcs_utils,
    "get_bucket",
    lambda name: types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False),
  )
  monkeypatch.setenv("FIPO_JAX_CACHE", str(tmp_path / "cache"))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a stray local write of a gs:// path would land in ./gs:
  clear_caches()
  return root
