"""fipo_jax.algo is the algorithm alone: it imports jax, numpy and pure standard-library modules,
nothing else of fipo_jax, no I/O; the public names stay reachable as `fipo_jax.rl.*`; the
README's loss snippet runs as written."""

import ast
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import fipo_jax.rl as rl
from fipo_jax import algo

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALGO = ROOT / "fipo_jax" / "algo"
# Pure computation only: no os, io, subprocess, logging, pathlib, json, time, threading.
ALLOWED_TOP = {
  "__future__", "abc", "collections", "dataclasses", "enum", "functools", "itertools", "math",
  "operator", "re", "typing", "jax", "numpy",
}  # fmt: skip


def _imports(path: pathlib.Path) -> list[str]:
  """Every module `path` imports, at any depth (function-local imports included)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path.name}: relative import"
      names.append(node.module)
  return names


def _violations(path: pathlib.Path) -> list[str]:
  bad = []
  for name in _imports(path):
    top = name.split(".")[0]
    if top == "fipo_jax":
      if not (name == "fipo_jax.algo" or name.startswith("fipo_jax.algo.")):
        bad.append(name)
    elif top not in ALLOWED_TOP:
      bad.append(name)
  return bad


def test_algo_imports_only_jax_numpy_and_itself():
  files = sorted(ALGO.glob("*.py"))
  assert len(files) >= 7, files
  bad = {p.name: v for p in files if (v := _violations(p))}
  assert not bad, f"fipo_jax.algo must import only jax, numpy and itself: {bad}"


def test_the_rule_catches_a_forbidden_import(tmp_path):
  for line in ("import os", "from fipo_jax import config", "from flax import nnx",
               "def f():\n  from fipo_jax.rl import rewards"):
    p = tmp_path / "m.py"
    p.write_text(line + "\n")
    assert _violations(p), line
  p.write_text("import jax.numpy as jnp\nfrom fipo_jax.algo import fkl\n")
  assert not _violations(p)


def test_public_names_reexported_by_rl():
  for name in algo.__all__:
    assert getattr(rl, name) is getattr(algo, name), name


@pytest.mark.slow
def test_readme_loss_snippet_runs():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"```python\n(from fipo_jax import algo.*?)```", text, re.S)
  assert block, "README lost its loss snippet"
  rng = np.random.default_rng(0)
  b, t = 2, 5
  env = {
    "log_prob": jnp.asarray(rng.normal(-1.0, 0.1, (b, t)), jnp.float32),
    "old_log_prob": jnp.asarray(rng.normal(-1.0, 0.1, (b, t)), jnp.float32),
    "advantages": jnp.asarray(np.repeat([[1.0], [-1.0]], t, axis=1), jnp.float32),
    "mask": jnp.ones((b, t), jnp.float32),
    "delta": jnp.asarray(rng.normal(0.0, 0.01, (b, t)), jnp.float32),
  }
  exec(block.group(1), env)  # noqa: S102 - the README's own code
  assert np.isfinite(float(env["loss"])) and "actor/pg_loss" in env["metrics"]
  assert env["F"].shape == (b, t)
