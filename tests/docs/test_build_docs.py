"""scripts/build_docs.py: an experiment page per experiment with its latest results and plots
copied from results/, an API page per public module with every public class and function."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
build_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_docs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  results = tmp_path_factory.mktemp("results")
  (results / "quickstart").mkdir()
  (results / "quickstart" / "report.md").write_text("# Quickstart\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
  (results / "quickstart" / "samples.png").write_bytes(b"\x89PNG fake")
  (results / "quickstart" / "meta.json").write_text(json.dumps({"backend": "cpu",
                                                                 "total_seconds": 88.6}))
  out = tmp_path_factory.mktemp("docs")
  build_docs.main(["--results", str(results), "--out", str(out)])
  return out


def test_every_experiment_has_a_page_with_its_docstring(built):
  names = build_docs.experiment_docs(ROOT / "experiments")
  assert {"quickstart", "scaling", "roofline"} <= set(names) and "common" not in names
  for name, doc in names.items():
    page = (built / "experiments" / f"{name}.md").read_text()
    assert page.startswith(f"# `python -m experiments.{name}`")
    assert doc.strip().splitlines()[0] in page
  index = (built / "experiments" / "index.md").read_text()
  assert all(f"({name}.md)" in index for name in names)


def test_results_and_plots_are_copied_not_written_by_hand(built):
  page = (built / "experiments" / "quickstart.md").read_text()
  assert "| 1 | 2 |" in page and "# Quickstart" not in page  # the report, under the page's title
  assert "backend cpu, total_seconds 89 s" in page
  assert "![samples](quickstart/samples.png)" in page
  assert (built / "experiments" / "quickstart" / "samples.png").read_bytes() == b"\x89PNG fake"
  assert "No results: `results/scaling/report.md`" in (built / "experiments" / "scaling.md").read_text()


def test_api_pages_cover_every_public_function(built):
  # by import_module: `pallas_kernels.attention` is the function or the module depending on
  # which import ran last (the package re-exports the op under its module's name)
  generate = importlib.import_module("jaxinf.decoding.generate")
  attention = importlib.import_module("pallas_kernels.attention")
  for module, names in ((generate, ["generate", "diagnose_nonfinite"]),
                        (attention, ["attention", "attention_step", "AttentionBlocks"])):
    page = (built / "api" / f"{module.__name__}.md").read_text()
    for name in names:
      assert f" {name}(" in page, (module.__name__, name)
    for name in vars(module):
      if name.startswith("_"):
        assert f"## `def {name}(" not in page
  index = (built / "api" / "index.md").read_text()
  assert "(jaxinf.decoding.generate.md)" in index and "(pallas_kernels.wkv.md)" in index


def test_the_committed_pages_cover_every_experiment():
  names = build_docs.experiment_docs(ROOT / "experiments")
  for name in names:
    assert (ROOT / "docs" / "experiments" / f"{name}.md").exists(), (
        f"docs/experiments/{name}.md missing: run python scripts/build_docs.py")
  readme = (ROOT / "README.md").read_text()
  for name in names:
    assert f"(docs/experiments/{name}.md)" in readme, f"README's table does not link {name}"
