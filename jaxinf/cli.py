"""The command line: `python -m jaxinf` (or the `jaxinf` console script).

    jaxinf list [experiments|models|solvers|decoders|kernels]   # one line each
    jaxinf run NAME [OPTIONS...]                                # python -m experiments.NAME ...
    jaxinf NAME [OPTIONS...]                                    # the same, shorter

Every listing is read from the registries the library itself uses (the family registry, the DiT
configs, `solvers.SOLVERS`, the kernels' dispatch) or from the docstrings of the functions it
names, so it cannot fall out of date with the code. Experiments are listed from their modules'
docstrings without importing them (importing one loads JAX and its study); `run` executes the
module as `python -m experiments.NAME` would, so every option, `--help` and `--smoke` is the
experiment's own.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# (listed name, "module:function") for the decoders: the first docstring line is the description
DECODERS = (
    ("generate", "jaxinf.decoding.generate:generate"),
    ("speculative", "jaxinf.decoding.speculative:speculative_generate"),
    ("prompt_lookup", "jaxinf.decoding.lookup:prompt_lookup_generate"),
    ("trie_lookahead", "jaxinf.decoding.lookup:trie_lookahead_generate"),
    ("jacobi", "jaxinf.decoding.jacobi:jacobi_generate"),
    ("lookahead", "jaxinf.decoding.jacobi:lookahead_generate"),
    ("sjd", "jaxinf.decoding.jacobi:sjd_generate"),
    ("medusa", "jaxinf.decoding.medusa:medusa_generate"),
    ("ead", "jaxinf.decoding.adaptive:ead_generate"),
    ("contrastive", "jaxinf.decoding.contrastive:contrastive_generate"),
    ("sample_n", "jaxinf.decoding.scaling:sample_n"),
)
KERNELS = ("attention", "attention_step", "lightning_attention", "lightning_attention_step",
           "selective_scan", "selective_scan_step", "wkv7", "wkv7_step")
SECTIONS = ("experiments", "models", "solvers", "decoders", "kernels")
USAGE = __doc__.split("\n\n")[1]


WIDTH = 110  # a listing line is cut here (with an ellipsis)


def first_line(doc: str | None) -> str:
  """A docstring's first sentence, on one line ('' when there is none)."""
  paragraph = " ".join(line.strip() for line in (doc or "").strip().split("\n\n")[0].splitlines())
  for match in re.finditer(r"\. ", paragraph):
    if not re.search(r"\b(al|eq|e\.g|i\.e|cf|vs|Fig|Sec|Alg)$", paragraph[:match.start()]):
      return paragraph[:match.start() + 1]
  return paragraph


def _cut(line: str, width: int) -> str:
  return line if len(line) <= width else line[:width - 1].rstrip() + "…"


def _experiments_dir() -> Path:
  """Where the `experiments` package lives, found by name and not imported: the library never
  depends on a study (tests/experiments/test_layout.py); the command line only launches them."""
  spec = importlib.util.find_spec("experiments")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("jaxinf: the experiments package is not installed beside jaxinf "
                     "(pip install -e . from the repository)")
  return Path(list(spec.submodule_search_locations)[0])


def experiment_names() -> list[str]:
  """Runnable experiments: the modules of the `experiments` package except its shared helpers."""
  return sorted(m.name for m in pkgutil.iter_modules([str(_experiments_dir())])
                if m.name != "common" and not m.name.startswith("_"))


def experiment_lines() -> list[tuple[str, str]]:
  root = _experiments_dir()
  return [(name, first_line(ast.get_docstring(ast.parse((root / f"{name}.py").read_text()))))
          for name in experiment_names()]


def model_lines() -> list[tuple[str, str]]:
  from jaxinf.models.dit import DIT_CONFIGS
  from jaxinf.models.families import FAMILIES
  rows = []
  for name, family in FAMILIES.items():
    rows.append((name, f"{family.model_type.__name__} (family); sizes: "
                       f"{', '.join(sorted(family.sizes))}"))
  for name, c in DIT_CONFIGS.items():
    rows.append((name, f"DiT: depth {c.depth}, width {c.hidden_size}, {c.num_heads} heads, patch "
                       f"{c.patch_size}, {c.input_size}x{c.input_size}x{c.in_channels} inputs, "
                       f"{c.num_classes} classes"))
  return rows


def solver_lines() -> list[tuple[str, str]]:
  from jaxinf.diffusion.solvers import SOLVERS
  return [(name, f"{cls.__name__}: {first_line(cls.__doc__)}") for name, cls in SOLVERS.items()]


def _resolve(path: str) -> Callable:
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


def decoder_lines() -> list[tuple[str, str]]:
  return [(name, f"{path.split(':')[1]}: {first_line(inspect.getdoc(_resolve(path)))}")
          for name, path in DECODERS]


def kernel_lines() -> list[tuple[str, str]]:
  import pallas_kernels
  from pallas_kernels.dispatch import IMPLS
  return [(name, f"{first_line(inspect.getdoc(getattr(pallas_kernels, name)))}")
          for name in KERNELS] + [("(impl=)", " | ".join(IMPLS))]


LISTERS = {"experiments": experiment_lines, "models": model_lines, "solvers": solver_lines,
           "decoders": decoder_lines, "kernels": kernel_lines}


def print_sections(sections: Sequence[str]) -> None:
  for i, section in enumerate(sections):
    rows = LISTERS[section]()
    width = max(len(name) for name, _ in rows)
    print(("\n" if i else "") + f"{section}:")
    for name, line in rows:
      print(_cut(f"  {name:{width}s}  {line}", WIDTH))


def run_experiment(name: str, argv: Sequence[str]) -> None:
  """Runs `experiments.<name>` as `python -m experiments.<name> argv...` would."""
  names = experiment_names()
  if name not in names:
    raise SystemExit(f"jaxinf: unknown experiment {name!r}; experiments: {', '.join(names)}")
  saved = sys.argv
  sys.argv = [f"jaxinf {name}", *argv]
  try:
    runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=True)
  finally:
    sys.argv = saved


def main(argv: Sequence[str] | None = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = args[0], args[1:]
  if command == "list":
    unknown = [s for s in rest if s not in SECTIONS]
    if unknown:
      raise SystemExit(f"jaxinf list: unknown section {unknown[0]!r}; sections: "
                       f"{', '.join(SECTIONS)}")
    print_sections(rest or SECTIONS)
    return 0
  if command == "run":
    if not rest:
      raise SystemExit(f"jaxinf run: name an experiment: {', '.join(experiment_names())}")
    command, rest = rest[0], rest[1:]
  run_experiment(command, rest)
  return 0


if __name__ == "__main__":
  sys.exit(main())
