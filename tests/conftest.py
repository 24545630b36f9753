"""Suite-wide fixtures."""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
  """Drop JAX's compiled executables and trace caches after each test module: one process runs
  ~850 tests, and without this it carries every module's compilations to the end (the full suite
  crashed inside XLA compilation late in the run while each module alone passed)."""
  yield
  jax.clear_caches()
  gc.collect()
