"""Imports flow one way: data -> model -> training -> evaluation -> cli; the library never imports
`tasks` (registration is a side effect kept for the CLI and tests), and `data` has no JAX/Flax."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ["data", "teacher", "model", "training", "evaluation"]
# Packages a layer must never import (besides layers to its right).
FORBIDDEN_THIRD_PARTY = {"data": {"jax", "flax", "optax", "orbax"}}


def _imports(path):
  tree = ast.parse(path.read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module


def _library_files():
  return sorted((ROOT / "specialize_jax").rglob("*.py"))


def test_there_are_library_files():
  assert len(_library_files()) > 10


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
  relative = path.relative_to(ROOT / "specialize_jax").parts
  layer = relative[0] if len(relative) > 1 else None
  for name in _imports(path):
    parts = name.split(".")
    assert parts[0] != "tasks" or path.name == "cli.py", f"{path} imports {name}"
    if layer in LAYERS:
      assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(layer, set()), f"{path} imports {name}"
      if parts[0] == "specialize_jax" and len(parts) > 1 and parts[1] in LAYERS:
        assert LAYERS.index(parts[1]) <= LAYERS.index(layer), (
            f"{path} ({layer}) imports {name}: imports must flow data -> model -> training -> "
            "evaluation -> cli")
