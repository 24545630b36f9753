"""`python -m jaxinf`: every registry entry is listed, experiments run by name, bad names refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxinf import cli
from jaxinf.diffusion.solvers import SOLVERS
from jaxinf.models.dit import DIT_CONFIGS
from jaxinf.models.families import FAMILIES


def listing(capsys, *sections) -> str:
  assert cli.main(["list", *sections]) == 0
  return capsys.readouterr().out


def names(text: str, section: str) -> list[str]:
  """The first column of one section of `jaxinf list`."""
  block = text.split(f"{section}:\n")[1].split("\n\n")[0]
  return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_every_section_lists_its_registry(capsys):
  text = listing(capsys)
  assert names(text, "models") == [*FAMILIES, *DIT_CONFIGS]
  assert names(text, "solvers") == list(SOLVERS)
  experiments = names(text, "experiments")
  assert {"quickstart", "scaling", "speculative", "bench_kernels"} <= set(experiments)
  assert "common" not in experiments
  assert names(text, "kernels")[:8] == list(cli.KERNELS)
  assert names(text, "decoders") == [name for name, _ in cli.DECODERS]
  for family in FAMILIES.values():
    for size in family.sizes:
      assert size in text
  assert all(len(line) <= cli.WIDTH for line in text.splitlines())


def test_every_line_has_a_description(capsys):
  text = listing(capsys)
  for line in text.splitlines():
    if line.startswith("  "):
      name, _, description = line.strip().partition(" ")
      assert len(description.strip()) > 10, f"no description for {name!r}"


def test_first_line_skips_abbreviations():
  assert cli.first_line("Jacobi decoding (Santilli et al. 2023): W guesses. More.") == (
      "Jacobi decoding (Santilli et al. 2023): W guesses.")
  assert cli.first_line("One line\ncontinued. Second.\n\nParagraph.") == "One line continued."
  assert cli.first_line(None) == ""


@pytest.mark.parametrize("argv, message", [
    (["list", "modles"], "unknown section 'modles'"),
    (["quickstrat"], "unknown experiment 'quickstrat'"),
    (["run"], "name an experiment"),
    (["run", "common"], "unknown experiment 'common'"),
])
def test_bad_names_are_refused_with_the_choices(argv, message):
  with pytest.raises(SystemExit) as info:
    cli.main(argv)
  assert message in str(info.value)


def test_run_hands_options_to_the_experiment(capsys):
  """`jaxinf run quickstart --help` is the experiment's own --help (its options, its exit code)."""
  with pytest.raises(SystemExit) as info:
    cli.main(["run", "quickstart", "--help"])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert "--samples-per-class" in out and "--smoke" in out


def test_python_dash_m_jaxinf():
  out = subprocess.run([sys.executable, "-m", "jaxinf", "list", "solvers"], capture_output=True,
                       text=True, check=True, timeout=120).stdout
  assert names(out, "solvers") == list(SOLVERS)
