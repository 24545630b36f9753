"""RWKV-7 WKV's TPU (Mosaic) form, run on CPU in JAX's TPU interpret mode.

TPU interpret mode simulates VMEM, the grid's block copies and semaphores, raises on
out-of-bounds reads and fills uninitialised memory with NaN. It is slow on CPU, so the shapes are
tiny and the cases few; the `tpu_chunk` is 16 so that short sequences still span several chunks.
Inputs follow RWKV-7's parametrisation (see test_wkv_vs_reference.py).

Tolerances as in test_wkv_vs_reference.py (kernel_checks.TOL): fp32 1e-5, bf16 1e-2, relative
to the largest |reference| entry; the final state is fp32 in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export
from kernel_checks import TOL, abstract, assert_close
from test_wkv_vs_reference import make_inputs

from pallas_kernels import WKVBlocks, reference, wkv7, wkv7_step, wkv_tpu
from tests.bad_input import raises_before_tracing

BLOCKS = WKVBlocks(tpu_chunk=16, tpu_block_v=128)


def run_tpu(*args, blocks=BLOCKS, **kwargs):
  return wkv7(*args, impl="pallas_tpu", interpret=True, blocks=blocks, return_final_state=True,
              **kwargs)


@pytest.mark.parametrize(
    "batch, t_len, heads, dk, dv, dtype, with_state, regime",
    [
        (1, 1, 1, 64, 64, jnp.float32, False, "middle"),  # T = 1, B = 1, H = 1
        (2, 37, 2, 64, 48, jnp.bfloat16, True, "near_zero"),  # T % chunk != 0, Dv = 48 padded
        (1, 20, 2, 48, 256, jnp.float32, True, "near_one"),  # Dk = 48 padded, two Dv blocks
    ],
)
def test_tpu_form_matches_reference(batch, t_len, heads, dk, dv, dtype, with_state, regime):
  inputs, state, _ = make_inputs(30, batch, t_len, heads, dk, dv, regime, dtype, with_state)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  out, final = run_tpu(*inputs, initial_state=state)
  assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
  assert_close(out, expected, TOL[dtype], "output")
  assert_close(final, expected_final, TOL[dtype], "final state")


def test_no_races_detected():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
  inputs, state, _ = make_inputs(31, 2, 20, 2, 64, 256, "middle", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  out, final = wkv_tpu.wkv7_tpu(*inputs, state, chunk=16, block_v=128, interpret=True,
                                detect_races=True)
  jax.block_until_ready((out, final))
  assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
  assert_close(out, expected, 1e-5, "output")
  assert_close(final, expected_final, 1e-5, "final state")


def test_streaming_in_two_pieces_equals_one_run():
  inputs, state, _ = make_inputs(32, 1, 40, 2, 64, 64, "middle", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  split = 13  # not a multiple of the chunk
  first, carried = run_tpu(*(x[:, :split] for x in inputs), initial_state=state)
  second, final = run_tpu(*(x[:, split:] for x in inputs), initial_state=carried)
  assert_close(jnp.concatenate([first, second], axis=1), expected, 1e-5)
  assert_close(final, expected_final, 1e-5)


def test_step_token_by_token_equals_tpu_parallel_form():
  inputs, state, _ = make_inputs(33, 2, 6, 2, 64, 64, "middle", jnp.float32)
  expected, expected_final = run_tpu(*inputs, initial_state=state)
  for t in range(inputs[0].shape[1]):
    out, state = wkv7_step(*(x[:, t] for x in inputs), state, impl="pallas_tpu", interpret=True)
    assert_close(out, expected[:, t], 1e-5, f"t={t}")
  assert_close(state, expected_final, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_for_tpu(dtype):
  # `jax.export` for TPU runs the Pallas -> Mosaic lowering (rejecting unsupported primitives and
  # block shapes) without a TPU; T = 200 is not a multiple of the chunk.
  x = jax.ShapeDtypeStruct((1, 200, 2, 64), dtype)
  fn = lambda *xs: wkv_tpu.wkv7_tpu(*xs, jnp.zeros((1, 2, 64, 64)), chunk=64, block_v=128,
                                    interpret=False)
  exported = export.export(jax.jit(fn), platforms=["tpu"])(*(x,) * 6)
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize(
    "blocks, dtype, error, names",
    [
        (WKVBlocks(tpu_chunk=20), jnp.float32, ValueError, "tpu_chunk"),
        (WKVBlocks(tpu_block_v=96), jnp.float32, ValueError, "tpu_block_v"),
        (BLOCKS, jnp.float16, TypeError, r"\br\b.*pallas_tpu"),
    ],
)
def test_blocks_that_do_not_tile_and_bad_dtypes_raise_before_tracing(blocks, dtype, error, names):
  keys = abstract(*((1, 8, 2, 64),) * 6, dtype=dtype)
  keys[3] = jax.ShapeDtypeStruct((1, 8, 2, 256), dtype)  # v
  with raises_before_tracing(error, names):
    wkv7(*keys, impl="pallas_tpu", interpret=True, blocks=blocks)
