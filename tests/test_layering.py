"""Imports flow one way, in the order of the pipeline: every module of the installed package
(including the task registrations, `specialize_jax.tasks`, kept in the repository's tasks/) belongs
to one layer and imports only its own layer and layers to its left. `data` has no JAX/Flax, and
only the command line registers the tasks."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The pipeline: the data and the teacher's samples, aligned and prepared, train a model whose
# checkpoints the trainer writes, `plan` sizes, the evaluation reads and `serve` answers with; jobs
# assemble the steps, the demo and the T5X bridge run them, the command line parses flags and calls
# them.
LAYERS = ["runtime", "data", "teacher", "align", "prepared", "model", "checkpoints", "training",
          "planning", "evaluation", "serving", "jobs", "demo", "tasks", "integrations", "cli"]
# Modules at the package root that every layer may import.
ROOT_MODULES = {"errors"}
# Packages a layer must never import.
FORBIDDEN_THIRD_PARTY = {"data": {"jax", "flax", "optax", "orbax"}}


def _imports(path):
  tree = ast.parse(path.read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module
      if node.module == "specialize_jax":
        yield from (f"specialize_jax.{alias.name}" for alias in node.names)


def _package_files():
  """(layer, path) of every module of the installed package."""
  files = [(p.relative_to(ROOT / "specialize_jax").parts, p)
           for p in sorted((ROOT / "specialize_jax").rglob("*.py"))]
  files += [(("tasks", p.name), p) for p in sorted((ROOT / "tasks").glob("*.py"))]
  return [(parts[0] if len(parts) > 1 else parts[0][:-3], path) for parts, path in files]


def test_every_module_belongs_to_a_layer():
  stray = [str(path) for layer, path in _package_files()
           if layer not in LAYERS and layer not in ROOT_MODULES and layer != "__init__"]
  assert not stray, f"modules outside every layer: {stray}; add their package to LAYERS"
  assert len(_package_files()) > 60


@pytest.mark.parametrize("layer,path", _package_files(), ids=lambda p: str(p))
def test_imports_flow_one_way(layer, path):
  if layer not in LAYERS:
    return
  for name in _imports(path):
    parts = name.split(".")
    assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(layer, set()), f"{path} imports {name}"
    if parts[0] == "specialize_jax" and len(parts) > 1 and parts[1] in LAYERS:
      assert LAYERS.index(parts[1]) <= LAYERS.index(layer), (
          f"{path} ({layer}) imports {name}: imports must flow {' -> '.join(LAYERS)}")
