"""The suite's schedule: tests/durations.json names real test files, and conftest's collection
hook starts the longest files first while keeping each file's tests together and in order."""

from __future__ import annotations

import json
import types

import conftest


def test_durations_name_existing_test_files():
  seconds = json.loads(conftest.DURATIONS.read_text())
  assert seconds and all(v > 0 for v in seconds.values())
  missing = [p for p in seconds if not (conftest.ROOT / p).is_file()]
  assert not missing, f"tests/durations.json names files that are gone: {missing}"


def test_longest_files_first_each_file_together_and_in_order(monkeypatch, tmp_path):
  durations = tmp_path / "durations.json"
  durations.write_text(json.dumps({"tests/test_b.py": 50, "tests/test_c.py": 200}))
  monkeypatch.setattr(conftest, "DURATIONS", durations)
  ids = ["tests/test_a.py::x", "tests/test_b.py::y1", "tests/test_c.py::z", "tests/test_b.py::y2",
         "tests/test_d.py::w", "tests/test_b.py::y3"]
  items = [types.SimpleNamespace(nodeid=i) for i in ids]
  conftest.pytest_collection_modifyitems(None, items)
  assert [i.nodeid for i in items] == [
    "tests/test_c.py::z",  # 200 s
    "tests/test_b.py::y1", "tests/test_b.py::y2", "tests/test_b.py::y3",  # 50 s, in order
    "tests/test_a.py::x", "tests/test_d.py::w",  # unknown: last, in collection order
  ]
