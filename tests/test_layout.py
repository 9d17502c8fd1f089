"""The layout a newcomer relies on: no module of examples/ or benchmarks/ above 800 lines, no import
circle among the project's modules (imports inside functions and for type checking included), and
the library importing nothing of the examples, benchmarks, Flax or the datasets."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("padam_jax", "examples", "benchmarks")
MAX_LINES = 800


def modules() -> dict[str, pathlib.Path]:
  """Every module of the project by its dotted name (a package by its ``__init__``)."""
  found = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The project's modules that ``path`` imports anywhere in it (``from a import b`` is module
  ``a.b`` when that is a module, else ``a``)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if submodule in known else node.module)
  return found & known


def test_no_module_of_the_examples_or_benchmarks_is_too_long():
  long = {
    name: n
    for name, path in modules().items()
    if not name.startswith("padam_jax") and (n := len(path.read_text().splitlines())) > MAX_LINES
  }
  assert not long, f"modules above {MAX_LINES} lines: {long}"


def test_no_import_circle():
  found = modules()
  graph = {name: imports(path, set(found)) - {name} for name, path in found.items()}
  for start in graph:  # nothing reached from a module leads back to it
    path, todo, reached = {}, list(graph[start]), set()
    for name in todo:
      path.setdefault(name, [start, name])
    while todo:
      name = todo.pop()
      if name in reached:
        continue
      reached.add(name)
      for nxt in graph[name]:
        path.setdefault(nxt, [*path[name], nxt])
        todo.append(nxt)
    assert start not in reached, " -> ".join(path[start])


@pytest.mark.parametrize("forbidden", ["examples", "benchmarks", "flax", "orbax"])
def test_the_library_knows_nothing_of_the_examples(forbidden):
  for name, path in modules().items():
    if name.startswith("padam_jax"):
      names = {n.split(".")[0] for n in imports_all(path)}
      assert forbidden not in names, name


def imports_all(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
  return found
