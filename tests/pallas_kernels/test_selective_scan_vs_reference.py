"""Selective scan: every impl against `reference.selective_scan`.

The reference itself is checked against a float64 numpy transcription of mamba_ssm's
`selective_scan_ref` in its own channel-major [B, D, L] layout.

Tolerances, relative to the largest |reference| entry (plus the same relative slack per entry):
fp32 1e-5 (1e-4 at T = 4096); bf16 1e-2 (the output is rounded to bf16, relative step 2^-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import TOL, abstract, assert_close

from pallas_kernels import (
  SelectiveScanBlocks,
  reference,
  selective_scan,
  selective_scan_step,
)

# The XLA form's two in-block solvers are both checked, whatever "auto" picks on this backend.
FAST_IMPLS = ("xla", "xla_associative", "pallas")
# exp(delta * A) per step: near 0 forgets at once, near 1 remembers for thousands of steps.
DELTA_SCALE = {"near_zero": 8.0, "middle": 0.5, "near_one": 1e-3}


def run(impl, *args, **kwargs):
  if impl.startswith("xla"):
    inner = "associative" if impl == "xla_associative" else "sequential"
    return selective_scan(*args, impl="xla", blocks=SelectiveScanBlocks(xla_inner=inner), **kwargs)
  return selective_scan(*args, impl=impl, interpret=impl == "pallas", **kwargs)


def make_inputs(seed, batch, t_len, channels, n_state, groups, regime, softplus, optional, dtype,
                with_state=True):
  """Returns (args, kwargs) for selective_scan; `optional` switches D, z and delta_bias on.

  `groups`: 0 for B, C [B, T, N], G > 0 for grouped [B, T, G, N], "time_invariant" for [D, N].
  """
  rng = np.random.default_rng(seed)
  cast = lambda x: jnp.asarray(x, dtype)
  u = rng.standard_normal((batch, t_len, channels))
  if softplus:
    # softplus(x) ~ exp(x) for x << 0 and ~ x for x >> 0: pick the pre-activation that lands delta
    # around DELTA_SCALE.
    target = DELTA_SCALE[regime] * rng.uniform(0.5, 1.5, (batch, t_len, channels))
    delta = np.log(np.expm1(target))
  else:
    delta = DELTA_SCALE[regime] * rng.uniform(0.5, 1.5, (batch, t_len, channels))
  # S4D-real initialisation, A = -(1..N), as in Mamba.
  A = -np.tile(np.arange(1, n_state + 1, dtype=np.float64), (channels, 1))
  if groups == "time_invariant":
    bc_shape = (channels, n_state)
  else:
    bc_shape = (batch, t_len, groups, n_state) if groups else (batch, t_len, n_state)
  B = rng.standard_normal(bc_shape)
  C = rng.standard_normal(bc_shape)
  kwargs = {"delta_softplus": softplus}
  if optional:
    kwargs["D"] = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    kwargs["z"] = cast(rng.standard_normal((batch, t_len, channels)))
    kwargs["delta_bias"] = jnp.asarray(0.01 * rng.standard_normal(channels), jnp.float32)
  if with_state:
    kwargs["initial_state"] = jnp.asarray(rng.standard_normal((batch, channels, n_state)),
                                          jnp.float32)
  args = (cast(u), cast(delta), jnp.asarray(A, jnp.float32), cast(B), cast(C))
  return args, kwargs


def mamba_selective_scan_ref_float64(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
  """mamba_ssm.ops.selective_scan_interface.selective_scan_ref, transcribed to numpy float64.

  Channel-major like the original: u, delta, z [B, D, L]; B, C [B, N, L] or [B, G, N, L], or
  time-invariant [D, N].
  """
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)[..., None]
  if delta_softplus:
    delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
  batch, dim, length = u.shape
  if B.ndim == 4:
    B = np.repeat(B, dim // B.shape[1], axis=1)  # repeat(B, "B G N L -> B (G H) N L")
    C = np.repeat(C, dim // C.shape[1], axis=1)
  deltaA = np.exp(np.einsum("bdl,dn->bdln", delta, A))
  if B.ndim == 2:  # not is_variable_B
    deltaB_u = np.einsum("bdl,dn,bdl->bdln", delta, B, u)
  elif B.ndim == 3:
    deltaB_u = np.einsum("bdl,bnl,bdl->bdln", delta, B, u)
  else:
    deltaB_u = np.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
  x = np.zeros((batch, dim, A.shape[1]))
  ys = []
  for i in range(length):
    x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
    if C.ndim == 2:
      ys.append(np.einsum("bdn,dn->bd", x, C))
    elif C.ndim == 3:
      ys.append(np.einsum("bdn,bn->bd", x, C[:, :, i]))
    else:
      ys.append(np.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
  y = np.stack(ys, axis=2)
  out = y if D is None else y + u * np.asarray(D, np.float64)[:, None]
  if z is not None:
    z = np.asarray(z, np.float64)
    out = out * z / (1 + np.exp(-z))
  return out, x


@pytest.mark.parametrize("groups", [0, 2, "time_invariant"])
def test_reference_matches_mamba_ssm_semantics(groups):
  (u, delta, A, B, C), kw = make_inputs(0, 2, 19, 8, 4, groups, "middle", True, True,
                                        jnp.float32, with_state=False)
  out, last = reference.selective_scan(u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], True)
  channel_major = lambda x: np.moveaxis(np.asarray(x), 1, -1)  # [B, T, ...] -> [B, ..., T]
  bc_layout = (lambda x: np.asarray(x)) if groups == "time_invariant" else channel_major
  expected, expected_last = mamba_selective_scan_ref_float64(
      channel_major(u), channel_major(delta), A, bc_layout(B), bc_layout(C), kw["D"],
      channel_major(kw["z"]), kw["delta_bias"], True)
  assert_close(out, np.moveaxis(expected, -1, 1), 1e-5)
  assert_close(last, expected_last, 1e-5)


@settings(max_examples=6, deadline=None, derandomize=True)
@example(batch=1, t_len=1, channels=32, n_state=16, groups=0, regime="middle", softplus=True,
         optional=True, with_state=False, dtype=jnp.float32, seed=0)
@example(batch=2, t_len=100, channels=128, n_state=16, groups=2, regime="near_one",
         softplus=False, optional=True, with_state=True, dtype=jnp.bfloat16, seed=1)
@example(batch=1, t_len=37, channels=64, n_state=4, groups=1, regime="near_zero", softplus=True,
         optional=False, with_state=True, dtype=jnp.float32, seed=2)
@given(
    batch=st.sampled_from([1, 2]),
    t_len=st.sampled_from([1, 37, 64, 100]),
    channels=st.sampled_from([32, 64, 128]),
    n_state=st.sampled_from([4, 16]),
    groups=st.sampled_from([0, 1, 2]),
    regime=st.sampled_from(sorted(DELTA_SCALE)),
    softplus=st.booleans(),
    optional=st.booleans(),
    with_state=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fast_impls_match_reference(batch, t_len, channels, n_state, groups, regime, softplus,
                                    optional, with_state, dtype, seed):
  args, kwargs = make_inputs(seed, batch, t_len, channels, n_state, groups, regime, softplus,
                             optional, dtype, with_state)
  expected, expected_final = run("reference", *args, return_final_state=True, **kwargs)
  for impl in FAST_IMPLS:
    out, final = run(impl, *args, return_final_state=True, **kwargs)
    assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
    assert_close(out, expected, TOL[dtype], impl)
    assert_close(final, expected_final, TOL[dtype], f"{impl} final state")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_time_invariant_b_c_match_reference(dtype):
  # B, C [D, N] (mamba_ssm's non-selective case); 80 channels, N = 12, T = 45: padded in every impl.
  args, kwargs = make_inputs(9, 2, 45, 80, 12, "time_invariant", "middle", True, True, dtype)
  expected, expected_final = run("reference", *args, return_final_state=True, **kwargs)
  for impl in FAST_IMPLS:
    out, final = run(impl, *args, return_final_state=True, **kwargs)
    assert out.shape == expected.shape and out.dtype == dtype and final.dtype == jnp.float32
    assert_close(out, expected, TOL[dtype], impl)
    assert_close(final, expected_final, TOL[dtype], f"{impl} final state")


@pytest.mark.parametrize("impl", ("reference",) + FAST_IMPLS)
def test_streaming_in_two_pieces_equals_one_run(impl):
  (u, delta, A, B, C), kw = make_inputs(3, 2, 90, 32, 16, 2, "middle", True, True, jnp.float32)
  expected, expected_final = run("reference", u, delta, A, B, C, return_final_state=True, **kw)
  split = 41
  first_half = lambda x: x[:, :split]
  second_half = lambda x: x[:, split:]
  piece_kw = dict(kw)
  first, carried = run(impl, *map(first_half, (u, delta)), A, *map(first_half, (B, C)),
                       **{**piece_kw, "z": first_half(kw["z"])}, return_final_state=True)
  piece_kw["initial_state"] = carried
  second, final = run(impl, *map(second_half, (u, delta)), A, *map(second_half, (B, C)),
                      **{**piece_kw, "z": second_half(kw["z"])}, return_final_state=True)
  assert_close(jnp.concatenate([first, second], axis=1), expected, 1e-5, impl)
  assert_close(final, expected_final, 1e-5, impl)


@pytest.mark.parametrize("groups", [0, 2])
def test_step_token_by_token_equals_parallel_form(groups):
  (u, delta, A, B, C), kw = make_inputs(4, 2, 10, 32, 16, groups, "middle", True, True,
                                        jnp.float32)
  expected, expected_final = run("reference", u, delta, A, B, C, return_final_state=True, **kw)
  state = kw["initial_state"]
  for t in range(u.shape[1]):
    out, state = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], kw["D"],
                                     kw["z"][:, t], kw["delta_bias"], state, delta_softplus=True,
                                     impl="xla")
    assert_close(out, expected[:, t], 1e-5, f"t={t}")
  assert_close(state, expected_final, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_long_sequence_is_stable(impl):
  # T = 4096 with exp(delta A) ~ 0.999: the state remembers over the whole sequence.
  args, kwargs = make_inputs(5, 1, 4096, 32, 16, 0, "near_one", True, True, jnp.float32)
  expected, expected_final = run("reference", *args, return_final_state=True, **kwargs)
  out, final = run(impl, *args, return_final_state=True, **kwargs)
  assert np.all(np.isfinite(np.asarray(out)))
  assert_close(out, expected, 1e-4, impl)
  assert_close(final, expected_final, 1e-4, impl)


@pytest.mark.parametrize(
    "shapes, error, match",
    [
        (((1, 8, 32), (1, 8, 16), (32, 4), (1, 8, 4), (1, 8, 4)), ValueError, "delta"),
        (((1, 8, 32), (1, 8, 32), (16, 4), (1, 8, 4), (1, 8, 4)), ValueError, "A must"),
        (((1, 8, 32), (1, 8, 32), (32, 4), (1, 8, 8), (1, 8, 8)), ValueError, "B must"),
        (((1, 8, 32), (1, 8, 32), (32, 4), (1, 8, 4), (1, 8, 3, 4)), ValueError, "B and C"),
        (((1, 8, 32), (1, 8, 32), (32, 4), (1, 8, 3, 4), (1, 8, 3, 4)), ValueError, "groups"),
        (((1, 8, 32, 1), (1, 8, 32), (32, 4), (1, 8, 4), (1, 8, 4)), ValueError, "u must have 3"),
        (((1, 8, 32), (1, 8, 32), (32, 4), (16, 4), (16, 4)), ValueError, "B must be time-inv"),
        (((1, 8, 32), (1, 8, 32), (32, 4), (4,), (4,)), ValueError, "B must be"),
    ],
)
def test_bad_shapes_raise_before_tracing(shapes, error, match):
  with pytest.raises(error, match=match):
    selective_scan(*abstract(*shapes))


def test_bad_dtypes_and_optionals_raise_before_tracing():
  u, delta, A, B, C = abstract((1, 8, 32), (1, 8, 32), (32, 4), (1, 8, 4), (1, 8, 4))
  with pytest.raises(TypeError, match="share one dtype"):
    selective_scan(u, jax.ShapeDtypeStruct(u.shape, jnp.bfloat16), A, B, C)
  with pytest.raises(ValueError, match="D must have shape"):
    selective_scan(u, delta, A, B, C, D=abstract((16,))[0])
  with pytest.raises(ValueError, match="z must have shape"):
    selective_scan(u, delta, A, B, C, z=abstract((1, 8, 16))[0])
  with pytest.raises(ValueError, match="initial_state"):
    selective_scan(u, delta, A, B, C, initial_state=abstract((1, 32, 5))[0])
  with pytest.raises(TypeError, match="delta_softplus"):
    selective_scan(u, delta, A, B, C, delta_softplus=1)
  with pytest.raises(ValueError, match="impl"):
    selective_scan(u, delta, A, B, C, impl="cuda")
  with pytest.raises(ValueError, match="impl"):
    selective_scan_step(*abstract((1, 32), (1, 32), (32, 4), (1, 4), (1, 4)),
                        impl="cuda")
  if jax.default_backend() == "cpu":  # the TPU form runs here only in TPU interpret mode
    with pytest.raises(ValueError, match="interpret=True"):
      selective_scan_step(*abstract((1, 32), (1, 32), (32, 4), (1, 4), (1, 4)),
                          impl="pallas_tpu")


def test_odd_sizes_are_padded_correctly():
  # N = 12 states and 2 groups of 40 channels: neither is a power of two.
  args, kwargs = make_inputs(8, 2, 45, 80, 12, 2, "middle", True, True, jnp.float32)
  expected, expected_final = run("reference", *args, return_final_state=True, **kwargs)
  for impl in FAST_IMPLS:
    out, final = run(impl, *args, return_final_state=True, **kwargs)
    assert_close(out, expected, 1e-5, impl)
    assert_close(final, expected_final, 1e-5, impl)


def test_step_without_a_state_starts_from_zeros():
  """state=None in the step form is the zero state, as initial_state=None in the parallel form."""
  (u, delta, A, B, C), kw = make_inputs(4, 2, 1, 32, 16, 0, "middle", True, True, jnp.float32,
                                        with_state=False)
  expected, expected_final = run("reference", u, delta, A, B, C, return_final_state=True, **kw)
  out, state = selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], kw["D"],
                                   kw["z"][:, 0], kw["delta_bias"], delta_softplus=True,
                                   impl="xla")
  assert_close(out, expected[:, 0], 1e-5)
  assert_close(state, expected_final, 1e-5)
