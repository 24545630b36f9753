"""Softmax attention's TPU (Mosaic) form in JAX's TPU interpret mode, against the naive reference.

TPU interpret mode runs the Mosaic kernel on CPU with TPU semantics (VMEM/SMEM, DMAs, reads of
uninitialised memory as NaN); it is slow, so shapes are tiny and cases few. Small blocks
(16 x 128) make the tiny shapes span several query and key blocks, so block skipping, padding of
T to the blocks and the scratch carried across the key axis are all exercised.

Tolerances (`kernel_checks.TOL`, relative to the largest |reference| entry): fp32 1e-5 (the
online softmax sums in another order); bf16 1e-2 (outputs rounded to bf16, relative step 2^-8,
and P is rounded to bf16 for P V). The log-sum-exp is fp32 in every case: 1e-5 for fp32 inputs,
1e-2 for bf16 (the logits come from bf16 operands).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from bad_input import raises_before_tracing
from kernel_checks import TOL, abstract, assert_close
from pallas_kernels import AttentionBlocks, attention, attention_step, dispatch, reference
from pallas_kernels import attention_tpu as tpu_module

SMALL = AttentionBlocks(tpu_block_q=16, tpu_block_k=128)


def tpu(*args, **kwargs):
  return attention(*args, impl="pallas_tpu", interpret=True, blocks=SMALL, **kwargs)


def make_qkv(seed, batch, tq, tk, heads, kv_heads, dim, dim_v, dtype):
  rng = np.random.default_rng(seed)
  shapes = ((batch, tq, heads, dim), (batch, tk, kv_heads, dim), (batch, tk, kv_heads, dim_v))
  return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def assert_lse_close(actual, expected, tol, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == np.float32, what
  # -inf (a query that sees no key) exactly where the reference has it.
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=what)
  seen = np.isfinite(expected)
  assert_close(actual[seen], expected[seen], tol, what)


# (batch, tq, tk, (H, Hkv), D, Dv, dtype, causal, kv_lengths, q_offsets)
CASES = {
    # T = 1, B = 1, H = 1.
    "t1_b1_h1": (1, 1, 1, (1, 1), 64, 64, jnp.float32, True, None, None),
    # T not a multiple of either block, GQA, D = 128, bf16, ragged lengths.
    "t100_gqa_d128_bf16": (2, 100, 100, (4, 2), 128, 128, jnp.bfloat16, True, [100, 37], None),
    # An odd head dim (48, Dv 40: padded to 64), not causal, Tq != Tk, bf16 lengths.
    "odd_dim_noncausal": (1, 17, 30, (2, 1), 48, 40, jnp.float32, False, [19], None),
    # Queries offset into 300 keys (3 key blocks: the skipped ones included); a sequence with
    # no key at all (zeros, lse -inf).
    "offsets_skip_empty": (2, 20, 300, (2, 2), 64, 64, jnp.float32, True, [300, 0], [270, 5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tpu_form_matches_reference(case):
  batch, tq, tk, (h, hkv), dim, dim_v, dtype, causal, lengths, offsets = CASES[case]
  q, k, v = make_qkv(len(case), batch, tq, tk, h, hkv, dim, dim_v, dtype)
  lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  offsets = None if offsets is None else jnp.asarray(offsets, jnp.int32)
  kwargs = dict(causal=causal, scale=0.8 / dim ** 0.5, kv_lengths=lengths, q_offsets=offsets)
  expected, expected_lse = reference.softmax_attention(q, k, v, return_lse=True, **kwargs)
  out, lse = tpu(q, k, v, return_lse=True, **kwargs)
  assert out.shape == expected.shape and out.dtype == dtype
  assert lse.shape == (batch, h, tq)
  assert_close(out, expected, TOL[dtype], case)
  assert_lse_close(lse, expected_lse, TOL[dtype], f"{case} lse")


def test_race_detection_finds_none():
  # Interpret mode with race detection: DMAs and semaphores checked, and the result still right.
  q, k, v = make_qkv(5, 1, 24, 200, 2, 1, 64, 64, jnp.float32)
  lengths = jnp.asarray([150], jnp.int32)
  out = tpu_module.attention_tpu(
      q, k, v, lengths, jnp.asarray([140], jnp.int32), causal=True, scale=0.125, block_q=16,
      block_k=128, interpret=True, detect_races=True)
  # The race detector's state of the last interpreted kernel (JAX exposes no public accessor).
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  assert interpret_pallas_call.races is not None, "race detection did not run"
  assert not interpret_pallas_call.races.races_found
  expected = reference.softmax_attention(q, k, v, causal=True, scale=0.125, kv_lengths=lengths,
                                         q_offsets=jnp.asarray([140], jnp.int32))
  assert_close(out, expected, 1e-5)


def test_step_form_equals_parallel_form():
  # Token by token against a full-size cache, then three draft tokens at once (speculative
  # verification): each equals the matching rows of the causal prefill.
  t_len = 6
  q, k, v = make_qkv(3, 2, t_len, t_len, 4, 2, 64, 64, jnp.float32)
  prefill = tpu(q, k, v, causal=True)
  assert_close(prefill, reference.softmax_attention(q, k, v, causal=True), 1e-5, "prefill")
  for t in range(t_len):
    lengths = jnp.full((2,), t + 1, jnp.int32)
    out = attention_step(q[:, t:t + 1], k, v, lengths, impl="pallas_tpu", interpret=True,
                         blocks=SMALL)
    assert_close(out[:, 0], prefill[:, t], 1e-5, f"t={t}")
  lengths = jnp.asarray([4, 6], jnp.int32)
  queries = jnp.stack([q[b, n - 3:n] for b, n in enumerate([4, 6])])
  out = attention_step(queries, k, v, lengths, impl="pallas_tpu", interpret=True, blocks=SMALL)
  for b, n in enumerate([4, 6]):
    assert_close(out[b], prefill[b, n - 3:n], 1e-5, f"verify row {b}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_form_lowers_for_tpu(dtype):
  # jax.export runs the Pallas -> Mosaic lowering without a TPU (Mosaic's own compilation to the
  # chip happens only on a TPU). T deliberately not a multiple of the default blocks; GQA; lse.
  q, k = jax.ShapeDtypeStruct((1, 200, 4, 64), dtype), jax.ShapeDtypeStruct((1, 700, 2, 64), dtype)
  ints = jax.ShapeDtypeStruct((1,), jnp.int32)
  blocks = AttentionBlocks()
  fn = lambda q, k, v, lengths, offsets: tpu_module.attention_tpu(
      q, k, v, lengths, offsets, causal=True, scale=0.125, block_q=blocks.tpu_block_q,
      block_k=blocks.tpu_block_k, return_lse=True)
  with dispatch.lowering_target("tpu"):  # a TPU (v5e) as the abstract target device
    mlir = export.export(jax.jit(fn), platforms=["tpu"])(q, k, k, ints, ints).mlir_module()
  assert "tpu_custom_call" in mlir and "flash_attention_tpu" in mlir


@pytest.mark.parametrize(
    "blocks, dtype, error, name",
    [
        (AttentionBlocks(tpu_block_q=12), jnp.float32, ValueError, "tpu_block_q"),
        (AttentionBlocks(tpu_block_q=8), jnp.bfloat16, ValueError, "tpu_block_q"),
        (AttentionBlocks(tpu_block_k=64), jnp.float32, ValueError, "tpu_block_k"),
        (AttentionBlocks(tpu_block_k=0), jnp.float32, ValueError, "tpu_block_k"),
        (AttentionBlocks(), jnp.float16, TypeError, "pallas_tpu.*float16"),
    ],
)
def test_bad_blocks_and_dtypes_raise_before_tracing(blocks, dtype, error, name):
  q, k, v = abstract((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64), dtype=dtype)
  with raises_before_tracing(error, name):
    attention(q, k, v, impl="pallas_tpu", interpret=True, blocks=blocks)
