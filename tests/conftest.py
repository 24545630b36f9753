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

import jax  # noqa: E402
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
  """Drop JAX's compiled executables and trace caches after each test module: one process runs
  ~850 tests, and without this it carries every module's compilations to the end (the full suite
  crashed inside XLA compilation late in the run while each module alone passed)."""
  yield
  jax.clear_caches()
  gc.collect()
