"""Low-bit number formats: symmetric integers and ExMy floating-point grids, and per-tensor search.

A format is the grid `G` of values a stored code can take, in units of the weight's scale: a
weight `w` is stored as codes `q` on `G` and a per-channel (or per-group) fp32 scale `s`, with
`w ≈ s · q`. Quantizing is round-to-nearest onto `G` after dividing by `s`.

**Integers** (`IntFormat`, "int8", "int4"): symmetric, `G = {-qmax, ..., qmax}` with
`qmax = 2^(b-1) - 1` (the code -2^(b-1) is unused so that `G = -G`), `s = absmax / qmax`;
rounding is half-to-even (`jnp.round`). Every `|w| <= absmax` lands in range, so the error is at
most half a step, `s / 2`.

**Floats** (`FloatFormat`, OCP/MX "ExMy"): a sign bit, `e` exponent bits with bias `b` and `m`
mantissa bits. A code with exponent field `E` and mantissa field `k` is

    E = 0 (subnormal):  (-1)^sign · k · 2^(1 - b - m)
    E >= 1 (normal):    (-1)^sign · (2^m + k) · 2^(E - b - m)

so the positive finite values are the closed form `FloatFormat.values()`: the subnormal run
`k · 2^(1-b-m)`, k < 2^m, then one binade per exponent with `2^m` evenly spaced values. What the
all-ones exponent means depends on `specials` (OCP 8-bit FP spec; OCP Microscaling spec v1.0):

- "ieee": the all-ones exponent is inf (k = 0) and NaN (k > 0): E5M2 (max 57344);
- "fn": only the all-ones code (exponent and mantissa) is NaN: E4M3 (max 448);
- "none": every code is finite: the MX element formats E2M1 (FP4, max 6), E2M3, E3M2.

("fnuz" dtypes put NaN at the negative-zero code; their positive values are the "none" grid with
bias 2^(e-1), which is how the tests compare them with ml_dtypes.)

Rounding onto a float grid (`round_to_grid`) is round-to-nearest, ties to the even mantissa (the
IEEE default, what ml_dtypes' and XLA's float8 casts do): with `E* = max(floor(log2|x|), 1-b)` the
grid spacing at `x` is `2^(E* - m)` and `round(x / 2^(E*-m)) · 2^(E*-m)` is exact in fp32 (power-of-
two scalings) with `jnp.round` resolving ties to the even multiple, i.e. the even mantissa.

**Saturation, by design.** Values beyond the grid's largest finite value `max` saturate to `±max`
(never to inf/NaN): with the absmax scale (`s = absmax / max`) nothing exceeds the range; with a
clipping ratio `α < 1` (the format search below) the largest `|w|` saturate on purpose, trading
their error for a finer grid everywhere else. Within range the error of a float grid is at most
half the spacing: `|x - q| <= 2^(E* - m - 1)`, a relative half-ulp `2^-(m+1)` for normal values.

**The format search** (`search_float_format`; formats "fp4", "fp6", "fp8"): for a b-bit float the
split between exponent and mantissa and the exponent bias are chosen per tensor by minimising the
quantization error against the weight (MSE of `w`) or, given calibration inputs `X`, the output
error `||X W - X Ŵ||²` — as LLM-FP4 (Liu et al. 2023, Sec. 4.1), "Efficient Post-training
Quantization with FP8 Formats" (Shen et al. 2024) and the low-bit FP diffusion paper
("Exploring the potential of low-bit FP for diffusion models", Chen et al. 2023) do. Candidates:
every split `e + m = b - 1` with `e >= 1` ("none" specials below 8 bits as in MX; at 8 bits the
OCP E4M3/E5M2 conventions for those two splits), and the bias. Changing the bias by one multiplies
the grid by two, so with a real per-channel scale the bias is one continuous degree of freedom,
the largest representable value: we search it as a clipping ratio `α` (`s_c = α · absmax_c / max`)
over `clip_ratios`. `α = 1` is the absmax scale (no clipping); `α < 1` is a larger effective bias
(a finer grid, the top saturated). The search is exhaustive over candidates (a few dozen).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SPECIALS = ("ieee", "fn", "none")

# The default clipping ratios of the format search: alpha = 1 (absmax) down to 0.5.
DEFAULT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclasses.dataclass(frozen=True)
class IntFormat:
  """Symmetric signed integers of `bits` bits: the grid {-qmax, ..., qmax}, qmax = 2^(bits-1)-1."""

  bits: int

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"bits: expected an int in [2, 8], got {self.bits!r}")

  @property
  def name(self) -> str:
    return f"int{self.bits}"

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def max_value(self) -> float:
    """The largest grid value (in units of the scale)."""
    return float(self.qmax)

  def grid(self) -> np.ndarray:
    """Every value of the grid, sorted, float64."""
    return np.arange(-self.qmax, self.qmax + 1, dtype=np.float64)

  def round_to_grid(self, x: jax.Array) -> jax.Array:
    """Nearest grid value (ties to even), saturating at ±qmax."""
    return jnp.clip(jnp.round(x), -self.qmax, self.qmax)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """The ExMy float grid: 1 sign bit, `exponent_bits` e, `mantissa_bits` m, `bias` (default
  2^(e-1) - 1) and `specials` ("ieee", "fn" or "none"; see the module docstring)."""

  exponent_bits: int
  mantissa_bits: int
  bias: int | None = None
  specials: str = "none"

  def __post_init__(self):
    e, m = self.exponent_bits, self.mantissa_bits
    for name, v, lo in (("exponent_bits", e, 1), ("mantissa_bits", m, 0)):
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if not 2 <= 1 + e + m <= 8:
      raise ValueError(f"exponent_bits + mantissa_bits: expected a format of 2 to 8 bits "
                       f"(1 + e + m), got e={e}, m={m}")
    if self.specials not in SPECIALS:
      raise ValueError(f"specials: expected one of {SPECIALS}, got {self.specials!r}")
    if self.specials != "none" and e < 2:
      raise ValueError(f"specials: {self.specials!r} reserves the all-ones exponent, which leaves "
                       f"no normal values with exponent_bits={e}; use specials='none'")
    if self.bias is None:
      object.__setattr__(self, "bias", 2 ** (e - 1) - 1)
    b = self.bias
    if isinstance(b, bool) or not isinstance(b, int):
      raise TypeError(f"bias: expected an int, got {b!r}")
    # Every grid value must be an fp32 normal number, so that rounding is exact in fp32.
    if 1 - b - m < -126 or self.top_exponent - b >= 127:
      raise ValueError(f"bias: the grid of e{e}m{m} with bias {b} leaves fp32's normal range")

  @property
  def bits(self) -> int:
    return 1 + self.exponent_bits + self.mantissa_bits

  @property
  def name(self) -> str:
    e, m = self.exponent_bits, self.mantissa_bits
    std = 2 ** (e - 1) - 1
    bias = "" if self.bias == std else f"_b{self.bias}"
    return f"e{e}m{m}{bias}" + ("" if self.specials == "none" else f"_{self.specials}")

  @property
  def top_exponent(self) -> int:
    """The largest exponent field holding a finite normal value."""
    all_ones = 2 ** self.exponent_bits - 1
    if self.specials == "ieee" or (self.specials == "fn" and self.mantissa_bits == 0):
      return all_ones - 1
    return all_ones

  def values(self) -> np.ndarray:
    """The non-negative finite values, sorted, float64 — the closed form (module docstring)."""
    e, m, b = self.exponent_bits, self.mantissa_bits, self.bias
    k = np.arange(2 ** m, dtype=np.float64)
    out = [k * 2.0 ** (1 - b - m)]
    for exp in range(1, self.top_exponent + 1):
      binade = (2 ** m + k) * 2.0 ** (exp - b - m)
      if self.specials == "fn" and exp == 2 ** e - 1:
        binade = binade[:-1]  # the all-ones code is NaN
      out.append(binade)
    return np.concatenate(out)

  @property
  def max_value(self) -> float:
    """The largest finite value."""
    return float(self.values()[-1])

  @property
  def min_normal(self) -> float:
    return 2.0 ** (1 - self.bias)

  def grid(self) -> np.ndarray:
    """Every finite value, negative ones included (zero once), sorted, float64."""
    pos = self.values()
    return np.concatenate([-pos[:0:-1], pos])

  def decode_table(self) -> np.ndarray:
    """The value of every bit pattern `sign | exponent | mantissa` (2^bits entries, float64;
    inf/NaN where `specials` puts them) — the decoder of the uint8-coded storage."""
    e, m, b = self.exponent_bits, self.mantissa_bits, self.bias
    codes = np.arange(2 ** self.bits)
    sign = np.where(codes >> (e + m) & 1, -1.0, 1.0)
    exp = (codes >> m) & (2 ** e - 1)
    k = (codes & (2 ** m - 1)).astype(np.float64)
    mag = np.where(exp == 0, k * 2.0 ** (1 - b - m), (2 ** m + k) * 2.0 ** (exp - b - m))
    all_ones = exp == 2 ** e - 1
    if self.specials == "ieee":
      mag = np.where(all_ones, np.where(k == 0, np.inf, np.nan), mag)
    elif self.specials == "fn":
      mag = np.where(all_ones & (k == 2 ** m - 1), np.nan, mag)
    return sign * mag

  def round_to_grid(self, x: jax.Array) -> jax.Array:
    """Nearest grid value of fp32 `x`, ties to the even mantissa, saturating at ±max_value."""
    x = jnp.clip(x.astype(jnp.float32), -self.max_value, self.max_value)
    a = jnp.abs(x)
    _, ex = jnp.frexp(a)  # a = f · 2^ex, f in [0.5, 1): floor(log2 a) = ex - 1
    exp = jnp.maximum(ex - 1, 1 - self.bias)  # subnormals share the smallest normal's spacing
    step = jnp.ldexp(jnp.float32(1.0), exp - self.mantissa_bits)
    return jnp.copysign(jnp.round(a / step) * step, x)

  def encode(self, q: jax.Array) -> jax.Array:
    """Bit patterns (uint8) of grid values `q` (fp32, on the grid); +0 for zero."""
    e, m, b = self.exponent_bits, self.mantissa_bits, self.bias
    a = jnp.abs(q)
    _, ex = jnp.frexp(a)
    sub = a < self.min_normal
    exp_field = jnp.where(sub, 0, ex - 1 + b)
    step = jnp.ldexp(jnp.float32(1.0), jnp.where(sub, 1 - b, ex - 1) - m)
    k = (a / step).astype(jnp.int32) - jnp.where(sub, 0, 2 ** m)
    sign = (q < 0).astype(jnp.int32)
    return ((sign << (e + m)) | (exp_field << m) | k).astype(jnp.uint8)


Format = IntFormat | FloatFormat


@dataclasses.dataclass(frozen=True)
class FloatSearch:
  """A `bits`-bit float whose split and bias (as a clipping ratio) are searched per tensor."""

  bits: int
  clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 3 <= self.bits <= 8:
      raise ValueError(f"bits: expected an int in [3, 8], got {self.bits!r}")
    r = self.clip_ratios
    if (not isinstance(r, tuple) or not r
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1
                   for a in r)):
      raise ValueError(f"clip_ratios: expected a non-empty tuple of numbers in (0, 1], got {r!r}")

  @property
  def name(self) -> str:
    return f"fp{self.bits}"

  def candidates(self) -> tuple[FloatFormat, ...]:
    """Every split e + m = bits - 1 (e >= 1) at its standard bias (module docstring)."""
    out = []
    for e in range(1, self.bits):
      m = self.bits - 1 - e
      specials = "none"
      if self.bits == 8 and (e, m) == (4, 3):
        specials = "fn"
      elif self.bits == 8 and (e, m) == (5, 2):
        specials = "ieee"
      out.append(FloatFormat(e, m, specials=specials))
    return tuple(out)


# The formats by name. "fp8"/"fp6"/"fp4" search their split and bias per tensor.
FORMATS: dict[str, IntFormat | FloatFormat | FloatSearch] = {
    "int8": IntFormat(8),
    "int4": IntFormat(4),
    "fp8_e4m3": FloatFormat(4, 3, specials="fn"),
    "fp8_e5m2": FloatFormat(5, 2, specials="ieee"),
    "fp4_e2m1": FloatFormat(2, 1, specials="none"),
    "fp8": FloatSearch(8),
    "fp6": FloatSearch(6),
    "fp4": FloatSearch(4),
}

# Activation formats of the W8A8 path (per-token dynamic scale).
ACT_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2")


def get_format(fmt: Any, *, arg: str = "format") -> IntFormat | FloatFormat | FloatSearch:
  """A format from its name (`FORMATS`) or a format object; ValueError naming `arg` otherwise."""
  if isinstance(fmt, (IntFormat, FloatFormat, FloatSearch)):
    return fmt
  if isinstance(fmt, str) and fmt in FORMATS:
    return FORMATS[fmt]
  raise ValueError(f"{arg}: unknown format {fmt!r}; expected one of {sorted(FORMATS)} or an "
                   f"IntFormat / FloatFormat / FloatSearch")


def native_dtype(fmt: Format) -> Any | None:
  """The JAX float8 dtype whose values are exactly `fmt`'s grid, or None."""
  if isinstance(fmt, FloatFormat):
    if (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials) == (4, 3, 7, "fn"):
      return jnp.float8_e4m3fn
    if (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials) == (5, 2, 15, "ieee"):
      return jnp.float8_e5m2
  return None


def channel_scale(w: jax.Array, fmt: Format, group_size: int, clip_ratio: float | jax.Array = 1.0
                  ) -> jax.Array:
  """The fp32 scale `[in / group_size, out]` of `w [in, out]`: `clip_ratio · absmax / max_value`
  over each group of `group_size` input rows and each output column; 1 where a group is all zero
  (its codes are then all zero: exact). The error bounds of the module docstring assume the scale
  is an fp32 normal number (absmax above ~1e-38 · max_value), as for any real weight."""
  n_in, n_out = w.shape
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)).reshape(n_in // group_size, group_size, n_out),
                   axis=1)
  scale = clip_ratio * absmax / fmt.max_value
  return jnp.where(absmax > 0, scale, 1.0).astype(jnp.float32)


def fake_quantize(w: jax.Array, fmt: Format, group_size: int, clip_ratio: float | jax.Array = 1.0
                  ) -> tuple[jax.Array, jax.Array]:
  """(grid values `q [in, out]`, scale `[G, out]`) of round-to-nearest; `w ≈ q · scale`."""
  scale = channel_scale(w, fmt, group_size, clip_ratio)
  full = jnp.repeat(scale, group_size, axis=0)
  return fmt.round_to_grid(w.astype(jnp.float32) / full), scale


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The chosen format and clipping ratio, its error and every candidate's
  (`(format name, clip ratio) -> error`), the error being the weight MSE or, with calibration
  inputs, the mean squared output error `||X W - X Ŵ||² / (N · out)`."""

  format: FloatFormat
  clip_ratio: float
  error: float
  errors: dict[tuple[str, float], float]


@jax.jit
def _output_mse(w, w_hat, x):
  d = w.astype(jnp.float32) - w_hat
  if x is None:
    return jnp.mean(d * d)
  r = x.astype(jnp.float32) @ d
  return jnp.mean(r * r)


@functools.lru_cache(maxsize=64)
def _search_error(fmt: FloatFormat, group_size: int):
  """The jitted error of one candidate split (the clipping ratio traced), built once per
  (format, group size)."""
  @jax.jit
  def error(w, x, alpha):
    q, scale = fake_quantize(w, fmt, group_size, alpha)
    return _output_mse(w, q * jnp.repeat(scale, group_size, axis=0), x)
  return error


def search_float_format(w: jax.Array, search: FloatSearch, *, group_size: int | None = None,
                        x: jax.Array | None = None) -> SearchResult:
  """The (split, bias) of `search.bits`-bit float minimising the quantization error of
  `w [in, out]` (weight MSE, or the output MSE on calibration inputs `x [N, in]`); exhaustive over
  `search.candidates()` × `search.clip_ratios` (module docstring). Ties go to the earlier
  candidate (fewer exponent bits, larger clip ratio)."""
  w = jnp.asarray(w)
  g = w.shape[0] if group_size is None else group_size
  errors = {}
  best = None
  for fmt in search.candidates():
    err_fn = _search_error(fmt, g)
    for alpha in search.clip_ratios:
      err = float(err_fn(w, x, jnp.float32(alpha)))
      errors[(fmt.name, float(alpha))] = err
      if best is None or err < best[2]:
        best = (fmt, float(alpha), err)
  if not math.isfinite(best[2]):
    raise ValueError("w: the quantization error is not finite (non-finite weights or inputs?)")
  return SearchResult(best[0], best[1], best[2], errors)
