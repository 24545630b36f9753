"""Suite-wide fixtures."""

from __future__ import annotations

import gc
import os

# Eight CPU devices for the whole suite, set before JAX starts its backend (the count is fixed
# then): tests/parallel shards over them; single-device code runs on device 0 as before
# (tests/models/test_families.py and tests/diffusion/test_sample.py pass identically either way).
_FORCE = "--xla_force_host_platform_device_count=8"
if _FORCE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FORCE}".strip()
# Compilation, not computation, is most of this suite's time on CPU (thousands of small jitted
# programs). XLA's backend optimisation level 0 lowers the optimisation of XLA:CPU's code
# generation (LLVM): the tests check the same programs, compiled to slower machine code. It cuts the suite's CPU time by about a third (tests/experiments
# and tests/recipes: 376 s instead of ~660 s). Benchmarks and experiments run outside pytest at the
# default level; JAXINF_TEST_XLA_OPT=1 runs the tests at the default level too.
_O0 = "--xla_backend_optimization_level=0"
if os.environ.get("JAXINF_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in \
    os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_O0}"

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest

# One persistent compilation cache for the whole run, shared by the xdist workers: `jax.jit`
# still traces and lowers every function, but a program either worker has compiled before (the
# same model in another module, after `jax.clear_caches()` below; the other worker's fixtures) is
# loaded from disk instead of compiled again. The controller makes the folder before the workers
# start (they inherit the variable) and removes it at the end. JAXINF_TEST_COMPILE_CACHE=0 turns
# it off.
_CACHE_VAR = "JAXINF_TEST_JAX_CACHE_DIR"


def pytest_configure(config):
  if os.environ.get("JAXINF_TEST_COMPILE_CACHE") == "0":
    return
  if not hasattr(config, "workerinput") and _CACHE_VAR not in os.environ:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="jaxinf-test-jax-cache-")
    config._jaxinf_cache_owner = True
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if getattr(config, "_jaxinf_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_VAR), ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
  """Drop JAX's compiled executables and trace caches after each test module: one process runs
  ~850 tests, and without this it carries every module's compilations to the end (the full suite
  crashed inside XLA compilation late in the run while each module alone passed)."""
  yield
  jax.clear_caches()
  gc.collect()
