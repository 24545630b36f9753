"""Softmax attention: every impl against `reference.softmax_attention` and `jax.nn.dot_product_attention`.

The Pallas forms run in interpreters: "pallas" (the GPU form) in Pallas' generic interpreter,
"pallas_tpu" in JAX's TPU interpret mode (its own corner cases: `test_attention_tpu.py`).

Tolerances, relative to the largest |reference| entry (plus the same relative slack per entry):
fp32 1e-5 (the two forms sum in different orders); bf16 1e-2 (outputs are rounded to bf16,
relative step 2^-8, and the flash kernels feed bf16 probabilities to their second matmul). The
log-sum-exp is held to 1e-5 against a float64 logsumexp computed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bad_input import raises_before_tracing
from pallas_kernels import AttentionBlocks, attention, attention_step, reference
from kernel_checks import TOL, abstract, assert_close

FAST_IMPLS = ("xla", "pallas", "pallas_tpu")
ALL_IMPLS = ("reference",) + FAST_IMPLS


def run(impl, *args, **kwargs):
  return attention(*args, impl=impl, interpret=impl.startswith("pallas"), **kwargs)


def make_qkv(seed, batch, tq, tk, heads, kv_heads, dim, dtype):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, tq, heads, dim))
  k = rng.standard_normal((batch, tk, kv_heads, dim))
  v = rng.standard_normal((batch, tk, kv_heads, dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@settings(max_examples=6, deadline=None, derandomize=True)
# The corners every run must cover, beside whatever hypothesis draws.
@example(batch=1, tq=1, heads=(1, 1), dim=32, causal=True, with_lengths=False,
         dtype=jnp.float32, seed=0)
@example(batch=2, tq=100, heads=(4, 2), dim=128, causal=True, with_lengths=True,
         dtype=jnp.bfloat16, seed=1)
@example(batch=1, tq=17, heads=(2, 1), dim=64, causal=False, with_lengths=True,
         dtype=jnp.float32, seed=2)
@given(
    batch=st.sampled_from([1, 2]),
    tq=st.sampled_from([1, 17, 64, 100]),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
    dim=st.sampled_from([32, 64, 128]),
    causal=st.booleans(),
    with_lengths=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fast_impls_match_reference(batch, tq, heads, dim, causal, with_lengths, dtype, seed):
  h, hkv = heads
  # Non-causal draws also get a different key length, to cover Tq != Tk.
  tk = tq if causal else tq + 13
  q, k, v = make_qkv(seed, batch, tq, tk, h, hkv, dim, dtype)
  lengths = None
  if with_lengths:
    lengths = jnp.asarray(np.random.default_rng(seed).integers(1, tk + 1, size=batch), jnp.int32)
  scale = 0.7 / dim ** 0.5
  expected = reference.softmax_attention(q, k, v, causal=causal, scale=scale, kv_lengths=lengths)
  for impl in FAST_IMPLS:
    out = run(impl, q, k, v, causal=causal, scale=scale, kv_lengths=lengths)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, TOL[dtype], impl)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)])
def test_matches_jax_nn_dot_product_attention(causal, heads):
  h, hkv = heads
  q, k, v = make_qkv(0, 2, 40, 40, h, hkv, 32, jnp.float32)
  lengths = jnp.asarray([40, 23], jnp.int32)
  kwargs = dict(is_causal=causal, scale=0.3)
  if not causal:
    kwargs["key_value_seq_lengths"] = lengths
  with jax.default_matmul_precision("highest"):
    expected = jax.nn.dot_product_attention(q, k, v, **kwargs)
  for impl in ("reference",) + FAST_IMPLS:
    out = run(impl, q, k, v, causal=causal, scale=0.3, kv_lengths=None if causal else lengths)
    assert_close(out, expected, 1e-5, impl)


def test_fully_masked_rows_are_zero():
  q, k, v = make_qkv(1, 2, 8, 8, 2, 2, 32, jnp.float32)
  lengths = jnp.asarray([0, 8], jnp.int32)
  for impl in ("reference",) + FAST_IMPLS:
    out = run(impl, q, k, v, kv_lengths=lengths)
    assert np.all(np.asarray(out[0]) == 0.0), impl
    assert np.all(np.isfinite(np.asarray(out))), impl


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_decode_token_by_token_equals_causal_prefill(impl):
  t_len = 9
  q, k, v = make_qkv(2, 2, t_len, t_len, 4, 2, 64, jnp.float32)
  expected = reference.softmax_attention(q, k, v, causal=True)
  for t in range(t_len):
    # The cache is allocated at full size; only the first t + 1 slots are valid.
    lengths = jnp.full((2,), t + 1, jnp.int32)
    out = attention_step(q[:, t:t + 1], k, v, lengths, impl=impl,
                         interpret=impl.startswith("pallas"))
    assert_close(out[:, 0], expected[:, t], 1e-5, f"{impl} t={t}")


@pytest.mark.parametrize("impl", ("reference",) + FAST_IMPLS)
def test_speculative_verify_matches_prefill_rows(impl):
  # Three draft tokens per sequence against caches of different lengths: query j of sequence b
  # must equal row lengths[b] - 3 + j of a causal prefill over the whole cache.
  draft, size = 3, 24
  q_all, k, v = make_qkv(3, 2, size, size, 2, 1, 32, jnp.float32)
  lengths = jnp.asarray([10, 24], jnp.int32)
  prefill = reference.softmax_attention(q_all, k, v, causal=True)
  queries = jnp.stack([q_all[b, int(n) - draft:int(n)] for b, n in enumerate(lengths)])
  out = attention_step(queries, k, v, lengths, impl=impl, interpret=impl.startswith("pallas"))
  for b, n in enumerate(np.asarray(lengths)):
    assert_close(out[b], prefill[b, n - draft:n], 1e-5, f"{impl} sequence {b}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_step_reads_a_head_major_cache(impl, dtype):
  # layout="bhsd": the caches [B, Hkv, S, D] (the transformer's KV cache). Three queries per
  # sequence against caches of different lengths; query j of sequence b must equal row
  # lengths[b] - 3 + j of the reference's causal prefill over the [B, S, Hkv, D] keys/values.
  draft, size = 3, 40
  q_all, k, v = make_qkv(9, 2, size, size, 4, 2, 48, dtype)
  lengths = jnp.asarray([10, 40], jnp.int32)
  prefill = reference.softmax_attention(q_all, k, v, causal=True)
  queries = jnp.stack([q_all[b, int(n) - draft:int(n)] for b, n in enumerate(lengths)])
  out, lse = attention_step(queries, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), lengths,
                            impl=impl, interpret=impl.startswith("pallas"), layout="bhsd",
                            return_lse=True)
  assert out.shape == queries.shape and out.dtype == dtype
  for b, n in enumerate(np.asarray(lengths)):
    assert_close(out[b], prefill[b, n - draft:n], TOL[dtype], f"{impl} sequence {b}")
  _, want_lse = attention_step(queries, k, v, lengths, impl="reference", return_lse=True)
  assert_close(lse, want_lse, TOL[dtype], f"{impl} lse")


def test_step_layout_is_checked_before_tracing():
  q, k, v = abstract((2, 1, 4, 32), (2, 2, 8, 32), (2, 2, 8, 32))  # head-major [B, Hkv, S, D]
  with raises_before_tracing(ValueError, "layout"):
    attention_step(q, k, v, jnp.asarray([3, 3]), layout="bsdh")
  with raises_before_tracing(ValueError, "lengths must be at most the cache size S=8"):
    attention_step(q, k, v, jnp.asarray([3, 9]), layout="bhsd")
  with raises_before_tracing(ValueError, "k_cache and v_cache must agree on \\[B, Hkv, S\\]"):
    attention_step(q, k, abstract((2, 2, 9, 32))[0], jnp.asarray([3, 3]), layout="bhsd")
  with raises_before_tracing(ValueError, "k_cache.shape\\[1\\]=3"):  # 4 query heads, 3 KV heads
    attention_step(q, *abstract((2, 3, 8, 32), (2, 3, 8, 32)), jnp.asarray([3, 3]),
                   layout="bhsd")


@pytest.mark.parametrize(
    "shapes, kwargs, error, name",
    [
        (((2, 8, 4, 32), (2, 8, 3, 32), (2, 8, 3, 32)), {}, ValueError, "k.shape[2]"),
        (((2, 8, 4, 32), (2, 8, 2, 16), (2, 8, 2, 16)), {}, ValueError, "head dim"),
        (((2, 8, 4, 32), (2, 8, 2, 32), (2, 9, 2, 32)), {}, ValueError, "k and v"),
        (((2, 8, 4, 32), (1, 8, 2, 32), (1, 8, 2, 32)), {}, ValueError, "batch"),
        (((2, 8, 32), (2, 8, 32), (2, 8, 32)), {}, ValueError, "q must have 4"),
        (((2, 8, 4, 32),) * 3, {"impl": "triton"}, ValueError, "impl"),
        pytest.param(((2, 8, 4, 32),) * 3, {"impl": "pallas"}, ValueError, "interpret=True",
                     marks=pytest.mark.skipif(jax.default_backend() != "cpu",
                                              reason="Pallas compiles on accelerators")),
        (((2, 8, 4, 32),) * 3, {"scale": "0.1"}, TypeError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": True}, TypeError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": float("nan")}, ValueError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": np.float32(np.inf)}, ValueError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": jnp.asarray(0.0)}, ValueError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": -0.5}, ValueError, "scale"),
        (((2, 8, 4, 32),) * 3, {"scale": np.ones(2)}, ValueError, "scale"),
        (((2, 8, 4, 32),) * 3, {"causal": True, "q_offsets": jnp.asarray([0, -1])}, ValueError,
         "q_offsets"),
        # Causal with Tq != Tk: the alignment must be chosen (q_offsets), never defaulted.
        (((2, 3, 4, 32), (2, 8, 4, 32), (2, 8, 4, 32)), {"causal": True}, ValueError,
         "q_offsets"),
        (((2, 8, 4, 32),) * 3, {"impl": "pallas", "interpret": True,
                                "blocks": AttentionBlocks(block_q=48)}, ValueError, "block_q"),
        (((2, 8, 4, 32),) * 3, {"blocks": AttentionBlocks(xla_chunk=0), "impl": "xla"},
         ValueError, "xla_chunk"),
        (((2, 8, 4, 32),) * 3, {"return_lse": 1}, TypeError, "return_lse"),
        (((2, 8, 4, 32),) * 3, {"kv_lengths": jnp.ones((3,), jnp.int32)}, ValueError,
         "kv_lengths"),
        (((2, 8, 4, 32),) * 3, {"kv_lengths": jnp.ones((2,), jnp.float32)}, TypeError,
         "kv_lengths"),
        (((2, 8, 4, 32),) * 3, {"kv_lengths": jnp.asarray([3, 9])}, ValueError, "kv_lengths"),
    ],
)
def test_bad_input_raises_before_tracing(shapes, kwargs, error, name):
  with raises_before_tracing(error, name.replace("[", r"\[").replace("]", r"\]")):
    attention(*abstract(*shapes), **kwargs)


def test_traced_scale_is_refused_by_name():
  q, k, v = make_qkv(0, 1, 4, 4, 2, 2, 32, jnp.float32)
  with pytest.raises(TypeError, match="scale"):
    jax.jit(lambda s: attention(q, k, v, scale=s, impl="xla"))(0.3)


@pytest.mark.parametrize("scale", [np.float32(0.3), np.asarray(0.3), jnp.asarray(0.3), 0.3])
def test_scale_accepts_python_numpy_and_jax_scalars(scale):
  q, k, v = make_qkv(4, 1, 6, 6, 2, 1, 32, jnp.float32)
  expected = reference.softmax_attention(q, k, v, causal=True, scale=0.3)
  assert_close(attention(q, k, v, causal=True, scale=scale, impl="xla"), expected, 1e-6)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_log_sum_exp_matches_float64(impl):
  # Causal with offsets and ragged lengths, one sequence seeing no key at all (lse = -inf);
  # both the parallel and the step form return it.
  q, k, v = make_qkv(6, 3, 5, 40, 4, 2, 32, jnp.float32)
  lengths, offsets = np.asarray([40, 0, 23]), np.asarray([35, 3, 2])
  scale = 0.4
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
  logits = scale * np.einsum("bihd,bshd->bhis", qf, kf)
  key, query = np.arange(40), offsets[:, None] + np.arange(5)
  visible = (key[None, None] < lengths[:, None, None]) & (key[None, None] <= query[:, :, None])
  with np.errstate(divide="ignore"):
    expected = np.log(np.sum(np.where(visible[:, None], np.exp(logits), 0.0), axis=-1))
  interpret = impl.startswith("pallas")
  out, lse = attention(q, k, v, causal=True, scale=scale, kv_lengths=jnp.asarray(lengths),
                       q_offsets=jnp.asarray(offsets), return_lse=True, impl=impl,
                       interpret=interpret)
  assert out.shape == q.shape and lse.shape == (3, 4, 5) and lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(expected))
  finite = np.isfinite(expected)
  assert_close(np.asarray(lse)[finite], expected[finite], 1e-5, impl)
  # The step form: the newest token of each cache (row lengths - 1), same statistics.
  step_q = q[:, :1]
  _, step_lse = attention_step(step_q, k, v, jnp.asarray([40, 1, 23]), scale=scale,
                               return_lse=True, impl=impl, interpret=interpret)
  direct = attention(step_q, k, v, causal=True, scale=scale, kv_lengths=jnp.asarray([40, 1, 23]),
                     q_offsets=jnp.asarray([39, 0, 22]), return_lse=True, impl="reference")[1]
  assert_close(step_lse, direct, 1e-5, f"{impl} step")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_bottom_right_alignment_is_the_last_rows_of_the_square_mask(impl):
  # q_offsets = Tk - Tq puts the Tq queries at the bottom right of the causal mask: they equal
  # the last Tq rows of the square causal attention; zeros (top-left) the first Tq rows.
  q_all, k, v = make_qkv(8, 2, 20, 20, 2, 2, 32, jnp.float32)
  full = reference.softmax_attention(q_all, k, v, causal=True)
  bottom = run(impl, q_all[:, -4:], k, v, causal=True, q_offsets=jnp.full((2,), 16, jnp.int32))
  top = run(impl, q_all[:, :4], k, v, causal=True, q_offsets=jnp.zeros((2,), jnp.int32))
  assert_close(bottom, full[:, -4:], 1e-5, f"{impl} bottom-right")
  assert_close(top, full[:, :4], 1e-5, f"{impl} top-left")


def test_mismatched_dtypes_raise():
  q, k, v = abstract((1, 4, 2, 32), (1, 4, 2, 32), (1, 4, 2, 32))
  with pytest.raises(TypeError, match="share one dtype"):
    attention(q, k, jax.ShapeDtypeStruct(v.shape, jnp.bfloat16))
  with pytest.raises(ValueError, match="lengths"):
    attention_step(q, k, v, jnp.asarray([3]))  # fewer valid slots than new queries


def test_odd_head_dims_are_padded_correctly():
  # D = 48 and Dv = 40 are not powers of two: the kernel pads them to 64 and slices back.
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.standard_normal((2, 30, 4, 48)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 30, 2, 48)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 30, 2, 40)), jnp.float32)
  expected = reference.softmax_attention(q, k, v, causal=True)
  for impl in FAST_IMPLS:
    assert_close(run(impl, q, k, v, causal=True), expected, 1e-5, impl)
