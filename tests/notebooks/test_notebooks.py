"""The Colab notebooks in notebooks/: each runs top to bottom at smoke size, its install cell
installs jaxinf from a checkout, and each is committed clean (no outputs, one `parameters` cell).

Smoke size: `with_parameters` injects a cell after the `parameters` cell (papermill's convention,
without papermill) that sets `SMOKE = True` and, for 01/02, one DiT folder, so 02 reuses the tiny
DiT 01 trained. Kernel: `python3` pinned to this interpreter through a kernelspec written to a
temporary `JUPYTER_PATH` (the notebooks' first cell asserts `sys.executable` when
`JAXINF_EXPECT_PYTHON` is set), started in a scratch folder so that relative `results/` paths never
touch the checkout. The forced 8 host devices of tests/conftest.py are taken out of the kernel's
`XLA_FLAGS` (05_scale_out must set them itself, as it does on a CPU runtime) and the CPU backend's
LLVM optimisations are turned off there (`FAST_COMPILE`). Budget: the whole directory in under
120 s on a 2-core CPU.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_diffusion_quickstart", "02_samplers_guidance_caching", "03_kernels",
            "04_language_models_decoding", "05_scale_out"]
CELL_TIMEOUT = 240  # seconds per cell: a hang guard (every smoke cell takes seconds)
# Smoke runs are compilation-bound: XLA's CPU backend at optimisation level 0 and without its
# expensive LLVM passes compiles ~40% faster (same results to float rounding), which keeps this
# directory inside its CI budget; like tests/conftest.py's level 0, JAXINF_TEST_XLA_OPT=1 turns
# it off.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
FORCE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")
# a line each notebook prints only once it has done its job (its asserts passed before it)
MARKERS = {
    "01_diffusion_quickstart": "cond. acc",
    "02_samplers_guidance_caching": "refresh rows R",
    "03_kernels": "worst relative error against the references",
    "04_language_models_decoding": "equals greedy generate: True",
    "05_scale_out": "identical to one device's",
}


def tagged(nb, tag: str) -> list[int]:
  """Indices of the cells of `nb` carrying `tag` in their metadata."""
  return [i for i, cell in enumerate(nb.cells) if tag in cell.get("metadata", {}).get("tags", [])]


def with_parameters(nb, source: str):
  """A copy of `nb` with a code cell of `source` (tagged `injected-parameters`) right after its one
  `parameters` cell: papermill's way of overriding parameters, without papermill."""
  nb = copy.deepcopy(nb)
  (index,) = tagged(nb, "parameters")
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  cell.id = "injected-parameters"
  nb.cells.insert(index + 1, cell)
  return nb


def stdout_text(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
  """(environment, working folder) for the notebook kernels, and a `python3` kernelspec that runs
  this interpreter, first on `JUPYTER_PATH`."""
  root = tmp_path_factory.mktemp("notebook_kernel")
  spec = root / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test venv)", "language": "python"}))
  monkeypatch_module.setenv("JUPYTER_PATH", str(root / "jupyter"))
  env = dict(os.environ)
  flags = FORCE_DEVICES.sub("", env.get("XLA_FLAGS", "")).split()
  if os.environ.get("JAXINF_TEST_XLA_OPT") != "1":  # tests/conftest.py's switch for the default level
    flags += [f for f in FAST_COMPILE if f.split("=")[0] not in " ".join(flags)]
  env["XLA_FLAGS"] = " ".join(flags)
  env.update(JAXINF_EXPECT_PYTHON=sys.executable, IPYTHONDIR=str(root / "ipython"),
             JUPYTER_PATH=str(root / "jupyter"), PYTHONWARNINGS="ignore::DeprecationWarning")
  workdir = root / "work"
  workdir.mkdir()
  return env, workdir


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def run_notebook(path: Path, overrides: str, env: dict, workdir: Path):
  nb = with_parameters(nbformat.read(path, as_version=4), overrides)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                          resources={"metadata": {"path": str(workdir)}})
  client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) on any error
  return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_size(path, kernel):
  env, workdir = kernel
  overrides = ["SMOKE = True"]
  if path.stem in ("01_diffusion_quickstart", "02_samplers_guidance_caching"):
    overrides.append(f"SMOKE_DIT_FOLDER = {str(workdir / 'dit_smoke')!r}")  # 02 reuses 01's
  if path.stem == "04_language_models_decoding":
    overrides.append(f"SMOKE_LM_DIR = {str(workdir / 'lm_smoke')!r}")
  nb = run_notebook(path, "\n".join(overrides), env, workdir)
  text = stdout_text(nb)
  assert MARKERS[path.stem] in text, text[-3000:]
  if path.stem == "05_scale_out":
    assert "8 devices" in text and "data=2 fsdp=1 tensor=4" in text, text


# --- committed clean ----------------------------------------------------------------------------

def test_the_five_notebooks_are_there():
  assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs_with_one_parameters_cell(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.source[:80])
    assert "widgets" not in cell.metadata and "execution" not in cell.metadata
  params, install = tagged(nb, "parameters"), tagged(nb, "install")
  assert len(params) == 1 and len(install) == 1, (params, install)
  assert install[0] < params[0]
  assert nb.cells[params[0]].cell_type == "code"
  assert re.search(r"^SMOKE = False\b", nb.cells[params[0]].source, re.M)
  assert "widgets" not in nb.metadata
  assert nb.metadata["kernelspec"]["name"] == "python3"


def install_cell(path: Path) -> str:
  nb = nbformat.read(path, as_version=4)
  (index,) = tagged(nb, "install")
  return nb.cells[index].source


# --- the install cell, as far as this machine allows ---------------------------------------------

def site_packages_listing() -> list[str]:
  return sorted(os.listdir(sysconfig.get_paths()["purelib"]))


def test_install_cell_installs_the_checkout_without_touching_the_venv(tmp_path):
  """The cell's own code, with `JAXINF_SOURCE` = a copy of this checkout (the package's files) and
  pip told `--no-deps --target <tmp>` (no index, no build isolation: nothing is downloaded):
  jaxinf and pallas_kernels then import from the target, the venv's site-packages is unchanged,
  and the command pins the venv's jax/jaxlib (jax>=0.10 here, so they must not move)."""
  sources = {path.stem: install_cell(path) for path in NOTEBOOKS}
  assert len(set(sources.values())) == 1, "the install cells differ between notebooks"
  script = tmp_path / "install_cell.py"
  script.write_text(next(iter(sources.values())))

  checkout = tmp_path / "checkout"  # what a clone holds of the package; builds never touch REPO
  checkout.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, checkout / name)
  for package in ("jaxinf", "pallas_kernels", "experiments"):
    shutil.copytree(REPO / package, checkout / package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  target = tmp_path / "target"
  env = dict(os.environ, JAXINF_SOURCE=str(checkout), JAXINF_FORCE_INSTALL="1",
             JAXINF_PIP_ARGS=f"--no-deps --no-build-isolation --no-index --target {target}",
             PIP_DISABLE_PIP_VERSION_CHECK="1")
  env.pop("JAXINF_EXPECT_PYTHON", None)
  before = site_packages_listing()
  proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"'jaxinf @ {checkout.resolve().as_uri()}'" in proc.stdout, proc.stdout
  pins = re.search(r"--constraint (\S+)", proc.stdout)
  assert pins, proc.stdout
  import jax, jaxlib  # noqa: E401 - the venv's versions, which the cell must pin
  pinned = Path(pins.group(1)).read_text().split()
  assert pinned == [f"jax=={jax.__version__}", f"jaxlib=={jaxlib.__version__}"], pinned
  assert site_packages_listing() == before

  check = subprocess.run(
      [sys.executable, "-c", "import jaxinf, pallas_kernels; print(jaxinf.__file__); "
       "print(pallas_kernels.__file__); print(jaxinf.__version__)"],
      env=dict(env, PYTHONPATH=str(target)), cwd=tmp_path, capture_output=True, text=True,
      timeout=120)
  assert check.returncode == 0, check.stderr
  jaxinf_file, kernels_file, version = check.stdout.split()
  assert Path(jaxinf_file).is_relative_to(target) and Path(kernels_file).is_relative_to(target)
  assert version == "0.1.0"

  # where jaxinf is importable (this venv) and nothing is forced, the cell installs nothing
  env.pop("JAXINF_FORCE_INSTALL")
  skip = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert skip.returncode == 0 and "not installing" in skip.stdout, skip.stdout + skip.stderr
