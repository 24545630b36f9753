"""Lightning attention: every impl against `reference.lightning_attention` (the quadratic sum).

The reference itself is checked against a float64 numpy loop over the recurrence
S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t.

Tolerances, relative to the largest |reference| entry (plus the same relative slack per entry):
fp32 1e-5 for T <= 150 and 1e-4 for T = 4096 (sums of thousands of terms in another order);
bf16 1e-2 (outputs rounded to bf16, relative step 2^-8; the kernel's matmul operands are bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels import lightning_attention, lightning_attention_step, reference
from kernel_checks import TOL, abstract, assert_close

FAST_IMPLS = ("xla", "pallas")
DECAYS = {
    "near_zero": (1e-4, 0.05),
    "middle": (0.5, 0.95),
    "near_one": (0.995, 1.0),
}


def run(impl, *args, **kwargs):
  return lightning_attention(*args, impl=impl, interpret=impl == "pallas", **kwargs)


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
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.asarray(state, np.float64)
  lam = np.asarray(decay, np.float64)[None, :, None, None]
  expected = np.zeros(out.shape)
  for t in range(q.shape[1]):
    s = lam * s + np.einsum("bhd,bhe->bhde", k64[:, t], v64[:, t])
    expected[:, t] = np.einsum("bhd,bhde->bhe", q64[:, t], s)
  assert_close(out, expected, 1e-5)
  assert_close(final, s, 1e-5)


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
