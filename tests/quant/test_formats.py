"""Formats: the float grids against their closed forms, ml_dtypes' enumeration of every bit pattern
and a brute-force decoder; rounding against ml_dtypes' casts and brute-force nearest search; the
quantization error bounds; the format search against a brute-force evaluation."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinf.quant import formats as F
from tests.bad_input import raises_before_tracing

# ml_dtypes' float types and the ExMy format (e, m, bias, specials) with the same finite values.
# fnuz types (NaN at the negative-zero code) are the "none" grid with bias 2^(e-1).
ML_DTYPES = {
    "float8_e4m3fn": ((4, 3, 7, "fn"), False),
    "float8_e5m2": ((5, 2, 15, "ieee"), False),
    "float8_e4m3": ((4, 3, 7, "ieee"), False),
    "float8_e3m4": ((3, 4, 3, "ieee"), False),
    "float6_e2m3fn": ((2, 3, 1, "none"), False),
    "float6_e3m2fn": ((3, 2, 3, "none"), False),
    "float4_e2m1fn": ((2, 1, 1, "none"), False),
    "float8_e4m3fnuz": ((4, 3, 8, "none"), True),
    "float8_e5m2fnuz": ((5, 2, 16, "none"), True),
    "float8_e4m3b11fnuz": ((4, 3, 11, "none"), True),
}


def brute_decode(code: int, e: int, m: int, bias: int, specials: str) -> float:
  """One bit pattern's value, read off its bit string (the formats' textbook definition)."""
  bits = format(code, f"0{1 + e + m}b")
  sign = -1.0 if bits[0] == "1" else 1.0
  exp_bits, man_bits = bits[1:1 + e], bits[1 + e:]
  exp = int(exp_bits, 2)
  man = int(man_bits, 2) if m else 0
  if specials == "ieee" and exp_bits == "1" * e:
    return sign * np.inf if man == 0 else np.nan
  if specials == "fn" and exp_bits == "1" * e and man_bits == "1" * m:
    return np.nan
  if exp == 0:
    return sign * (man / 2 ** m) * 2.0 ** (1 - bias)
  return sign * (1 + man / 2 ** m) * 2.0 ** (exp - bias)


def test_named_grids_closed_form():
  # OCP MX v1.0 Table 4 (E2M1) and the OCP 8-bit spec's ranges (E4M3: max 448, min normal 2^-6,
  # min subnormal 2^-9; E5M2: max 57344, min normal 2^-14, min subnormal 2^-16).
  np.testing.assert_array_equal(F.FORMATS["fp4_e2m1"].values(),
                                [0, 0.5, 1, 1.5, 2, 3, 4, 6])
  for name, mx, mn, sub, count in (("fp8_e4m3", 448, 2.0 ** -6, 2.0 ** -9, 127),
                                   ("fp8_e5m2", 57344, 2.0 ** -14, 2.0 ** -16, 124)):
    v = F.FORMATS[name].values()
    assert (v[-1], v[1], len(v)) == (mx, sub, count)
    assert v[2 ** F.FORMATS[name].mantissa_bits] == mn
    assert np.all(np.diff(v) > 0)


@pytest.mark.parametrize("dtype_name", sorted(ML_DTYPES))
def test_grid_equals_ml_dtypes_enumeration(dtype_name):
  (e, m, bias, specials), fnuz = ML_DTYPES[dtype_name]
  fmt = F.FloatFormat(e, m, bias, specials)
  dt = getattr(ml_dtypes, dtype_name)
  all_values = np.arange(2 ** fmt.bits, dtype=np.uint8).view(dt).astype(np.float64)
  finite = np.unique(all_values[np.isfinite(all_values)])
  np.testing.assert_array_equal(fmt.grid(), finite)
  assert fmt.max_value == float(ml_dtypes.finfo(dt).max)
  if not fnuz:  # same bit layout: every pattern decodes alike (inf and NaN where ml_dtypes has them)
    np.testing.assert_array_equal(fmt.decode_table(), all_values)


def _all_formats():
  for e in range(1, 7):
    for m in range(8 - e):
      for specials in F.SPECIALS:
        if specials != "none" and e < 2:
          continue
        std = 2 ** (e - 1) - 1
        for bias in {std, std + 3, 0}:
          yield F.FloatFormat(e, m, bias, specials)


def test_every_exmy_grid_against_brute_force():
  n = 0
  for fmt in _all_formats():
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    brute = np.array([brute_decode(c, e, m, fmt.bias, fmt.specials)
                      for c in range(2 ** fmt.bits)])
    np.testing.assert_array_equal(fmt.decode_table(), brute, err_msg=fmt.name)
    pos = np.unique(brute[np.isfinite(brute) & (brute >= 0)])
    np.testing.assert_array_equal(fmt.values(), pos, err_msg=fmt.name)
    n += 1
  assert n > 60


def _sample_formats():
  """One format per (e, m) with e <= 5, specials and bias varied across them (compiles are the
  cost of the jitted checks), plus the named ones."""
  out = []
  pairs = [(e, m) for e in range(1, 6) for m in range(8 - e)]
  for i, (ex, m) in enumerate(pairs):
    specials = F.SPECIALS[i % 3] if ex >= 2 else "none"
    out.append(F.FloatFormat(ex, m, 2 ** (ex - 1) - 1 + (3 if i % 2 else 0), specials))
  return out + [f for f in F.FORMATS.values() if isinstance(f, F.FloatFormat)]


@pytest.fixture(scope="module")
def round_fn():
  return jax.jit(lambda x, fmt: fmt.round_to_grid(x), static_argnums=1)


@pytest.mark.parametrize("dtype_name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn",
                                        "float6_e3m2fn"])
def test_rounding_equals_ml_dtypes_cast(round_fn, dtype_name):
  # ml_dtypes' casts round to nearest, ties to even: an independent implementation. Inputs: random
  # values over the whole range, every grid value, every midpoint between neighbours (the ties).
  (e, m, bias, specials), _ = ML_DTYPES[dtype_name]
  fmt = F.FloatFormat(e, m, bias, specials)
  dt = getattr(ml_dtypes, dtype_name)
  g = fmt.grid()
  rng = np.random.default_rng(0)
  x = np.concatenate([g, (g[1:] + g[:-1]) / 2,
                      rng.uniform(-1, 1, 2000) * fmt.max_value,
                      rng.normal(size=500) * fmt.min_normal]).astype(np.float32)
  want = x.astype(dt).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(round_fn(jnp.asarray(x), fmt)), want)


def test_rounding_ties_and_saturation_every_format(round_fn):
  # Brute force: the nearest grid value; at a midpoint the neighbour with the even code (for
  # m = 0, documented: the one larger in magnitude); beyond the range: ±max (saturation).
  for fmt in _sample_formats():
    pos = fmt.values()
    codes = np.arange(len(pos))  # values() is in code order
    mid = (pos[1:] + pos[:-1]) / 2
    if fmt.mantissa_bits > 0:
      want_mid = np.where(codes[:-1] % 2 == 0, pos[:-1], pos[1:])
    else:
      want_mid = np.where(codes[:-1] == 0, pos[:-1], pos[1:])
    rng = np.random.default_rng(1)
    x = rng.uniform(0, fmt.max_value, 300)
    grid = fmt.grid()
    want_x = grid[np.argmin(np.abs(x[:, None] - grid[None]), axis=1)]
    big = np.array([fmt.max_value * 1.5, 1e30])
    inp = np.concatenate([mid, x, big, -mid, -x, -big]).astype(np.float32)
    want = np.concatenate([want_mid, want_x, [fmt.max_value] * 2])
    want = np.concatenate([want, -want])
    np.testing.assert_array_equal(np.asarray(round_fn(jnp.asarray(inp), fmt)), want,
                                  err_msg=fmt.name)


def test_encode_inverts_decode_table():
  encode = jax.jit(lambda q, fmt: fmt.encode(q), static_argnums=1)
  for fmt in _sample_formats():
    table = fmt.decode_table()
    ok = np.isfinite(table) & ~((table == 0) & np.signbit(table))  # -0 encodes as +0
    codes = np.nonzero(ok)[0]
    got = np.asarray(encode(jnp.asarray(table[codes], jnp.float32), fmt))
    np.testing.assert_array_equal(got, codes, err_msg=fmt.name)


@pytest.fixture(scope="module")
def fq():
  return jax.jit(F.fake_quantize, static_argnums=(1, 2))


# Weights of magnitude 0 or in [1e-6, 1e4]: scales stay fp32 normal numbers (a group whose
# absmax / max underflows fp32's normal range, ~1e-38, has a subnormal scale and loses precision).
_WEIGHTS = st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-6)


@settings(max_examples=25, deadline=None)
@given(w=hnp.arrays(np.float32, (8, 3), elements=_WEIGHTS),
       name=st.sampled_from(["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]),
       group=st.sampled_from([8, 4, 2]))
def test_quantization_error_within_bound(fq, w, name, group):
  """|w - s q| <= s/2 for integers; for floats half the grid spacing at w/s: 2^-(m+1)|w| in the
  normal range, s 2^(-b-m) in the subnormal range. Plus the fp32 rounding of w / s and of s q
  (each at most 2^-24 relative), which the exact inequalities allow for explicitly."""
  fmt = F.FORMATS[name]
  q, s = fq(jnp.asarray(w), fmt, group)
  s_full = np.repeat(np.asarray(s, np.float64), group, axis=0)
  w_hat = np.asarray(q, np.float64) * s_full
  err = np.abs(w.astype(np.float64) - w_hat)
  fp32 = 2.0 ** -23 * (np.abs(w) + np.abs(w_hat))
  if isinstance(fmt, F.IntFormat):
    bound = s_full / 2
  else:
    m, b = fmt.mantissa_bits, fmt.bias
    bound = np.maximum(2.0 ** -(m + 1) * np.abs(w), s_full * 2.0 ** (-b - m))
  assert np.all(err <= bound + fp32), (name, float(np.max(err - bound - fp32)))


def _brute_search(w, x, search: F.FloatSearch):
  """Every (split, clip ratio): float64 scales, nearest grid value by exhaustive search."""
  w64 = w.astype(np.float64)
  out = {}
  for fmt in search.candidates():
    grid = fmt.grid()
    for alpha in search.clip_ratios:
      s = alpha * np.abs(w64).max(axis=0) / fmt.max_value
      v = np.clip(w64 / s, grid[0], grid[-1])
      q = grid[np.argmin(np.abs(v[..., None] - grid), axis=-1)]
      d = w64 - q * s
      r = d if x is None else x.astype(np.float64) @ d
      out[(fmt.name, alpha)] = float(np.mean(r * r))
  return out


@pytest.mark.parametrize("bits,with_x", [(4, False), (4, True), (6, False)])
def test_format_search_picks_brute_force_best(bits, with_x):
  rng = np.random.default_rng(bits)
  w = rng.standard_t(3, size=(48, 6)).astype(np.float32)  # heavy tails: clipping pays off
  x = rng.normal(size=(32, 48)).astype(np.float32) if with_x else None
  search = F.FloatSearch(bits)
  brute = _brute_search(w, x, search)
  ranked = sorted(brute, key=brute.get)
  best = ranked[0]
  assert brute[ranked[1]] > brute[best] * (1 + 1e-3)  # a clear winner: the test can discriminate
  found = F.search_float_format(jnp.asarray(w), search, x=None if x is None else jnp.asarray(x))
  assert (found.format.name, found.clip_ratio) == best
  for key, err in brute.items():
    assert found.errors[key] == pytest.approx(err, rel=1e-4)


def test_search_candidates():
  assert [f.name for f in F.FloatSearch(4).candidates()] == ["e1m2", "e2m1", "e3m0"]
  names = [f.name for f in F.FloatSearch(8).candidates()]
  assert "e4m3_fn" in names and "e5m2_ieee" in names and len(names) == 7


def test_format_bad_input():
  with raises_before_tracing(ValueError, r"format.*int3.*fp4_e2m1"):
    F.get_format("int3")
  with raises_before_tracing(ValueError, "exponent_bits"):
    F.FloatFormat(0, 3)
  with raises_before_tracing(ValueError, "exponent_bits \\+ mantissa_bits"):
    F.FloatFormat(5, 5)
  with raises_before_tracing(ValueError, "specials"):
    F.FloatFormat(1, 2, specials="ieee")
  with raises_before_tracing(ValueError, "specials"):
    F.FloatFormat(4, 3, specials="fnuz")
  with raises_before_tracing(ValueError, "bias"):
    F.FloatFormat(5, 2, bias=200)
  with raises_before_tracing(ValueError, "bits"):
    F.FloatSearch(9)
  with raises_before_tracing(ValueError, "clip_ratios"):
    F.FloatSearch(4, clip_ratios=(1.5,))


def test_named_formats_resolve():
  for name, fmt in F.FORMATS.items():
    assert F.get_format(name) is fmt and F.get_format(fmt) is fmt and fmt.name.startswith(
        name.split("_")[1] if "_" in name else name)
