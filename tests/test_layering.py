"""The package's imports run one way: each module imports only from its own layer or the layers below, and no
set of modules imports itself in a circle (function-local imports count too)."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cassr_jax"

# Lowest first. A module belongs to the first entry whose prefix matches its dotted name (after "cassr_jax.").
LAYERS: list[tuple[str, ...]] = [
    ("jax_compat", "image_ops", "tiling", "parallel", "nn"),
    ("models",),
    ("registry", "checkpoint"),
    # Samplers need only jax and the registry, so SD-based stage-1 activations can run them.
    ("schedulers", "sampling"),
    ("convert",),
    ("activation", "text", "data"),
    ("color", "pipelines"),
    ("config", "train", "eval"),
    ("cli",),
]
ROOT_MODULE = "cassr_jax"  # the package's own __init__ (a docstring)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
  if module == ROOT_MODULE:
    return -1
  rest = module[len(ROOT_MODULE) + 1:]
  for index, prefixes in enumerate(LAYERS):
    if any(rest == p or rest.startswith(p + ".") for p in prefixes):
      return index
  raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _imports(path: pathlib.Path, module: str) -> set[str]:
  """Our modules that `path` imports, anywhere in the file (resolved to modules, not attributes)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      if name == ROOT_MODULE or name.startswith(ROOT_MODULE + "."):
        found.add(name)
  return found


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for module, path in files.items():
    targets = set()
    for name in _imports(path, module):
      # "from cassr_jax.models import ModelKind" names an attribute: keep the longest real module prefix.
      while name not in files and "." in name:
        name = name.rpartition(".")[0]
      if name in files and name != module:
        targets.add(name)
    graph[module] = targets
  return graph


def test_every_module_has_a_layer():
  for module in _graph():
    _layer(module)


def test_no_upward_imports():
  upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
            for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
  assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(node: str):
    state[node] = 1
    stack.append(node)
    for target in sorted(graph[node]):
      # A package __init__ imported by its own submodule is fine as long as __init__ does not import back.
      if state.get(target) == 1:
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("from cassr_jax.models import unet\n", {"cassr_jax.models", "cassr_jax.models.unet"}),
    ("def f():\n  from . import strict\n", {"cassr_jax.convert", "cassr_jax.convert.strict"}),
    ("import cassr_jax.checkpoint as c\n", {"cassr_jax.checkpoint"}),
])
def test_import_scanner_sees_local_and_relative_imports(tmp_path, source, expected):
  path = tmp_path / "mod.py"
  path.write_text(source)
  assert _imports(path, "cassr_jax.convert.mod") == expected
