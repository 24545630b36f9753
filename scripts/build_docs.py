"""Builds the documentation pages that come from the code and the results, never by hand.

    python scripts/build_docs.py                      # results/ -> docs/experiments/, code -> docs/api/
    python scripts/build_docs.py --results R --out D  # other folders

- `docs/experiments/<name>.md`, one page per experiment: what it does (its module docstring), the
  command, and its latest results: `results/<name>/report.md` and every plot in that folder, copied
  beside the page. An experiment with no results folder gets a page saying so. `index.md` lists
  them all.
- `docs/api/<module>.md`: the API reference, one page per module of `jaxinf` and `pallas_kernels`
  (every public class and function defined there, its signature and docstring); `index.md` lists
  the modules with their first docstring line.

Experiments are read with `ast` (not imported: importing one loads its study); library modules
are imported for their signatures. Run it after an experiment has run to refresh its page.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import pkgutil
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxinf", "pallas_kernels")


def first_line(doc: str | None) -> str:
  lines = (doc or "").strip().splitlines()
  return lines[0].strip() if lines else ""


def experiment_docs(experiments_dir: Path) -> dict[str, str]:
  """{name: module docstring} of the runnable experiments (not the shared `common`)."""
  return {name: doc for name, (doc, _) in experiment_info(experiments_dir).items()}


def experiment_info(experiments_dir: Path) -> dict[str, tuple[str, str | None]]:
  """{name: (module docstring, its `RESULTS_NEED` string or None)}: `RESULTS_NEED`, a module-level
  string constant, says what an experiment needs that a CPU-only machine without model weights
  lacks (a GPU, a checkpoint), so its page can say why it has no results."""
  found = {}
  for path in sorted(experiments_dir.glob("*.py")):
    if path.stem in ("common", "__init__") or path.stem.startswith("_"):
      continue
    tree = ast.parse(path.read_text())
    need = None
    for node in tree.body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1
          and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "RESULTS_NEED"
          and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        need = node.value.value
    found[path.stem] = (ast.get_docstring(tree) or "", need)
  return found


def _results_section(name: str, results: Path, page_dir: Path, need: str | None = None) -> str:
  folder = results / name
  report = folder / "report.md"
  if not report.exists():
    why = f"it needs {need}. " if need else ""
    return (f"No results: `results/{name}/report.md` did not exist when these pages were built; "
            f"{why}Run the command above, then `python scripts/build_docs.py`.\n")
  text = report.read_text()
  lines = text.splitlines()
  if lines and lines[0].startswith("# "):  # the page has its own title
    lines = lines[1:]
  out = [f"From `results/{name}/` (copied by `scripts/build_docs.py`; "
         f"{_provenance(folder)}).", "", *lines, ""]
  plots = sorted(folder.glob("*.png"))
  if plots:
    target = page_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.png"):
      old.unlink()
    out.append("## Plots\n")
    for plot in plots:
      shutil.copy2(plot, target / plot.name)
      out += [f"![{plot.stem}]({name}/{plot.name})", ""]
  return "\n".join(out) + "\n"


def _provenance(folder: Path) -> str:
  meta = folder / "meta.json"
  if not meta.exists():
    return "no meta.json"
  info = json.loads(meta.read_text())
  parts = []
  for key in ("backend", "total_seconds", "smoke"):
    if key in info:
      value = info[key]
      parts.append(f"{key} {value:.0f} s" if key == "total_seconds" else f"{key} {value}")
  return ", ".join(parts) or "meta.json present"


def build_experiment_pages(experiments_dir: Path, results: Path, out: Path) -> list[Path]:
  page_dir = out / "experiments"
  page_dir.mkdir(parents=True, exist_ok=True)
  info = experiment_info(experiments_dir)
  written = []
  index = ["# Experiments", "", "Each page is built by `scripts/build_docs.py` from the "
           "experiment's docstring and its latest `results/<name>/`.", "",
           "| experiment | what it does | results |", "|---|---|---|"]
  for name, (doc, need) in info.items():
    page = [f"# `python -m experiments.{name}`", "", doc.strip(), "", "## Latest results", "",
            _results_section(name, results, page_dir, need)]
    path = page_dir / f"{name}.md"
    path.write_text("\n".join(page))
    written.append(path)
    has = ("yes" if (results / name / "report.md").exists()
           else f"needs {need}" if need else "not yet run")
    index.append(f"| [`{name}`]({name}.md) | {first_line(doc)} | {has} |")
  (page_dir / "index.md").write_text("\n".join(index) + "\n")
  return written


def public_modules() -> list[str]:
  names = []
  for package in PACKAGES:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
      if not any(part.startswith("_") for part in info.name.split(".")):
        names.append(info.name)
  return sorted(names)


def public_members(module) -> list[tuple[str, object]]:
  """Classes and functions defined in `module` whose names do not start with '_'."""
  found = []
  for name, obj in vars(module).items():
    if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
      continue
    if getattr(obj, "__module__", None) == module.__name__:
      found.append((name, obj))
  return found


def _signature(obj) -> str:
  try:
    return str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"


def build_api_pages(out: Path) -> list[Path]:
  page_dir = out / "api"
  page_dir.mkdir(parents=True, exist_ok=True)
  written = []
  index = ["# API reference", "", "Built by `scripts/build_docs.py` from the docstrings.", "",
           "| module | about |", "|---|---|"]
  for name in public_modules():
    module = importlib.import_module(name)
    lines = [f"# `{name}`", "", inspect.getdoc(module) or "", ""]
    for member, obj in public_members(module):
      kind = "class" if inspect.isclass(obj) else "def"
      lines += [f"## `{kind} {member}{_signature(obj)}`", "", inspect.getdoc(obj) or "", ""]
    path = page_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    written.append(path)
    index.append(f"| [`{name}`]({name}.md) | {first_line(inspect.getdoc(module))} |")
  (page_dir / "index.md").write_text("\n".join(index) + "\n")
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", type=Path, default=ROOT / "results")
  parser.add_argument("--out", type=Path, default=ROOT / "docs")
  parser.add_argument("--experiments", type=Path, default=ROOT / "experiments")
  args = parser.parse_args(argv)
  if not args.experiments.is_dir():
    raise SystemExit(f"--experiments: {args.experiments} is not a folder")
  pages = build_experiment_pages(args.experiments, args.results, args.out)
  api = build_api_pages(args.out)
  print(f"wrote {len(pages)} experiment pages and {len(api)} API pages under {args.out}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.exit(main())
