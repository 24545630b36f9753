"""The selective scan's TPU (Mosaic) form, run on CPU in JAX's TPU interpret mode.

TPU interpret mode simulates VMEM, the grid's block copies and semaphores, raises on
out-of-bounds reads and fills uninitialised memory with NaN (a kernel reading scratch it never
wrote would show up as NaN). It is slow on CPU, so the shapes are tiny and the cases few; the
`tpu_chunk` is 16 so that short sequences still span several time chunks, and `tpu_block_d` is
128 so that 256 channels (or two groups) take two channel blocks.

Tolerances as in test_selective_scan_vs_reference.py (kernel_checks.TOL): fp32 1e-5, bf16 1e-2,
relative to the largest |reference| entry; the final state is fp32 in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from kernel_checks import TOL, abstract, assert_close
from test_selective_scan_vs_reference import make_inputs

from pallas_kernels import (
  SelectiveScanBlocks,
  dispatch,
  reference,
  selective_scan,
  selective_scan_step,
  selective_scan_tpu,
)
from tests.bad_input import raises_before_tracing

BLOCKS = SelectiveScanBlocks(tpu_chunk=16, tpu_block_d=128)


def run_tpu(*args, blocks=BLOCKS, **kwargs):
  return selective_scan(*args, impl="pallas_tpu", interpret=True, blocks=blocks,
                        return_final_state=True, **kwargs)


def expected_of(args, kwargs):
  kwargs = dict(kwargs)
  return reference.selective_scan(*args, kwargs.pop("D", None), kwargs.pop("z", None),
                                  kwargs.pop("delta_bias", None), kwargs.pop("delta_softplus"),
                                  **kwargs)


@pytest.mark.parametrize(
    "batch, t_len, channels, n_state, groups, regime, softplus, optional, dtype, with_state",
    [
        # T = 1, B = 1, one block of the full 32 channels
        (1, 1, 32, 16, 0, "middle", True, True, jnp.float32, False),
        # T % chunk != 0; N = 12 and 2 groups of 40 channels, each padded to a 128-lane block
        (2, 37, 80, 12, 2, "near_zero", True, True, jnp.bfloat16, True),
        # two channel blocks of one group, long memory, no softplus, no D/z/bias
        (1, 20, 256, 16, 1, "near_one", False, False, jnp.float32, True),
        # time-invariant B, C [D, N] (an S4D layer)
        (2, 19, 64, 4, "time_invariant", "middle", True, True, jnp.float32, True),
    ],
)
def test_tpu_form_matches_reference(batch, t_len, channels, n_state, groups, regime, softplus,
                                    optional, dtype, with_state):
  args, kwargs = make_inputs(40, batch, t_len, channels, n_state, groups, regime, softplus,
                             optional, dtype, with_state)
  expected, expected_final = expected_of(args, kwargs)
  out, final = run_tpu(*args, **kwargs)
  assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
  assert_close(out, expected, TOL[dtype], "output")
  assert_close(final, expected_final, TOL[dtype], "final state")


def test_no_races_detected():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
  # Two groups of 128 channels: two channel blocks, each reading its own group's B, C.
  (u, delta, A, B, C), kw = make_inputs(41, 2, 20, 256, 16, 2, "middle", True, True, jnp.float32)
  expected, expected_final = expected_of((u, delta, A, B, C), kw)
  out, final = selective_scan_tpu.selective_scan_tpu(
      u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], kw["initial_state"],
      delta_softplus=True, chunk=16, block_d=128, interpret=True, detect_races=True)
  jax.block_until_ready((out, final))
  assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
  assert_close(out, expected, 1e-5, "output")
  assert_close(final, expected_final, 1e-5, "final state")


def test_streaming_in_two_pieces_equals_one_run():
  (u, delta, A, B, C), kw = make_inputs(42, 1, 40, 32, 16, 2, "middle", True, True, jnp.float32)
  expected, expected_final = expected_of((u, delta, A, B, C), kw)
  split = 13  # not a multiple of the chunk
  first_half, second_half = (lambda x: x[:, :split]), (lambda x: x[:, split:])
  common = {"D": kw["D"], "delta_bias": kw["delta_bias"], "delta_softplus": True}
  first, carried = run_tpu(*map(first_half, (u, delta)), A, *map(first_half, (B, C)),
                           z=first_half(kw["z"]), initial_state=kw["initial_state"], **common)
  second, final = run_tpu(*map(second_half, (u, delta)), A, *map(second_half, (B, C)),
                          z=second_half(kw["z"]), initial_state=carried, **common)
  assert_close(jnp.concatenate([first, second], axis=1), expected, 1e-5)
  assert_close(final, expected_final, 1e-5)


def test_step_token_by_token_equals_tpu_parallel_form():
  (u, delta, A, B, C), kw = make_inputs(43, 2, 6, 32, 16, 2, "middle", True, True, jnp.float32)
  expected, expected_final = run_tpu(u, delta, A, B, C, **kw)
  state = kw["initial_state"]
  for t in range(u.shape[1]):
    out, state = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], kw["D"],
                                     kw["z"][:, t], kw["delta_bias"], state, delta_softplus=True,
                                     impl="pallas_tpu", interpret=True)
    assert_close(out, expected[:, t], 1e-5, f"t={t}")
  assert_close(state, expected_final, 1e-5)


@pytest.mark.parametrize("dtype, bc_shape", [
    (jnp.float32, (1, 200, 2, 16)),  # grouped B, C; two channel blocks
    (jnp.bfloat16, (256, 16)),  # time-invariant B, C
])
def test_kernel_lowers_for_tpu(dtype, bc_shape):
  # `jax.export` for TPU runs the Pallas -> Mosaic lowering (rejecting unsupported primitives and
  # block shapes) without a TPU; T = 200 is not a multiple of the chunk.
  x = jax.ShapeDtypeStruct((1, 200, 256), dtype)
  bc = jax.ShapeDtypeStruct(bc_shape, dtype)
  channels = jnp.ones((256,), jnp.float32)
  fn = lambda u, delta, z, B, C: selective_scan_tpu.selective_scan_tpu(
      u, delta, -jnp.ones((256, 16)), B, C, channels, z, channels, jnp.zeros((1, 256, 16)),
      delta_softplus=True, chunk=64, block_d=128, interpret=False)
  with dispatch.lowering_target("tpu"):  # a TPU (v5e) as the abstract target device
    exported = export.export(jax.jit(fn), platforms=["tpu"])(x, x, x, bc, bc)
  assert "tpu_custom_call" in exported.mlir_module()


def test_channel_blocks_tile_each_group():
  # (width, padded channels per group): one full-width block, or 128-lane multiples per group.
  assert selective_scan_tpu.channel_blocks(80, 1, 256) == (80, 80)
  assert selective_scan_tpu.channel_blocks(80, 2, 256) == (128, 128)
  assert selective_scan_tpu.channel_blocks(300, 1, 256) == (128, 384)
  assert selective_scan_tpu.channel_blocks(1024, 2, 256) == (256, 512)


@pytest.mark.parametrize(
    "blocks, dtype, error, names",
    [
        (SelectiveScanBlocks(tpu_chunk=12), jnp.float32, ValueError, "tpu_chunk"),
        (SelectiveScanBlocks(tpu_chunk=24), jnp.bfloat16, ValueError, "tpu_chunk"),  # 16 rows
        (SelectiveScanBlocks(tpu_block_d=64), jnp.float32, ValueError, "tpu_block_d"),
        (SelectiveScanBlocks(tpu_block_d=True), jnp.float32, ValueError, "tpu_block_d"),
        (SelectiveScanBlocks(tpu_block_d=384), jnp.float32, None, None),  # >= D: one block
        (BLOCKS, jnp.float16, TypeError, r"\bu\b.*pallas_tpu"),
    ],
)
def test_blocks_that_do_not_tile_and_bad_dtypes_raise_before_tracing(blocks, dtype, error, names):
  u, delta = abstract((1, 8, 256), (1, 8, 256), dtype=dtype)
  A, B, C = abstract((256, 4), (1, 8, 4), (1, 8, 4))
  if error is None:
    out = jax.eval_shape(lambda u, delta, B, C: selective_scan(
        u, delta, -np.ones((256, 4), np.float32), B, C, impl="pallas_tpu", interpret=True,
        blocks=blocks), u, delta, B, C)
    assert out.shape == (1, 8, 256)
    return
  with raises_before_tracing(error, names):
    selective_scan(u, delta, A, B, C, impl="pallas_tpu", interpret=True, blocks=blocks)
