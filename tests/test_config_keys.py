"""Every key of fipo_jax/recipes.py:base() is read by the code, or refused (config.py's promise).

The check reads fipo_jax/'s sources with `ast`, not by grepping names: a key `rl.n` counts as
read only where `.n` is taken of a value that is the `rl` section, i.e. `rc.rl.n`, `x.n` after
`x = rc.rl`, a parameter annotated `RLSection` (or named `rl`), a parameter that receives the
section at a call site (`write_dataset(dir, rc.data.synthetic)` -> `task_cfg.ops`), `self.n`
in a public method or property of the section's dataclass (`RLSection.num_mini_batches`), or a
generic copy `getattr(section, name)` into a class with a field of that name
(`PolicyLossConfig.from_config`). The schema modules' validation (`__post_init__`, private
helpers, `validate`) is not a read: checking a value is not using it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import pathlib
import re
import types
import typing

import jax
import ml_collections
import pytest

from fipo_jax import config as config_lib
from fipo_jax import recipes
from fipo_jax.config_schema import Section

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fipo_jax"
SCHEMA_MODULES = ("config.py", "config_mesh.py", "config_rl.py", "config_rollout.py",
                  "config_schema.py")
# Consumed by validation itself, which turns them into a field that code reads.
CONSUMED_BY_VALIDATION = {
  ("model", "preset_overrides"): "merged into model.overrides (on the preset only)",
}


def _section_classes(cls=config_lib.RunConfig, path=()) -> dict[tuple[str, ...], type]:
  """{(): RunConfig, ('rl',): RLSection, ('data', 'synthetic'): SyntheticSection, ...}."""
  out = {path: cls}
  for name, hint in typing.get_type_hints(cls).items():
    if isinstance(hint, type) and issubclass(hint, Section):
      out.update(_section_classes(hint, path + (name,)))
  return out


SECTIONS = _section_classes()


def leaf_keys(c: ml_collections.ConfigDict, path=()) -> list[tuple[str, ...]]:
  """The key paths of `c` that are fields (not sections), e.g. ('rl', 'n'), ('seed',)."""
  out = []
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict) and path + (key,) in SECTIONS:
      out += leaf_keys(value, path + (key,))
    else:
      out.append(path + (key,))
  return out


@dataclasses.dataclass
class _Fn:
  node: ast.FunctionDef
  cls_fields: frozenset[str]  # fields of the enclosing class (for generic copies)
  bound: dict[str, tuple[str, ...]]  # local names that hold a section

  @functools.cached_property
  def nodes(self) -> list[ast.AST]:
    """ast.walk of the function, once (the fixpoint and the reads visit it again and again)."""
    return list(ast.walk(self.node))


@functools.cache
def _parse(text: str) -> ast.Module:
  """A module's syntax tree, parsed once per text (the tests read the same sources repeatedly,
  with one decoy module changed; the trees are only read)."""
  return ast.parse(text)


def _functions(sources: dict[str, str]) -> list[_Fn]:
  """Every function of the non-schema modules, and the public methods of the schema's
  section classes (with `self` bound to their section)."""
  out = []
  for name, text in sources.items():
    tree = _parse(text)
    schema = pathlib.Path(name).name in SCHEMA_MODULES
    for cls_node in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
      fields = frozenset(
        t.target.id
        for t in cls_node.body
        if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)
      )
      for fn in cls_node.body:
        if not isinstance(fn, ast.FunctionDef):
          continue
        if schema:  # inherited too: SamplerMeshSection.as_tuple is MeshSection's
          if not fn.name.startswith("_"):
            out += [
              _Fn(fn, fields, {"self": path})
              for path, cls in SECTIONS.items()
              if any(c.__name__ == cls_node.name for c in cls.__mro__)
            ]
        else:
          out.append(_Fn(fn, fields, {}))
    if not schema:
      out += [_Fn(fn, frozenset(), {}) for fn in tree.body if isinstance(fn, ast.FunctionDef)]
      out += [
        _Fn(fn, frozenset(), {})
        for top in tree.body
        if isinstance(top, ast.FunctionDef)
        for fn in ast.walk(top)
        if isinstance(fn, ast.FunctionDef) and fn is not top
      ]
  return out


def _section_of(expr, bound) -> tuple[str, ...] | None:
  """The section path `expr` evaluates to, or None."""
  if isinstance(expr, ast.Name):
    return bound.get(expr.id)
  if isinstance(expr, ast.BoolOp):  # rc = run_config or config_lib.validate(config)
    return next((p for p in (_section_of(v, bound) for v in expr.values) if p is not None), None)
  if isinstance(expr, ast.Call) and getattr(expr.func, "attr", None) == "validate":
    return ()
  if isinstance(expr, ast.Attribute):
    if expr.attr in ("rc", "run_config"):
      return ()
    base = _section_of(expr.value, bound)
    if base is not None and base + (expr.attr,) in SECTIONS:
      return base + (expr.attr,)
  return None


def _bind_params(fn: _Fn) -> None:
  by_class = {cls.__name__: path for path, cls in SECTIONS.items()}
  top = {path[0]: path for path in SECTIONS if len(path) == 1}
  for arg in fn.node.args.args + fn.node.args.kwonlyargs:
    note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
    hits = [path for cls, path in by_class.items() if re.search(rf"\b{cls}\b", note)]
    if hits:
      fn.bound[arg.arg] = hits[0]
    elif arg.arg in ("rc", "run_config"):
      fn.bound[arg.arg] = ()
    elif arg.arg in top and not note:
      fn.bound[arg.arg] = top[arg.arg]


def _propagate(fns: list[_Fn]) -> None:
  """Local assignments and call sites, to a fixpoint: f(x.rl) binds f's parameter to rl."""
  by_name: dict[str, list[_Fn]] = {}
  for fn in fns:
    by_name.setdefault(fn.node.name, []).append(fn)
  # Each function's assignments and calls of known functions, in walk order, found once: the
  # fixpoint below revisits them until nothing changes.
  steps = [(fn, [(node, _assigned(node), _callees(node, by_name)) for node in fn.nodes])
           for fn in fns]  # fmt: skip
  steps = [(fn, [s for s in nodes if s[1] or s[2]]) for fn, nodes in steps]
  changed = True
  while changed:
    changed = False
    for fn, nodes in steps:
      for node, assigned, callees in nodes:
        for name, value in assigned:
          path = _section_of(value, fn.bound)
          if path is not None and fn.bound.get(name) != path:
            fn.bound[name], changed = path, True
        for target in callees:
          changed |= _bind_call(node, target, fn.bound)


def _callees(node, by_name: dict[str, list[_Fn]]) -> list[_Fn]:
  """The functions a call node may call, by name (none if `node` is no call)."""
  if not isinstance(node, ast.Call):
    return []
  func = node.func
  return by_name.get(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None),
                     [])


def _assigned(node) -> list[tuple[str, ast.expr]]:
  """(name, value) pairs of `x = v`, `x: T = v` and `x, y = v, w`."""
  if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
    return [(node.target.id, node.value)]
  if not isinstance(node, ast.Assign) or len(node.targets) != 1:
    return []
  target, value = node.targets[0], node.value
  if isinstance(target, ast.Name):
    return [(target.id, value)]
  if (
    isinstance(target, ast.Tuple)
    and isinstance(value, ast.Tuple)
    and len(target.elts) == len(value.elts)
  ):
    return [
      (t.id, v) for t, v in zip(target.elts, value.elts, strict=True) if isinstance(t, ast.Name)
    ]
  return []


def _bind_call(call: ast.Call, target: _Fn, bound) -> bool:
  params = [a.arg for a in target.node.args.args]
  if params and params[0] in ("self", "cls"):
    params = params[1:]
  pairs = list(zip(params, call.args, strict=False))
  pairs += [(k.arg, k.value) for k in call.keywords if k.arg]
  changed = False
  for param, arg in pairs:
    path = _section_of(arg, bound)
    if path is not None and target.bound.get(param) != path:
      target.bound[param], changed = path, True
  return changed


def reads(sources: dict[str, str], leaves: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
  """The leaves that some function of `sources` reads (see the module docstring)."""
  fns = _functions(sources)
  for fn in fns:
    _bind_params(fn)
  _propagate(fns)
  wanted, found = set(leaves), set()
  for fn in fns:
    for node in fn.nodes:
      if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):  # not `c.rl.n = 4`
        path = _section_of(node.value, fn.bound)
        if path is not None and path + (node.attr,) in wanted:
          found.add(path + (node.attr,))
      if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "getattr"
        and len(node.args) >= 2
      ):
        path = _section_of(node.args[0], fn.bound)
        if path is None:
          continue
        name = node.args[1]
        names = [name.value] if isinstance(name, ast.Constant) else fn.cls_fields
        found |= {path + (n,) for n in names if path + (n,) in wanted}
  return found


def package_sources() -> dict[str, str]:
  """fipo_jax/'s modules but the recipe base, which sets every key (setting is not reading)."""
  return {
    str(p.relative_to(PACKAGE.parent)): p.read_text()
    for p in sorted(PACKAGE.rglob("*.py"))
    if p != PACKAGE / "recipes.py"
  }


def test_every_key_of_base_is_read_by_the_code():
  leaves = leaf_keys(recipes.base())
  assert ("rl", "n") in leaves and ("data", "synthetic", "ops") in leaves and ("seed",) in leaves
  unread = set(leaves) - reads(package_sources(), leaves) - set(CONSUMED_BY_VALIDATION)
  assert not unread, f"keys no code reads: {sorted('.'.join(k) for k in unread)}"


def test_keys_consumed_by_validation_are_not_read_elsewhere_and_do_take_effect():
  leaves = leaf_keys(recipes.base())
  assert set(CONSUMED_BY_VALIDATION) <= set(leaves)
  assert not reads(package_sources(), leaves) & set(CONSUMED_BY_VALIDATION)
  c = recipes.base()
  c.model.preset_overrides = {"num_layers": 3}
  assert config_lib.validate(c, check_paths=False).model.overrides["num_layers"] == 3


@pytest.mark.slow
def test_the_check_flags_a_key_that_no_code_reads():
  """A dummy key added to a copy of the schema is flagged, whether it is absent from the code,
  only validated, or only a same-named attribute of something else; reading it clears it."""
  leaves = leaf_keys(recipes.base()) + [("rl", "dummy_unread_key")]
  sources = package_sources()
  decoys = {
    "fipo_jax/config_rl.py": sources["fipo_jax/config_rl.py"].replace(
      "  def __post_init__(self):\n    self._check_loss()",
      "  def __post_init__(self):\n    assert self.dummy_unread_key\n    self._check_loss()",
    ),
    "fipo_jax/decoy.py": (
      "def f(batch, rc):\n  return batch.dummy_unread_key, rc.optim\n"
      "def g(model):\n  return model.rl.x.dummy_unread_key\n"
    ),
  }
  assert decoys["fipo_jax/config_rl.py"] != sources["fipo_jax/config_rl.py"]
  found = reads({**sources, **decoys}, leaves)
  assert ("rl", "dummy_unread_key") not in found
  assert ("rl", "n") in found and ("optim", "lr") in found
  for reader in (
    "def h(rc):\n  return rc.rl.dummy_unread_key\n",
    "def h(rc):\n  rl = rc.rl\n  return rl.dummy_unread_key\n",
    "def h(self):\n  rc, n = self.rc, 1\n  return rc.rl.dummy_unread_key\n",
    "def h(s: 'config_lib.RLSection'):\n  return s.dummy_unread_key\n",
    "def h(rc):\n  return k(rc.rl)\ndef k(section):\n"
    "  return getattr(section, 'dummy_unread_key')\n",
  ):
    assert ("rl", "dummy_unread_key") in reads({**sources, "fipo_jax/decoy.py": reader}, leaves)


@pytest.mark.parametrize(
  "path",
  [
    ("rl", "filter_groups_metric"),
    ("rl", "reward_fn"),
    ("log_every",),
    ("rl", "kl_loss_type"),
    ("optim", "schedule"),
  ],
)
@pytest.mark.slow
def test_the_keys_of_issue_15_are_read(path):
  assert path in reads(package_sources(), leaf_keys(recipes.base()))


def test_log_every_writes_every_k_steps_and_the_last(tmp_path, monkeypatch):
  from configs import tiny_cpu  # noqa: PLC0415
  from fipo_jax.rl import trainer  # noqa: PLC0415

  config = tiny_cpu.get_config("runlocal")
  config.sft.steps, config.eval_every, config.checkpoint_every = 0, 0, 0
  config.total_steps, config.log_every = 7, 3
  monkeypatch.setattr(
    trainer,
    "rl_step",
    lambda rc, env, steps, state: (
      state.replace(step=state.step + 1),
      {"train/nonfinite_updates": 0, "train/step_seen": state.step + 1},
    ),
  )
  trainer.run(config, str(tmp_path), devices=jax.devices()[:1])
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [3, 6, 7]
  assert [r["train/step_seen"] for r in rows] == [3, 6, 7]


@pytest.mark.parametrize(
  "done, evaluated, stopping, want",
  [
    (2, False, False, False),
    (3, False, False, True),
    (2, True, False, True),
    (2, False, True, True),
    (10, False, False, True),  # the last step
  ],
)
def test_log_every_rule(done, evaluated, stopping, want):
  from fipo_jax.rl import trainer  # noqa: PLC0415

  rc = types.SimpleNamespace(log_every=3, total_steps=10)
  assert trainer.logs_step(rc, done, evaluated=evaluated, stopping=stopping) is want
