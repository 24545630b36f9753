"""QArray: packing, storage bytes, `x @ w` from the stored form against the dequantized weight under
jit, the W8A8 path against a numpy emulation, qwix as an independent source of quantized values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.quant import formats as F
from jaxinf.quant.qarray import QArray, pack_nibbles, quantize, unpack_nibbles
from tests.bad_input import raises_before_tracing

RNG = np.random.default_rng(0)
W = RNG.normal(size=(32, 12)).astype(np.float32)
X = RNG.normal(size=(2, 3, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def matmul():
  return jax.jit(lambda x, w: x @ w)


@pytest.mark.parametrize("n", [1, 7, 16])
def test_pack_unpack_round_trip(n):
  codes = (np.arange(n * 3) % 16).astype(np.uint8).reshape(n, 3)  # all 16 values for n >= 6
  packed = np.asarray(pack_nibbles(codes))
  assert packed.shape == ((n + 1) // 2, 3) and packed.dtype == np.uint8
  padded = np.concatenate([codes, np.zeros((n % 2, 3), np.uint8)])
  np.testing.assert_array_equal(packed, padded[0::2] | (padded[1::2] << 4))  # the layout
  np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed, n)), codes)


def test_int4_and_fp4_codes_round_trip():
  q = np.tile(np.arange(-7, 8, dtype=np.float32), 2)[:, None].repeat(3, 1)[:29]  # odd rows
  w = quantize(jnp.asarray(q), "int4")
  np.testing.assert_array_equal(np.asarray(w.codes()), q)
  assert w.data.shape == (15, 3)
  g = F.FORMATS["fp4_e2m1"].grid().astype(np.float32)
  w4 = quantize(jnp.asarray(np.stack([g, -g], 1)), "fp4_e2m1")
  np.testing.assert_array_equal(np.asarray(w4.grid_values()), np.stack([g, -g], 1))


@pytest.mark.parametrize("fmt,group,nbytes", [
    ("int8", None, 32 * 12 + 48), ("int4", None, 16 * 12 + 48), ("int4", 8, 16 * 12 + 4 * 48),
    ("fp8_e4m3", None, 32 * 12 + 48), ("fp8_e5m2", 16, 32 * 12 + 96),
    ("fp4_e2m1", 8, 16 * 12 + 4 * 48), ("fp4", None, 16 * 12 + 48), ("fp6", None, 32 * 12 + 48)])
def test_matmul_equals_dequantized(matmul, fmt, group, nbytes):
  w = quantize(W, fmt, group_size=group)
  assert w.nbytes == nbytes and w.shape == (32, 12) and w[...] is w
  deq = np.asarray(w.dequantize(), np.float64)
  y = np.asarray(matmul(jnp.asarray(X), w), np.float64)
  # fp32 reassociation only: (x @ q) * s against x @ (q * s), bounded by 2 n eps sum|x||w|.
  bound = 2 * 32 * 2.0 ** -23 * (np.abs(X) @ np.abs(deq))
  assert np.all(np.abs(y - X @ deq) <= bound)
  yb = matmul(jnp.asarray(X, jnp.bfloat16), w.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16


def test_w8a8_int8_equals_numpy_emulation(matmul):
  w = quantize(W, "int8", act_format="int8")
  sw = np.abs(W).max(0) / np.float32(127)
  qw = np.clip(np.round(W / sw), -127, 127).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(w.codes()), qw)
  x2 = X.reshape(-1, 32)
  sx = (np.abs(x2).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
  qx = np.clip(np.round(x2 / sx), -127, 127).astype(np.int64)
  want = ((qx @ qw).astype(np.float32) * sw.astype(np.float32)) * sx
  got = np.asarray(matmul(jnp.asarray(X), w)).reshape(-1, 12)
  np.testing.assert_allclose(got, want, rtol=2 ** -22, atol=0)


def test_w8a8_fp8_equals_numpy_emulation(matmul):
  import ml_dtypes
  w = quantize(W, "fp8_e4m3", act_format="fp8_e4m3", group_size=16)
  x2 = X.reshape(-1, 32)
  sx = (np.abs(x2).max(1, keepdims=True) / np.float32(448)).astype(np.float32)
  qx = (x2 / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  qw = np.asarray(w.grid_values(), np.float64).reshape(2, 16, 12)
  part = np.einsum("ngk,gko->ngo", qx.reshape(-1, 2, 16), qw)  # exact products, float64 sums
  want = (part * np.asarray(w.scale, np.float64)).sum(1) * sx
  got = np.asarray(matmul(jnp.asarray(X), w), np.float64).reshape(-1, 12)
  bound = 4 * 32 * 2.0 ** -23 * (np.abs(qx) @ np.abs(qw.reshape(32, 12))) * sx \
      * np.asarray(w.scale).max(0)
  assert np.all(np.abs(got - want) <= bound)


def test_pytree_and_nnx_module():
  from flax import nnx
  w = quantize(W, "int4", group_size=8)
  leaves, tree = jax.tree.flatten(w)
  assert len(leaves) == 2 and isinstance(jax.tree.unflatten(tree, leaves), QArray)

  class Lin(nnx.Module):
    def __init__(self, w):
      self.w = nnx.Param(w)

    def __call__(self, x):
      return x @ self.w[...]

  gd, state = nnx.split(Lin(w))
  y = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(state, jnp.asarray(X))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(X) @ w))


@pytest.mark.parametrize("fmt,qtype", [("int8", "int8"), ("int4", "int4"),
                                       ("fp8_e4m3", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")])
def test_rounding_against_qwix(fmt, qtype):
  """qwix (Google's JAX quantization library) as the independent source: given qwix's own
  per-channel scale, our rounding of w / scale gives qwix's stored values exactly. One deliberate
  difference: qwix's integer scale is absmax / (qmax + 0.5) and its codes saturate at the dtype's
  range, so values below -(qmax + 0.5) take the code -2^(b-1), which our symmetric grid does not
  use; those elements are compared with -qmax instead."""
  qwix = pytest.importorskip("qwix")
  qa = qwix.quantize(jnp.asarray(W), getattr(jnp, qtype), channelwise_axes=(1,))
  fmt = F.FORMATS[fmt]
  ours = np.asarray(fmt.round_to_grid(jnp.asarray(W) / qa.scale))
  theirs = np.asarray(qa.qvalue.astype(jnp.float32))
  if isinstance(fmt, F.IntFormat):
    extra = theirs == -(fmt.qmax + 1)
    theirs = np.where(extra, -fmt.qmax, theirs)
  np.testing.assert_array_equal(ours, theirs)


def test_quantize_bad_input():
  with raises_before_tracing(ValueError, r"format.*'int3'.*int8"):
    quantize(W, "int3")
  with raises_before_tracing(ValueError, "group_size.*5.*32"):
    quantize(W, "int4", group_size=5)
  with raises_before_tracing(TypeError, "w.*int32"):
    quantize(W.astype(np.int32), "int8")
  with raises_before_tracing(ValueError, "w.*2-D"):
    quantize(W[0], "int8")
  with raises_before_tracing(ValueError, "w.*non-finite"):
    quantize(np.full((4, 4), np.nan, np.float32), "int8")
  with raises_before_tracing(ValueError, "act_format"):
    quantize(W, "int8", act_format="int4")
  with raises_before_tracing(ValueError, "calibration"):
    quantize(W, "fp4", calibration=np.ones((3, 5), np.float32))
  with raises_before_tracing(ValueError, "x: expected"):
    _ = jnp.ones((2, 5)) @ quantize(W, "int8")
