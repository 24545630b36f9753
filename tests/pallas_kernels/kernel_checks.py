"""What every kernel-vs-reference test module shares: tolerances, the closeness check and abstract
placeholder inputs for "raised before tracing" checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# fp32: reassociation noise over T; bf16: inputs rounded to 8 mantissa bits, fp32 accumulation.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def assert_close(actual, expected, tol, what=""):
  """|actual - expected| <= tol * (|expected| + max |expected|), compared in fp32."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def abstract(*shapes, dtype=jnp.float32):
  """Placeholders that cannot be traced or computed with: an error raised with these was raised by
  argument checking, before any tracing."""
  return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
