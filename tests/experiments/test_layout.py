"""Experiments import the library, never each other: the one shared module is experiments.common,
and the library's recipes never import an experiment (DESIGN.md, Experiments)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
  """Every module `path` imports (`from experiments import x` counts as `experiments.x`)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # a relative import reaches a sibling module: never expected here
        names.add("." * node.level + (node.module or ""))
      elif node.module == "experiments":
        names.update(f"experiments.{alias.name}" for alias in node.names)
      else:
        names.add(node.module)
  return names


def test_experiments_share_only_common():
  modules = sorted((ROOT / "experiments").glob("*.py"))
  assert len(modules) > 5  # the glob found the experiments
  for path in modules:
    found = {m for m in _imported_modules(path) if m.startswith(("experiments", "."))}
    assert found <= {"experiments.common"}, f"{path.name} imports {sorted(found)}"


def test_library_never_imports_experiments():
  for path in sorted((ROOT / "jaxinf").rglob("*.py")):
    found = {m for m in _imported_modules(path) if m.split(".")[0] == "experiments"}
    assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"
