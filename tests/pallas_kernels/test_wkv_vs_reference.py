"""RWKV-7 WKV: every impl against `reference.wkv7`.

The reference itself is checked against a float64 numpy transcription of the WKV core of
RWKV-LM's `rwkv_v7_numpy.py` (a = -kk, b = kk * a_rate, state @ ab with ab = a^T b).

Inputs follow RWKV-7's parametrisation: kk unit-norm per head, a = -kk, b = kk * a_rate with
a_rate in (0, 1), so diag(w) + a^T b is a contraction, as in the model (random a, b would make
the true recurrence blow up).

Tolerances, relative to the largest |reference| entry (plus the same relative slack per entry):
fp32 1e-5 (1e-4 at T = 4096); bf16 1e-2 (outputs rounded to bf16, relative step 2^-8).

The domain's edges (subnormal w = 1e-38 and 1e-45, w = 1 exactly) are checked for every form,
the TPU form included, against a float64 numpy recurrence; w outside (0, 1] is refused by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import TOL, abstract, assert_close

from pallas_kernels import WKVBlocks, reference, wkv7, wkv7_step
from tests.bad_input import raises_before_tracing

# Both XLA forms are checked, whatever "auto" picks on this backend. The TPU form runs in TPU
# interpret mode in its own, smaller module (test_wkv_tpu.py) and in the edge test below.
FAST_IMPLS = ("xla_chunked", "xla_recurrent", "pallas_gpu")
DECAYS = {"near_zero": (1e-4, 1e-2), "middle": (0.5, 0.99), "near_one": (0.999, 1.0)}


def run(impl, *args, **kwargs):
  if impl.startswith("xla"):
    form = impl.removeprefix("xla_")
    return wkv7(*args, impl="xla", blocks=WKVBlocks(xla_form=form), **kwargs)
  return wkv7(*args, impl=impl, interpret=impl.startswith("pallas"), **kwargs)


def recurrence_float64(r, w, k, v, a, b, state):
  """S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t, y_t = S_t r_t^T in float64 numpy."""
  r, w, k, v, a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                      for x in (r, w, k, v, a, b))
  s = np.asarray(state, np.float64)
  ys = []
  for t in range(r.shape[1]):
    state_a = np.einsum("bhvk,bhk->bhv", s, a[:, t])
    s = (s * w[:, t, :, None, :] + state_a[..., None] * b[:, t, :, None, :]
         + v[:, t, :, :, None] * k[:, t, :, None, :])
    ys.append(np.einsum("bhvk,bhk->bhv", s, r[:, t]))
  return np.stack(ys, axis=1), s


def make_inputs(seed, batch, t_len, heads, dk, dv, regime, dtype, with_state=True):
  """(r, w, k, v, a, b), initial_state; plus kk and a_rate for the RWKV-LM transcription."""
  rng = np.random.default_rng(seed)
  shape = (batch, t_len, heads, dk)
  r = rng.standard_normal(shape)
  k = rng.standard_normal(shape) * dk ** -0.5
  v = rng.standard_normal((batch, t_len, heads, dv))
  low, high = DECAYS[regime]
  w = rng.uniform(low, high, shape)
  kk = rng.standard_normal(shape)
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  a_rate = rng.uniform(0.0, 1.0, shape)
  cast = lambda x: jnp.asarray(x, dtype)
  inputs = tuple(cast(x) for x in (r, w, k, v, -kk, kk * a_rate))
  state = (jnp.asarray(rng.standard_normal((batch, heads, dv, dk)), jnp.float32)
           if with_state else None)
  return inputs, state, (kk, a_rate)


def rwkv_lm_v7_wkv_float64(r, w, k, v, kk, a_rate):
  """The WKV lines of RWKV-LM's rwkv_v7_numpy.py `time_mixing`, float64, batch 1, per step."""
  _, t_len, heads, n = r.shape
  r, w, k, v = (np.asarray(x, np.float64)[0] for x in (r, w, k, v))
  kk, a_rate = kk[0], a_rate[0]
  state = np.zeros((heads, n, n))
  outs = []
  for t in range(t_len):
    vk = v[t].reshape(heads, n, 1) @ k[t].reshape(heads, 1, n)
    ab = (-kk[t]).reshape(heads, n, 1) @ (kk[t] * a_rate[t]).reshape(heads, 1, n)
    state = state * w[t].reshape(heads, 1, n) + state @ ab + vk
    outs.append((state @ r[t].reshape(heads, n, 1))[..., 0])
  return np.stack(outs)[None], state[None]


def test_reference_matches_rwkv_lm_numpy():
  inputs, _, (kk, a_rate) = make_inputs(0, 1, 21, 2, 16, 16, "middle", jnp.float32)
  out, last = reference.wkv7(*inputs)
  expected, expected_last = rwkv_lm_v7_wkv_float64(*(inputs[i] for i in (0, 1, 2, 3)), kk, a_rate)
  assert_close(out, expected, 1e-5)
  assert_close(last, expected_last, 1e-5)


@settings(max_examples=6, deadline=None, derandomize=True)
@example(batch=1, t_len=1, heads=1, dk=32, dv=32, regime="middle", with_state=False,
         dtype=jnp.float32, seed=0)
@example(batch=2, t_len=100, heads=2, dk=128, dv=64, regime="near_zero", with_state=True,
         dtype=jnp.bfloat16, seed=1)
@example(batch=1, t_len=37, heads=3, dk=64, dv=128, regime="near_one", with_state=True,
         dtype=jnp.float32, seed=2)
@given(
    batch=st.sampled_from([1, 2]),
    t_len=st.sampled_from([1, 37, 64, 100]),
    heads=st.sampled_from([1, 2, 3]),
    dk=st.sampled_from([32, 64, 128]),
    dv=st.sampled_from([32, 64, 128]),
    regime=st.sampled_from(sorted(DECAYS)),
    with_state=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fast_impls_match_reference(batch, t_len, heads, dk, dv, regime, with_state, dtype, seed):
  inputs, state, _ = make_inputs(seed, batch, t_len, heads, dk, dv, regime, dtype, with_state)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  for impl in FAST_IMPLS:
    out, final = run(impl, *inputs, initial_state=state, return_final_state=True)
    assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
    assert_close(out, expected, TOL[dtype], impl)
    assert_close(final, expected_final, TOL[dtype], f"{impl} final state")


@pytest.mark.parametrize("impl", ("reference",) + FAST_IMPLS)
def test_streaming_in_two_pieces_equals_one_run(impl):
  inputs, state, _ = make_inputs(3, 2, 90, 2, 32, 64, "middle", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  split = 37  # not a multiple of the chunk
  first, carried = run(impl, *(x[:, :split] for x in inputs), initial_state=state,
                       return_final_state=True)
  second, final = run(impl, *(x[:, split:] for x in inputs), initial_state=carried,
                      return_final_state=True)
  assert_close(jnp.concatenate([first, second], axis=1), expected, 1e-5, impl)
  assert_close(final, expected_final, 1e-5, impl)


@pytest.mark.parametrize("impl", ("reference",) + FAST_IMPLS + ("pallas_tpu",))
def test_domain_edges_match_float64(impl):
  # Subnormal w (1e-38 at one step and channel, 1e-45 for a whole step of one head) and w = 1
  # exactly: the chunked form's log(w) flushed the subnormal to -inf and gave NaN for the whole
  # chunk and state; every form must be finite and right.
  inputs, state, _ = make_inputs(11, 1, 37, 2, 32, 32, "middle", jnp.float32)
  w = np.array(inputs[1])
  w[0, 5, 0, 3] = 1e-38
  w[0, 20, 1, :] = 1e-45
  w[0, 30:, 0, ::2] = 1.0
  inputs = (inputs[0], jnp.asarray(w), *inputs[2:])
  expected, expected_final = recurrence_float64(*inputs, state)
  out, final = run(impl, *inputs, initial_state=state, return_final_state=True)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(final)))
  assert_close(out, expected, 1e-5, impl)
  assert_close(final, expected_final, 1e-5, f"{impl} final state")


@pytest.mark.parametrize("bad_w", [0.0, -0.1, 1.5, np.nan])
def test_decay_outside_unit_interval_raises(bad_w):
  # Concrete w is checked before tracing (the chunked and recurrent forms disagree outside).
  w = np.full((1, 4, 2, 8), 0.5, np.float32)
  w[0, 2, 1, 3] = bad_w
  r, k, v, a, b = abstract(*((1, 4, 2, 8),) * 5)
  with raises_before_tracing(ValueError, r"w must lie in \(0, 1\]"):
    wkv7(r, jnp.asarray(w), k, v, a, b)
  r_t, k_t, v_t, a_t, b_t, s_t = abstract(*((1, 2, 8),) * 5, (1, 2, 8, 8))
  with raises_before_tracing(ValueError, r"w must lie in \(0, 1\]"):
    wkv7_step(r_t, w[:, 2], k_t, v_t, a_t, b_t, s_t)


@pytest.mark.parametrize("impl, interpret, error", [
    ("bogus", False, ValueError), ("pallas_tpu", False, ValueError), ("auto", "yes", TypeError)])
def test_step_validates_impl_like_the_parallel_form(impl, interpret, error):
  inputs, state, _ = make_inputs(4, 1, 1, 2, 8, 8, "middle", jnp.float32)
  with raises_before_tracing(error, "impl|interpret"):
    wkv7_step(*(x[:, 0] for x in inputs), state, impl=impl, interpret=interpret)


def test_step_token_by_token_equals_parallel_form():
  inputs, state, _ = make_inputs(4, 2, 10, 2, 32, 64, "middle", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  for t in range(inputs[0].shape[1]):
    out, state = wkv7_step(*(x[:, t] for x in inputs), state)
    assert_close(out, expected[:, t], 1e-5, f"t={t}")
  assert_close(state, expected_final, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_long_sequence_is_stable(impl):
  # T = 4096 with w near 1: the state carries information across the whole sequence.
  inputs, state, _ = make_inputs(5, 1, 4096, 1, 32, 32, "near_one", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  out, final = run(impl, *inputs, initial_state=state, return_final_state=True)
  assert np.all(np.isfinite(np.asarray(out)))
  assert_close(out, expected, 1e-4, impl)
  assert_close(final, expected_final, 1e-4, impl)


@pytest.mark.parametrize(
    "shapes, error, match",
    [
        (((1, 8, 2, 32),) * 2 + ((1, 8, 2, 16),) + ((1, 8, 2, 32),) * 3, ValueError, "k must"),
        (((1, 8, 2, 32),) * 3 + ((1, 9, 2, 32),) + ((1, 8, 2, 32),) * 2, ValueError, "v must"),
        (((1, 8, 2, 32),) * 5 + ((1, 8, 3, 32),), ValueError, "b must"),
        (((1, 8, 32),) * 6, ValueError, "r must have 4"),
    ],
)
def test_bad_shapes_raise_before_tracing(shapes, error, match):
  with pytest.raises(error, match=match):
    wkv7(*abstract(*shapes))


def test_bad_dtypes_and_state_raise_before_tracing():
  r, w, k, v, a, b = abstract(*((1, 8, 2, 32),) * 6)
  with pytest.raises(TypeError, match="share one dtype"):
    wkv7(r, w, k, jax.ShapeDtypeStruct(v.shape, jnp.bfloat16), a, b)
  with pytest.raises(ValueError, match="initial_state"):
    wkv7(r, w, k, v, a, b, initial_state=abstract((1, 2, 32, 16))[0])
  with pytest.raises(ValueError, match="state"):
    wkv7_step(*abstract(*((1, 2, 32),) * 6), abstract((1, 2, 16, 32))[0])


def test_odd_head_dims_are_padded_correctly():
  # Dk = 48 and Dv = 40 are not powers of two: the kernel pads them and slices back.
  inputs, state, _ = make_inputs(8, 2, 45, 2, 48, 40, "middle", jnp.float32)
  expected, expected_final = reference.wkv7(*inputs, initial_state=state)
  for impl in FAST_IMPLS:
    out, final = run(impl, *inputs, initial_state=state, return_final_state=True)
    assert_close(out, expected, 1e-5, impl)
    assert_close(final, expected_final, 1e-5, impl)
