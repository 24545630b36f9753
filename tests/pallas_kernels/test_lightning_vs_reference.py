"""Lightning attention: every impl against `reference.lightning_attention` (the quadratic sum).

The reference itself is checked against a float64 numpy loop over the recurrence
S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t.

Tolerances, relative to the largest |reference| entry (plus the same relative slack per entry):
fp32 1e-5 for T <= 150 and 1e-4 for T = 4096 (sums of thousands of terms in another order);
bf16 1e-2 (outputs rounded to bf16, relative step 2^-8; the kernel's matmul operands are bf16).

The domain's edges (decays 1e-38 (subnormal), 1e-45 and exactly 1) and the state of bf16 inputs
over T = 2048 are checked for every impl, TPU form included, against the float64 recurrence; the
state is fp32 in every form, so its tolerance is fp32's 1e-5 even for bf16 inputs (the GPU kernel
that rounded the decayed keys to bf16 was 1.9e-3 off there, the XLA form 9e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import TOL, abstract, assert_close

from pallas_kernels import lightning_attention, lightning_attention_step, reference
from tests.bad_input import raises_before_tracing

# The TPU form runs in TPU interpret mode in its own, smaller module (test_lightning_tpu.py) and
# in the edge tests below.
FAST_IMPLS = ("xla", "pallas_gpu")
ALL_IMPLS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
DECAYS = {
    "near_zero": (1e-4, 0.05),
    "middle": (0.5, 0.95),
    "near_one": (0.995, 1.0),
}


def run(impl, *args, **kwargs):
  return lightning_attention(*args, impl=impl, interpret=impl.startswith("pallas"), **kwargs)


def recurrence_float64(q, k, v, decay, state=None):
  """S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t in float64 numpy, one step at a time."""
  q64, k64, v64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  batch, t_len, heads, dk = q64.shape
  s = (np.zeros((batch, heads, dk, v64.shape[3])) if state is None
       else np.asarray(state, np.float64))
  lam = np.asarray(decay, np.float64)[None, :, None, None]
  out = np.zeros((batch, t_len, heads, v64.shape[3]))
  for t in range(t_len):
    s = lam * s + np.einsum("bhd,bhe->bhde", k64[:, t], v64[:, t])
    out[:, t] = np.einsum("bhd,bhde->bhe", q64[:, t], s)
  return out, s


def make_inputs(seed, batch, t_len, heads, dk, dv, regime, dtype, with_state=True):
  rng = np.random.default_rng(seed)
  # q and k scaled by Dk^-1/4 each, the usual 1/sqrt(Dk) on q.k.
  q = rng.standard_normal((batch, t_len, heads, dk)) * dk ** -0.25
  k = rng.standard_normal((batch, t_len, heads, dk)) * dk ** -0.25
  v = rng.standard_normal((batch, t_len, heads, dv))
  low, high = DECAYS[regime]
  decay = rng.uniform(low, high, size=heads)
  if regime == "near_one":
    decay[0] = 1.0  # no decay at all: the hardest case for the state's magnitude
  state = rng.standard_normal((batch, heads, dk, dv)) if with_state else None
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(decay, jnp.float32),
          None if state is None else jnp.asarray(state, jnp.float32))


def test_reference_matches_float64_recurrence():
  q, k, v, decay, state = make_inputs(0, 2, 23, 3, 8, 5, "middle", jnp.float32)
  out, final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  expected, expected_final = recurrence_float64(q, k, v, decay, state)
  assert_close(out, expected, 1e-5)
  assert_close(final, expected_final, 1e-5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_domain_edges_match_float64(impl):
  # Subnormal (1e-38), the smallest subnormal (1e-45) and exactly 1: every form must be finite
  # and right. Four heads: the CPU's vectorised log (4 or more lanes) flushes a subnormal to 0
  # and returns -inf, which gave NaN in every form (with 3 heads the scalar log hid it).
  q, k, v, _, state = make_inputs(9, 1, 37, 4, 32, 32, "middle", jnp.float32)
  decay = np.asarray([1e-38, 1e-45, 1.0, 0.5], np.float32)
  expected, expected_final = recurrence_float64(q, k, v, decay, state)
  out, final = run(impl, q, k, v, jnp.asarray(decay), initial_state=state,
                   return_final_state=True)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(final)))
  assert_close(out, expected, 1e-5, impl)
  assert_close(final, expected_final, 1e-5, f"{impl} final state")


@pytest.mark.parametrize("impl", ALL_IMPLS[1:])
def test_bf16_state_stays_fp32_over_a_long_sequence(impl):
  # bf16 inputs, T = 2048, lambda = 0.999: the state sums ~1000 effective terms. It is fp32 in
  # every form, so it must match the float64 recurrence on the same (bf16-rounded) inputs to
  # fp32's tolerance; rounding the decayed keys to bf16 inside the update was 1.9e-3 off here.
  rng = np.random.default_rng(10)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 2048, 1, 32)) * 32 ** -0.25, jnp.bfloat16)
             for _ in range(3))
  decay = np.asarray([0.999], np.float32)
  _, expected_final = recurrence_float64(q, k, v, decay)
  _, final = run(impl, q, k, v, jnp.asarray(decay), return_final_state=True)
  assert final.dtype == jnp.float32
  assert_close(final, expected_final, TOL[jnp.float32], impl)


@settings(max_examples=6, deadline=None, derandomize=True)
@example(batch=1, t_len=1, heads=1, dk=32, dv=32, regime="near_one", with_state=False,
         dtype=jnp.float32, seed=0)
@example(batch=2, t_len=150, heads=3, dk=128, dv=64, regime="near_zero", with_state=True,
         dtype=jnp.bfloat16, seed=1)
@example(batch=1, t_len=37, heads=2, dk=64, dv=128, regime="near_one", with_state=True,
         dtype=jnp.float32, seed=2)
@given(
    batch=st.sampled_from([1, 2]),
    t_len=st.sampled_from([1, 37, 64, 150]),
    heads=st.sampled_from([1, 2, 3]),
    dk=st.sampled_from([32, 64, 128]),
    dv=st.sampled_from([32, 64, 128]),
    regime=st.sampled_from(sorted(DECAYS)),
    with_state=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fast_impls_match_reference(batch, t_len, heads, dk, dv, regime, with_state, dtype, seed):
  q, k, v, decay, state = make_inputs(seed, batch, t_len, heads, dk, dv, regime, dtype, with_state)
  expected, expected_final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  for impl in FAST_IMPLS:
    out, final = run(impl, q, k, v, decay, initial_state=state, return_final_state=True)
    assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
    assert_close(out, expected, TOL[dtype], impl)
    assert_close(final, expected_final, TOL[dtype], f"{impl} final state")


@pytest.mark.parametrize("impl", ("reference",) + FAST_IMPLS)
def test_streaming_in_two_pieces_equals_one_run(impl):
  q, k, v, decay, state = make_inputs(3, 2, 100, 2, 32, 32, "middle", jnp.float32)
  expected, expected_final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  split = 45  # not a multiple of any block size
  first, carried = run(impl, q[:, :split], k[:, :split], v[:, :split], decay,
                       initial_state=state, return_final_state=True)
  second, final = run(impl, q[:, split:], k[:, split:], v[:, split:], decay,
                      initial_state=carried, return_final_state=True)
  assert_close(jnp.concatenate([first, second], axis=1), expected, 1e-5, impl)
  assert_close(final, expected_final, 1e-5, impl)


@pytest.mark.parametrize("impl, interpret, error", [
    ("bogus", False, ValueError), ("pallas_tpu", False, ValueError), ("auto", "yes", TypeError)])
def test_step_validates_impl_like_the_parallel_form(impl, interpret, error):
  q, k, v, decay, state = make_inputs(4, 1, 1, 2, 8, 8, "middle", jnp.float32)
  with raises_before_tracing(error, "impl|interpret"):
    lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], decay, state, impl=impl,
                             interpret=interpret)


def test_step_token_by_token_equals_parallel_form():
  q, k, v, decay, state = make_inputs(4, 2, 12, 3, 32, 64, "middle", jnp.float32)
  expected, expected_final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  for t in range(q.shape[1]):
    out, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], decay, state)
    assert_close(out, expected[:, t], 1e-5, f"t={t}")
  assert_close(state, expected_final, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_long_sequence_is_stable(impl):
  # T = 4096 with decays at and near 1: the state accumulates thousands of terms.
  q, k, v, _, state = make_inputs(5, 1, 4096, 2, 32, 32, "near_one", jnp.float32)
  decay = jnp.asarray([1.0, 0.999], jnp.float32)
  expected, expected_final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  out, final = run(impl, q, k, v, decay, initial_state=state, return_final_state=True)
  assert np.all(np.isfinite(np.asarray(out)))
  assert_close(out, expected, 1e-4, impl)
  assert_close(final, expected_final, 1e-4, impl)


@pytest.mark.parametrize("bad_decay", [[0.0, 0.5], [0.5, 1.5], [-0.1, 0.5], [np.nan, 0.5]])
def test_decay_outside_unit_interval_raises(bad_decay):
  q, k, v = abstract((1, 4, 2, 32), (1, 4, 2, 32), (1, 4, 2, 32))
  with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
    lightning_attention(q, k, v, jnp.asarray(bad_decay, jnp.float32))
  with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
    q_t, k_t, v_t, state = abstract((1, 2, 32), (1, 2, 32), (1, 2, 32), (1, 2, 32, 32))
    lightning_attention_step(q_t, k_t, v_t, jnp.asarray(bad_decay, jnp.float32), state)


@pytest.mark.parametrize(
    "shapes, error, match",
    [
        (((1, 4, 2, 32), (1, 4, 2, 16), (1, 4, 2, 32), (2,)), ValueError, "q and k"),
        (((1, 4, 2, 32), (1, 4, 2, 32), (1, 5, 2, 32), (2,)), ValueError, "v must agree"),
        (((1, 4, 2, 32), (1, 4, 2, 32), (1, 4, 2, 32), (3,)), ValueError, "decay must have shape"),
        (((1, 4, 32), (1, 4, 32), (1, 4, 32), (2,)), ValueError, "q must have 4"),
    ],
)
def test_bad_shapes_raise_before_tracing(shapes, error, match):
  with pytest.raises(error, match=match):
    lightning_attention(*abstract(*shapes))


def test_bad_dtypes_and_state_raise_before_tracing():
  q, k, decay = abstract((1, 4, 2, 32), (1, 4, 2, 32), (2,))
  with pytest.raises(TypeError, match="share one dtype"):
    lightning_attention(q, k, jax.ShapeDtypeStruct((1, 4, 2, 32), jnp.bfloat16), decay)
  with pytest.raises(ValueError, match="initial_state"):
    lightning_attention(q, k, q, decay, initial_state=abstract((1, 2, 32, 16))[0])
  with pytest.raises(TypeError, match="integer|floating"):
    lightning_attention(q, k, q, jax.ShapeDtypeStruct((2,), jnp.int32))


def test_odd_head_dims_are_padded_correctly():
  # Dk = 48 and Dv = 40 are not powers of two: the kernel pads them and slices back.
  q, k, v, decay, state = make_inputs(8, 2, 70, 2, 48, 40, "middle", jnp.float32)
  expected, expected_final = reference.lightning_attention(q, k, v, decay, initial_state=state)
  for impl in FAST_IMPLS:
    out, final = run(impl, q, k, v, decay, initial_state=state, return_final_state=True)
    assert_close(out, expected, 1e-5, impl)
    assert_close(final, expected_final, 1e-5, impl)
