"""The package's modules import each other without a circle (TYPE_CHECKING imports count too:
they are the same tie to a reader).

A circle means no module of it can be read, tested or moved without the others; the last one
(rollout -> setup -> warmstart -> rollout) hid the warm start inside the trainer's setup.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fipo_jax"


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports (`from a import b` names a.b when it is one)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
      continue
    out |= {n for n in names if n in modules}
  return out


def import_graph() -> dict[str, set[str]]:
  files = {_module(p): p for p in PACKAGE.rglob("*.py")}
  # A package's __init__ only hands names on; a tie through it is a tie to its modules.
  return {m: _imports(p, set(files)) - {m} for m, p in files.items() if p.name != "__init__.py"}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of `graph` as [a, b, ..., a], or None (depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    path.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return path[path.index(n) :] + [n]
      if n not in state and (found := visit(n)):
        return found
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_find_circle_finds_one():
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
  graph = import_graph()
  assert "fipo_jax.rl.rollout" in graph and "fipo_jax.rl.setup" in graph["fipo_jax.rl.trainer"]
  assert find_circle(graph) is None, " -> ".join(find_circle(graph))
