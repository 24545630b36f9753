"""The lookup-table dequant-matmul: packing against numpy's bit unpacking, every form against
`reference.lut_matmul`, the reference against a float64 numpy product, lowering for CUDA and TPU.

The packing layout is checked bit by bit with `np.unpackbits(..., bitorder="little")` (an
independent reading of "index r of a group occupies bits [r b, (r + 1) b) of its little-endian
byte string"). Pallas forms run interpreted with tiny tiles (several programs and K steps).
Tolerances as kernel_checks.TOL (fp32 1e-5, bf16 1e-2 relative to the largest |reference|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from kernel_checks import TOL, assert_close

from pallas_kernels import dispatch, reference
from pallas_kernels import lut_matmul as lm
from tests.bad_input import raises_before_tracing

TRITON_CALL = "__gpu$xla.gpu.triton"
TINY = lm.LutBlocks(block_m=16, block_n=16, block_k=32, tpu_block_m=8, tpu_block_n=16,
                    tpu_block_k=32)


def numpy_unpack(codes: np.ndarray, bits: int, in_features: int) -> np.ndarray:
  """Indices from the bytes with numpy's bit unpacking (little-endian within each group)."""
  nbytes, groups, n = codes.shape
  per_group = 8 * nbytes // bits
  bit_strings = np.unpackbits(codes.transpose(1, 2, 0), axis=-1, bitorder="little")
  bit_strings = bit_strings.reshape(groups, n, per_group, bits)
  idx = (bit_strings * (1 << np.arange(bits))).sum(-1)  # [G, N, P]
  return idx.transpose(0, 2, 1).reshape(groups * per_group, n)[:in_features]


def make_case(seed, bits, k, n, m, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, 1 << bits, (k, n))
  lut = rng.normal(size=(n, 1 << bits)).astype(np.float32)
  x = rng.normal(size=(m, k)).astype(np.float32)
  codes = lm.pack_indices(jnp.asarray(idx), bits)
  return idx, lut, jnp.asarray(x, dtype), codes


@pytest.mark.parametrize("bits, k", [(2, 30), (3, 45), (4, 33)])  # K not a multiple of P
def test_packing_round_trip_against_numpy_bits(bits, k):
  idx, _, _, codes = make_case(0, bits, k, 7, 1)
  groups, nbytes = lm.PACKINGS[bits]
  assert codes.dtype == jnp.uint8 and codes.shape == (nbytes, -(-k // groups), 7)
  assert codes.nbytes * 8 == bits * 7 * lm.packed_rows(k, bits) * groups  # true b-bit storage
  np.testing.assert_array_equal(numpy_unpack(np.asarray(codes), bits, k), idx)
  np.testing.assert_array_equal(np.asarray(lm.unpack_indices(codes, bits, k)), idx)
  rows, cols = np.arange(k), np.arange(k) % 7
  lut = jnp.arange(7 * (1 << bits), dtype=jnp.float32).reshape(7, -1)
  np.testing.assert_array_equal(np.asarray(lm.lookup(codes, lut, rows, cols, bits)),
                                np.asarray(lut)[cols, idx[rows, cols]])


@pytest.mark.parametrize("bits", [3, 4])
def test_reference_is_the_float64_product(bits):
  idx, lut, x, codes = make_case(1, bits, 40, 9, 3)
  expected = np.asarray(x, np.float64) @ lut.astype(np.float64)[np.arange(9)[None], idx]
  out = reference.lut_matmul(x, codes, jnp.asarray(lut), bits=bits, in_features=40)
  assert_close(out, expected, 1e-6)


@pytest.mark.parametrize(
    "impl, bits, dtype, k, n, m",
    [
        ("xla", 3, jnp.float32, 70, 24, 5),
        ("xla", 4, jnp.bfloat16, 64, 16, 3),
        ("pallas_gpu", 3, jnp.float32, 64, 32, 20),  # 2 row blocks, 2 column blocks, 2 K steps
        ("pallas_gpu", 4, jnp.bfloat16, 64, 32, 3),
        ("pallas_gpu", 2, jnp.float32, 64, 16, 1),
        ("pallas_tpu", 3, jnp.float32, 64, 32, 10),
        ("pallas_tpu", 4, jnp.bfloat16, 64, 32, 3),
    ],
)
def test_forms_match_reference(impl, bits, dtype, k, n, m):
  _, lut, x, codes = make_case(2, bits, k, n, m, dtype)
  lut = jnp.asarray(lut, jnp.float16)  # the stored table dtype of SqueezeLLM
  expected = reference.lut_matmul(x.astype(jnp.float32), codes, lut, bits=bits, in_features=k)
  out = lm.lut_matmul(x[None], codes, lut, bits=bits, in_features=k, impl=impl,
                      interpret=impl.startswith("pallas"), blocks=TINY)[0]
  assert out.shape == (m, n) and out.dtype == dtype
  assert_close(out, expected, TOL[dtype], impl)


def test_tpu_form_has_no_races():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
  _, lut, x, codes = make_case(3, 4, 32, 32, 8)
  out = lm._lut_matmul_tpu(x, codes, jnp.asarray(lut), bits=4, block_m=8, block_n=16,
                           block_k=16, interpret=True, detect_races=True)
  jax.block_until_ready(out)
  assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
  assert_close(out, reference.lut_matmul(x, codes, jnp.asarray(lut), bits=4, in_features=32),
               1e-5)


def _abstract_operands(bits, k, n, m, dtype):
  groups, nbytes = lm.PACKINGS[bits]
  return (jax.ShapeDtypeStruct((m, k), dtype),
          jax.ShapeDtypeStruct((nbytes, k // groups, n), jnp.uint8),
          jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))


@pytest.mark.parametrize("bits, dtype", [(3, jnp.bfloat16), (4, jnp.float32)])
def test_gpu_form_lowers_to_triton(bits, dtype):
  fn = lambda x, c, t: lm._lut_matmul_gpu(x, c, t, bits=bits, block_m=16, block_n=64,
                                          block_k=128, interpret=False)
  operands = _abstract_operands(bits, 256, 128, 3, dtype)
  with dispatch.lowering_target("gpu"):
    exported = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*operands)
  assert TRITON_CALL in exported.mlir_module()


@pytest.mark.parametrize("bits, dtype", [(3, jnp.float32), (4, jnp.bfloat16)])
def test_tpu_form_lowers_for_tpu(bits, dtype):
  # Lane-dense tiles: block_k / P = 128 groups, block_n = 128, block_m = 8.
  k = 128 * lm.PACKINGS[bits][0]
  fn = lambda x, c, t: lm._lut_matmul_tpu(x, c, t, bits=bits, block_m=8, block_n=128,
                                          block_k=k, interpret=False)
  exported = export.export(jax.jit(fn), platforms=["tpu"])(
      *_abstract_operands(bits, 2 * k, 256, 3, dtype))
  assert "tpu_custom_call" in exported.mlir_module()


def test_fit_blocks_tile_every_weight():
  for k, n, bits in [(352, 128, 3), (128, 352, 4), (45, 7, 3), (100, 96, 2)]:
    blocks = lm.fit_blocks(k, n, bits)
    k_pad = lm.packed_rows(k, bits) * lm.PACKINGS[bits][0]
    for bn, bk in [(blocks.block_n, blocks.block_k), (blocks.tpu_block_n, blocks.tpu_block_k)]:
      assert n % bn == 0 and k_pad % bk == 0 and bk % lm.PACKINGS[bits][0] == 0


@pytest.mark.parametrize(
    "change, error, names",
    [
        ({"bits": 5}, ValueError, "bits"),
        ({"in_features": 60}, ValueError, "in_features"),
        ({"blocks": lm.LutBlocks(block_n=24)}, ValueError, "block_n"),  # 24 does not divide 32
        ({"blocks": lm.LutBlocks(block_k=36)}, ValueError, "block_k"),  # not a multiple of 8
        ({"blocks": lm.LutBlocks(block_k=48)}, ValueError, "block_k"),  # does not divide 64
        ({"blocks": lm.LutBlocks(block_m=0)}, ValueError, "block_m"),
        ({"blocks": lm.LutBlocks(tpu_block_n=12), "impl": "pallas_tpu"}, ValueError,
         "tpu_block_n"),
        ({"blocks": lm.LutBlocks(tpu_block_k=24), "impl": "pallas_tpu"}, ValueError,
         "tpu_block_k"),
        ({"impl": "triton"}, ValueError, "impl"),
        ({"codes_dtype": jnp.int8}, TypeError, "codes"),
        ({"lut_shape": (32, 4)}, ValueError, "lut"),
        ({"x_dtype": jnp.float16}, TypeError, r"\bx\b"),
    ],
)
def test_bad_arguments_raise_before_tracing(change, error, names):
  bits = change.get("bits", 3)
  x = jax.ShapeDtypeStruct((2, 64), change.get("x_dtype", jnp.float32))
  codes = jax.ShapeDtypeStruct((3, 8, 32), change.get("codes_dtype", jnp.uint8))
  lut = jax.ShapeDtypeStruct(change.get("lut_shape", (32, 8)), jnp.float16)
  with raises_before_tracing(error, names):
    lm.lut_matmul(x, codes, lut, bits=bits, in_features=change.get("in_features", 64),
                  impl=change.get("impl", "pallas_gpu"), interpret=True,
                  blocks=change.get("blocks", lm.LutBlocks(block_n=16, block_k=32)))
