"""`QArray`: a weight stored in a low-bit format with per-channel or per-group scales.

A `[in, out]` weight `W` is stored as codes on a format's grid (`jaxinf.quant.formats`) and an fp32
scale `s [G, out]` per output column and group of `group_size` input rows (`G = in / group_size`;
per-channel is one group, `G = 1`): `W[i, o] ≈ s[i // group_size, o] · q[i, o]`.

Storage (what `nbytes` counts):

| format | data | bytes per weight |
|---|---|---|
| int8 (and int5–int7) | `int8 [in, out]` | 1 |
| int4 (and int2, int3) | `uint8 [ceil(in/2), out]`, two's-complement nibbles, two per byte | 1/2 |
| fp8 E4M3 / E5M2 | `float8_e4m3fn` / `float8_e5m2` `[in, out]` (JAX's dtypes) | 1 |
| other 5–8-bit floats | `uint8 [in, out]` bit patterns, decoded by a 2^bits-entry table | 1 |
| fp4 E2M1 and other ≤4-bit floats | `uint8 [ceil(in/2), out]` bit patterns, two per byte | 1/2 |

plus the fp32 scales, `4 · G · out` bytes (fp32 rather than bf16: the scale of a group is
applied to a sum of up to `group_size` products, and 8 mantissa bits would add a relative error of
up to 2^-9 to every output, more than int8's own; the cost is 4 / group_size bytes per weight).
`scale_dtype="float16"` stores them as fp16 instead, as llama.cpp's Q4_0 / Q8_0 blocks do
(2 / group_size bytes per weight: 1/16 of a byte at groups of 32, a tenth of an int4 weight's
bytes): 11 significant bits, a relative error of at most 2^-12 per scale, far below int4's or
int8's rounding; codes are rounded against the fp32 scale, the stored scale is its fp16 rounding.
A scale that fp16 cannot hold (above 65504, or rounding to zero below 6e-8) is a ValueError
naming `scale_dtype`; one below 6e-5 is kept as an fp16 subnormal (fewer significant bits, an
absolute error of at most 3e-8), as llama.cpp keeps it.
Packing (`pack_nibbles`): row `2i` of the codes goes to the low nibble of packed row `i`, row
`2i + 1` to the high nibble; an odd `in` is padded with one zero nibble (counted in `nbytes`). JAX's
own `int4` dtype is not packed in host memory (one byte per value on CPU), hence our packing.

The product `x @ W` (`QArray.__rmatmul__`, the XLA path) never materialises the scaled weight:

- per channel: `(x @ q) · s` — the dot over the grid values (int codes or float8 converted to the
  compute dtype inside the dot), the scale applied to its `[..., out]` result;
- per group: `x` reshaped to `[..., G, g]`, `q` to `[G, g, out]`, contracted per group by einsum to
  `[..., G, out]`, each group's partial sum scaled by its `s[G, out]` and summed over groups;
- with `act_format` (W8A8): each row ("token") of `x` is quantized too, with its own dynamic scale
  `s_x = max|x_row| / max_value` (1 for an all-zero row), `x ≈ s_x · q_x`, and
  `y = s_x · ((q_x @ q) · s)`: with int8 activations and integer weights the dot is an integer dot
  accumulated in int32 (exact for `in` below 2^31 / 127² ≈ 133k), otherwise an fp32 dot of the
  grid values.

Kernel layout (`kernel="cpu_ffi"`, integer formats only, `jaxinf.quant.cpu_kernel`): the codes in
panels of 16 output columns (`cpu_kernel.kernel_layout`: per 64 bytes 16 columns x 4 int8 codes, or
x 8 int2–int4 nibbles), so that one vector load feeds 16 output lanes. The panels pad `out` to a
multiple of 16 and `in` to a multiple of 4 (int8) or 8 (int4) with zero codes; `nbytes` counts the
padding. `codes()`, `dequantize()` and the XLA path undo the layout. `x @ w` runs the kernel
(fp32 activations, or int8 ones with `act_format="int8"`) at every row count, prefill too: XLA's
form of a kernel-layout product first undoes the panels and is the slower one
(`cpu_kernel.use_kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.quant import cpu_kernel
from jaxinf.quant.base import QuantizedWeight
from jaxinf.quant.formats import (
  ACT_FORMATS,
  FORMATS,
  FloatSearch,
  Format,
  IntFormat,
  fake_quantize,
  get_format,
  native_dtype,
  search_float_format,
)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 codes `[n, ...]` (each < 16) -> uint8 `[ceil(n / 2), ...]`: row 2i in the low nibble
  of row i, row 2i + 1 in the high nibble; an odd n is padded with a zero nibble."""
  codes = jnp.asarray(codes, jnp.uint8)
  if codes.shape[0] % 2:
    codes = jnp.concatenate([codes, jnp.zeros((1,) + codes.shape[1:], jnp.uint8)])
  return codes[0::2] | (codes[1::2] << 4)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
  """The inverse of `pack_nibbles`: uint8 `[ceil(n / 2), ...]` -> the n uint8 codes `[n, ...]`."""
  packed = jnp.asarray(packed, jnp.uint8)
  both = jnp.stack([packed & 0xF, packed >> 4], axis=1)
  return both.reshape((-1,) + packed.shape[1:])[:n]


def storage_kind(fmt: Format) -> str:
  """How `fmt`'s codes are stored: "int8", "int_packed", "native" (a float8 dtype),
  "float_packed" (≤4-bit bit patterns, two per byte) or "float_code" (5–8-bit bit patterns)."""
  if isinstance(fmt, IntFormat):
    return "int_packed" if fmt.bits <= 4 else "int8"
  if native_dtype(fmt) is not None:
    return "native"
  return "float_packed" if fmt.bits <= 4 else "float_code"


def _check_float_dtype(dtype: Any, arg: str) -> str:
  try:
    dt = np.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{arg}: expected a floating dtype, got {dtype!r}") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{arg}: expected a floating dtype, got {dt.name}")
  return dt.name


def _matmul_input(x: Any, shape: tuple[int, int], dtype: Any) -> tuple[jax.Array, Any, int]:
  """(x as an array, the product's dtype, rows of x) for `x @ W`, W `[in, out]`; ValueError
  naming `x` unless its last axis is `in`."""
  n_in, n_out = shape
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != n_in:
    raise ValueError(f"x: expected [..., {n_in}] for a [{n_in}, {n_out}] weight, got shape "
                     f"{tuple(x.shape)}")
  return x, jnp.result_type(x.dtype, dtype), int(np.prod(x.shape[:-1]))


@dataclasses.dataclass(frozen=True, eq=False)
class QArray(QuantizedWeight):
  """A low-bit `[in, out]` weight (module docstring). Children: `data` (the stored codes) and
  `scale` (fp32 or fp16 `[G, out]`); static: the format (after any search), the logical shape, the group
  size, the compute dtype, the activation format (None: weight-only), the clipping ratio the
  scale was computed with (1: absmax) and the kernel (None: the XLA path; "cpu_ffi": the CPU
  kernel and its layout, module docstring)."""

  data: jax.Array
  scale: jax.Array
  fmt: Format
  logical_shape: tuple[int, int]
  group_size: int
  compute_dtype: str = "float32"
  act_format: str | None = None
  clip_ratio: float = 1.0
  kernel: str | None = None

  # numpy's `ndarray @ QArray` defers to `QArray.__rmatmul__` too.
  __array_ufunc__ = None

  @property
  def shape(self) -> tuple[int, int]:
    return self.logical_shape

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.compute_dtype)

  @property
  def num_groups(self) -> int:
    return self.logical_shape[0] // self.group_size

  def astype(self, dtype: Any) -> QArray:
    return dataclasses.replace(self, compute_dtype=_check_float_dtype(dtype, "dtype"))

  def codes(self) -> jax.Array:
    """The integer codes `[in, out]` as int8 (integer formats only)."""
    if self.kernel is not None:
      return cpu_kernel.kernel_codes(self.data, self.fmt.bits, *self.logical_shape)
    return self._codes(self.data)

  def _codes(self, data: jax.Array) -> jax.Array:
    """Integer codes from stored `data` whose first axis is the (packed) input axis."""
    kind = storage_kind(self.fmt)
    if kind == "int8":
      return data
    if kind == "int_packed":
      nib = unpack_nibbles(data, self.logical_shape[0]).astype(jnp.int8)
      return (nib ^ 8) - 8  # sign-extend the 4-bit two's complement
    raise TypeError(f"codes: a {self.fmt.name} QArray holds float codes; use grid_values()")

  def grid_values(self, dtype: Any = jnp.float32) -> jax.Array:
    """The stored values on the format's grid `q [in, out]` (the weight is `q · scale`)."""
    if self.kernel is not None:  # integer formats: the grid values are the codes
      return self.codes().astype(dtype)
    return self._grid(self.data, dtype)

  def _grid(self, data: jax.Array, dtype: Any) -> jax.Array:
    """Grid values from stored `data` whose first axis is the (packed) input axis."""
    kind = storage_kind(self.fmt)
    if kind in ("int8", "int_packed"):
      return self._codes(data).astype(dtype)
    if kind == "native":
      return data.astype(dtype)
    table = jnp.asarray(self.fmt.decode_table(), jnp.float32)
    if kind == "float_packed":
      data = unpack_nibbles(data, self.logical_shape[0])
    return table[data.astype(jnp.int32)].astype(dtype)

  def take_columns(self, ids: jax.Array) -> jax.Array:
    """`W[:, ids]` as `[*ids.shape, in]` in the compute dtype, decoding only those columns: the
    rows of an embedding table stored transposed (`QEmbedding.lookup`). In the kernel layout a
    column's codes are one row of `data` (int8) or one lane of its panel (packed); in the XLA
    layout they are gathered along its axis 1."""
    ids = jnp.asarray(ids)
    if self.kernel is not None:
      q = cpu_kernel.kernel_columns(self.data, self.fmt.bits, self.logical_shape[0], ids)
      q = q.astype(jnp.float32)  # [in, *ids.shape]
    else:
      q = self._grid(jnp.take(self.data, ids, axis=1), jnp.float32)  # [in, *ids.shape]
    scale = jnp.take(self.scale, ids, axis=1)  # [G, *ids.shape]
    q = q.reshape((self.num_groups, self.group_size) + ids.shape) * scale[:, None]
    return jnp.moveaxis(q.reshape((self.logical_shape[0],) + ids.shape), 0, -1).astype(self.dtype)

  def dequantize(self) -> jax.Array:
    n_in, n_out = self.logical_shape
    q = self.grid_values().reshape(self.num_groups, self.group_size, n_out)
    return (q * self.scale[:, None, :]).reshape(n_in, n_out).astype(self.dtype)

  def with_kernel(self, kernel: str | None) -> QArray:
    """The same weight stored for `kernel` (None: the XLA layout; "cpu_ffi": the CPU kernel's,
    integer formats with weight-only or int8 activations only). Host-side: not under jit."""
    kernel = cpu_kernel.check_kernel(kernel)
    if kernel == self.kernel:
      return self
    if kernel is not None:
      check_kernel_format(kernel, self.fmt, self.act_format)
      data = cpu_kernel.kernel_layout(self.codes(), self.fmt.bits)
    else:
      data = from_grid(self.codes(), self.scale, self.fmt, group_size=self.group_size).data
    return dataclasses.replace(self, data=data, kernel=kernel)

  def with_scale_dtype(self, scale_dtype: str) -> QArray:
    """The same codes with the scales stored in `scale_dtype` (module docstring). Host-side."""
    return dataclasses.replace(self, scale=store_scale(self.scale, scale_dtype))

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.logical_shape
    x, out_dtype, rows = _matmul_input(x, self.logical_shape, self.dtype)
    if self.kernel == "cpu_ffi" and cpu_kernel.use_kernel(rows, codes=True):
      cpu_kernel.check_backend("kernel")
      y = cpu_kernel.lowbit_matmul(
          x.reshape(rows, n_in), self.data, self.scale, k=n_in, group_size=self.group_size,
          act_int8=self.act_format is not None)
      return y.reshape(x.shape[:-1] + (n_out,)).astype(out_dtype)
    if self.act_format is not None:
      return self._matmul_quantized_input(x).astype(out_dtype)
    q = self.grid_values(out_dtype)
    x = x.astype(out_dtype)
    scale = self.scale.astype(out_dtype)
    if self.num_groups == 1:
      return (x @ q) * scale[0]
    xg = x.reshape(x.shape[:-1] + (self.num_groups, self.group_size))
    qg = q.reshape(self.num_groups, self.group_size, n_out)
    return (jnp.einsum("...Gg,Ggo->...Go", xg, qg) * scale).sum(axis=-2)

  def _matmul_quantized_input(self, x: jax.Array) -> jax.Array:
    """W8A8: `s_x · ((q_x @ q) · s)` in fp32 (module docstring)."""
    act = FORMATS[self.act_format]
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    sx = jnp.where(absmax > 0, absmax / act.max_value, 1.0)
    qx = act.round_to_grid(xf / sx)
    if isinstance(act, IntFormat) and isinstance(self.fmt, IntFormat):
      qx, qw, acc = qx.astype(jnp.int8), self.codes(), jnp.int32
    else:
      qw, acc = self.grid_values(), jnp.float32
    if self.num_groups == 1:
      y = jnp.matmul(qx, qw, preferred_element_type=acc).astype(jnp.float32) * self.scale[0]
    else:
      xg = qx.reshape(qx.shape[:-1] + (self.num_groups, self.group_size))
      qg = qw.reshape(self.num_groups, self.group_size, self.logical_shape[1])
      part = jnp.einsum("...Gg,Ggo->...Go", xg, qg, preferred_element_type=acc)
      y = (part.astype(jnp.float32) * self.scale).sum(axis=-2)
    return y * sx


jax.tree_util.register_dataclass(
    QArray, data_fields=["data", "scale"],
    meta_fields=["fmt", "logical_shape", "group_size", "compute_dtype", "act_format",
                 "clip_ratio", "kernel"])


@dataclasses.dataclass(frozen=True, eq=False)
class QEmbedding(QuantizedWeight):
  """A low-bit embedding table `E [vocab, dim]`, stored as the `QArray` of its transpose
  `head = E.T [dim, vocab]`: one scale per token (or per group of `dim` entries of a token). (Or
  as a `KernelWeight`: the floating table kept for the CPU kernel, `ptq.kernel_params`.)

  Both uses of a table read it as stored: `lookup(ids)` (the embedding) decodes only the
  looked-up tokens' codes (`QArray.take_columns`), and `table.T` is `head`, so a tied output head
  written `h @ table.T` is the QArray's product (with `kernel="cpu_ffi"` the hand-written CPU
  kernel, whose layout `[vocab, dim]` is the floating table's own). The logical `shape` is the
  table's, so a model's parameter check accepts it in the table's place.
  """

  head: QArray | KernelWeight

  __array_ufunc__ = None

  @property
  def shape(self) -> tuple[int, int]:
    return self.head.logical_shape[::-1]

  @property
  def dtype(self) -> np.dtype:
    return self.head.dtype

  @property
  def T(self) -> QArray | KernelWeight:
    return self.head

  def astype(self, dtype: Any) -> QEmbedding:
    return QEmbedding(self.head.astype(dtype))

  def dequantize(self) -> jax.Array:
    return self.head.dequantize().T

  def lookup(self, ids: jax.Array) -> jax.Array:
    """The embeddings `E[ids]`, `[*ids.shape, dim]`, in the compute dtype."""
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"ids: expected integer token ids, got dtype {ids.dtype}")
    return self.head.take_columns(ids)

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    """`x @ E` for `x [..., vocab]` (a soft lookup): the product with the decoded table."""
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if x.ndim < 1 or x.shape[-1] != self.shape[0]:
      raise ValueError(f"x: expected [..., {self.shape[0]}] for a {list(self.shape)} table, got "
                       f"shape {tuple(x.shape)}")
    out_dtype = jnp.result_type(x.dtype, self.dtype)
    return x.astype(out_dtype) @ self.dequantize().astype(out_dtype)


jax.tree_util.register_dataclass(QEmbedding, data_fields=["head"], meta_fields=[])


@dataclasses.dataclass(frozen=True, eq=False)
class KernelWeight(QuantizedWeight):
  """A floating `[in, out]` weight, not quantized, stored in the hand-written CPU kernel's fp32
  panels (`data` float32 `[16 ceil(out / 16), in]`, `cpu_kernel.f32_panels`; `n_out` the true
  column count): at decode batch sizes its streaming product reads the weights faster than
  XLA:CPU's fp32 dot does, and up to 8 rows of x share one pass over them. `x @ w` with up to
  `cpu_kernel.MAX_ROWS` rows of x runs the kernel; more rows take XLA's dot of the transpose.
  It has a QArray's reading interface (`logical_shape`, `take_columns`), so a `QEmbedding` can
  hold a floating table in this form too (the tied head `[dim, vocab]`)."""

  data: jax.Array
  n_out: int
  compute_dtype: str = "float32"

  __array_ufunc__ = None

  @property
  def logical_shape(self) -> tuple[int, int]:
    return (int(self.data.shape[1]), int(self.n_out))

  @property
  def shape(self) -> tuple[int, int]:
    return self.logical_shape

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.compute_dtype)

  @property
  def kernel(self) -> str:
    return "cpu_ffi"

  def astype(self, dtype: Any) -> KernelWeight:
    return dataclasses.replace(self, compute_dtype=_check_float_dtype(dtype, "dtype"))

  def dequantize(self) -> jax.Array:
    return cpu_kernel.f32_weights(self.data, self.n_out).astype(self.dtype)

  def take_columns(self, ids: jax.Array) -> jax.Array:
    """`W[:, ids]` as `[*ids.shape, in]`: lane `id % 16` of panel `id // 16` at every k."""
    return cpu_kernel.f32_columns(self.data, ids).astype(self.dtype)

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.logical_shape
    x, out_dtype, rows = _matmul_input(x, self.logical_shape, self.dtype)
    if cpu_kernel.use_kernel(rows, codes=False):
      cpu_kernel.check_backend("kernel")
      y = cpu_kernel.lowbit_matmul(x.reshape(rows, n_in), self.data,
                                   jnp.ones((1, n_out), jnp.float32), k=n_in, group_size=n_in)
      return y.reshape(x.shape[:-1] + (n_out,)).astype(out_dtype)
    return (x.astype(out_dtype) @ self.dequantize().astype(out_dtype)).astype(out_dtype)


jax.tree_util.register_dataclass(KernelWeight, data_fields=["data"],
                                 meta_fields=["n_out", "compute_dtype"])


def matmul_many(x: jax.Array, weights: list[QuantizedWeight]) -> list[jax.Array] | None:
  """`[x @ w for w in weights]` in one call of the CPU kernel (`cpu_kernel.lowbit_matmul_many`)
  when the weights can share it: every one a kernel-layout QArray of one format, group size and
  activation format, or every one a `KernelWeight`, with the same input width and compute dtype,
  and `x`'s row count one that the kernel takes. The results equal the separate products bit for
  bit. None when they cannot share a call (the caller then multiplies them one by one)."""
  if not 2 <= len(weights) <= cpu_kernel.MAX_FUSED or not isinstance(
      weights[0], (QArray, KernelWeight)) or not all(
      type(w) is type(weights[0]) for w in weights):
    return None
  first = weights[0]
  n_in = first.logical_shape[0]
  if any(w.logical_shape[0] != n_in or w.dtype != first.dtype for w in weights):
    return None
  codes = isinstance(first, QArray)  # else fp32 panels (KernelWeight)
  same = not codes or all(
      w.kernel == "cpu_ffi" and w.fmt.bits == first.fmt.bits and w.group_size == first.group_size
      and w.act_format == first.act_format and w.data.dtype == first.data.dtype for w in weights)
  x, out_dtype, rows = _matmul_input(x, first.logical_shape, first.dtype)
  if not same or not cpu_kernel.use_kernel(rows, codes=codes):
    return None
  cpu_kernel.check_backend("kernel")
  if codes:
    pairs = [(w.data, w.scale) for w in weights]
    ys = cpu_kernel.lowbit_matmul_many(x.reshape(rows, n_in), pairs, k=n_in,
                                       group_size=first.group_size,
                                       act_int8=first.act_format is not None)
  else:
    pairs = [(w.data, jnp.ones((1, w.n_out), jnp.float32)) for w in weights]
    ys = cpu_kernel.lowbit_matmul_many(x.reshape(rows, n_in), pairs, k=n_in, group_size=n_in)
  return [y.reshape(x.shape[:-1] + (w.logical_shape[1],)).astype(out_dtype)
          for y, w in zip(ys, weights)]


def kernel_weight(w: Any, arg: str = "w") -> KernelWeight:
  """A floating `w [in, out]` stored for the CPU kernel, unquantized (`KernelWeight`). Host-side."""
  w = check_weight(w, arg)
  cpu_kernel.check_backend("kernel")
  return KernelWeight(cpu_kernel.f32_panels(w), int(w.shape[1]))


def check_kernel_format(kernel: str | None, fmt: Format, act_format: str | None) -> None:
  """TypeError / ValueError unless `kernel` can run `fmt` weights with `act_format` activations
  (the CPU kernel: integer formats, weight-only or int8 activations, on the CPU backend)."""
  if kernel is None:
    return
  if not isinstance(fmt, IntFormat):
    raise TypeError(f"kernel: {kernel!r} takes integer weight formats (int2-int8), got "
                    f"{getattr(fmt, 'name', fmt)}")
  if act_format not in (None, "int8"):
    raise ValueError(f"kernel: {kernel!r} takes act_format None or 'int8', got {act_format!r}")
  cpu_kernel.check_backend("kernel")


SCALE_DTYPES = ("float32", "float16")


def check_scale_dtype(scale_dtype: Any) -> str:
  if not isinstance(scale_dtype, str) or scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {scale_dtype!r}")
  return scale_dtype


def store_scale(scale: jax.Array, scale_dtype: str) -> jax.Array:
  """`scale` as stored in `scale_dtype` (module docstring); ValueError naming `scale_dtype` for
  an fp16 scale out of range."""
  scale_dtype = check_scale_dtype(scale_dtype)
  if scale_dtype == "float32" or isinstance(scale, jax.core.Tracer):
    return jnp.asarray(scale).astype(scale_dtype)
  s = np.asarray(scale, np.float32)
  with np.errstate(over="ignore"):  # an overflow is the error below
    s16 = s.astype(np.float16)
  bad = ~np.isfinite(s16) | ((s16 == 0) & (s != 0))
  if bad.any():
    raise ValueError(f"scale_dtype: float16 cannot hold the scale {float(s[bad].flat[0]):.3g} "
                     f"(its range is 6e-8 .. 65504); use 'float32'")
  return jnp.asarray(s16)


def from_grid(q: jax.Array, scale: jax.Array, fmt: Format, *, group_size: int,
              compute_dtype: str = "float32", act_format: str | None = None,
              clip_ratio: float = 1.0, kernel: str | None = None,
              scale_dtype: str = "float32") -> QArray:
  """A `QArray` from grid values `q [in, out]` (exactly on `fmt`'s grid) and `scale [G, out]`,
  stored in `kernel`'s layout with `scale_dtype` scales (module docstring)."""
  kind = storage_kind(fmt)
  if kernel is not None:
    check_kernel_format(cpu_kernel.check_kernel(kernel), fmt, act_format)
    data = cpu_kernel.kernel_layout(q.astype(jnp.int8), fmt.bits)
  elif kind in ("int8", "int_packed"):
    codes = q.astype(jnp.int8)
    data = codes if kind == "int8" else pack_nibbles(codes.astype(jnp.uint8) & 0xF)
  elif kind == "native":
    data = q.astype(native_dtype(fmt))
  else:
    data = fmt.encode(q)
    if kind == "float_packed":
      data = pack_nibbles(data)
  return QArray(data, store_scale(scale, scale_dtype), fmt, tuple(int(d) for d in q.shape),
                int(group_size), compute_dtype, act_format, float(clip_ratio), kernel)


def check_weight(w: Any, arg: str = "w") -> jax.Array:
  """`w` as a concrete floating 2-D array `[in, out]`; TypeError/ValueError naming `arg`."""
  if isinstance(w, QuantizedWeight):
    raise TypeError(f"{arg}: already a quantized weight ({type(w).__name__})")
  if isinstance(w, jax.core.Tracer):
    raise TypeError(f"{arg}: quantization runs on concrete weights, outside jit (got a tracer)")
  if not hasattr(w, "dtype") or not hasattr(w, "shape"):
    raise TypeError(f"{arg}: expected a floating [in, out] array, got {type(w).__name__}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{arg}: expected a floating [in, out] array, got dtype {np.dtype(w.dtype)}")
  if w.ndim != 2:
    raise ValueError(f"{arg}: expected a 2-D [in, out] matmul weight, got shape {tuple(w.shape)}")
  if not bool(np.isfinite(np.asarray(w, np.float32)).all()):
    raise ValueError(f"{arg}: has non-finite values")
  return jnp.asarray(w)


def check_group_size(group_size: Any, n_in: int) -> int:
  """`group_size` (None: per channel, the whole input dim) as an int dividing `n_in`."""
  if group_size is None:
    return n_in
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size: expected None or a positive int, got {group_size!r}")
  if n_in % group_size:
    raise ValueError(f"group_size: {group_size} does not divide the input dimension {n_in}")
  return group_size


def check_act_format(act_format: Any) -> str | None:
  if act_format is not None and act_format not in ACT_FORMATS:
    raise ValueError(f"act_format: expected None or one of {ACT_FORMATS}, got {act_format!r}")
  return act_format


def check_calibration(x: Any, n_in: int, arg: str = "calibration") -> jax.Array | None:
  """Calibration inputs `[N, in]` (floating, finite) or None."""
  if x is None:
    return None
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{arg}: expected a floating [N, {n_in}] array, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}")
  if x.ndim != 2 or x.shape[1] != n_in or x.shape[0] < 1:
    raise ValueError(f"{arg}: expected shape [N, {n_in}], got {tuple(x.shape)}")
  if not bool(np.isfinite(np.asarray(x, np.float32)).all()):
    raise ValueError(f"{arg}: has non-finite values")
  return jnp.asarray(x)


_fake_quantize = jax.jit(fake_quantize, static_argnums=(1, 2))


def quantize(w: Any, format: Any, *, group_size: int | None = None, act_format: str | None = None,
             compute_dtype: Any = "float32", calibration: Any = None,
             clip_ratio: float = 1.0, kernel: str | None = None,
             scale_dtype: str = "float32") -> QArray:
  """Round-to-nearest quantization of a floating `w [in, out]` (the models' layout) to `format`
  (a name of `jaxinf.quant.formats.FORMATS` or a format object), with one scale per output column
  (`group_size=None`) or per group of `group_size` input rows. A searched float format ("fp4",
  "fp6", "fp8") picks its split and clipping ratio here (`search_float_format`, on `calibration
  [N, in]` when given, else on the weight MSE); `clip_ratio` scales the absmax scale of a fixed
  format (< 1 saturates the largest weights). `act_format` ("int8", "fp8_e4m3", "fp8_e5m2")
  quantizes the matmul input per token too (W8A8). `kernel` ("cpu_ffi", integer formats) stores
  the weight for the hand-written CPU kernel (`jaxinf.quant.cpu_kernel`). `scale_dtype`
  ("float32", "float16") stores the scales (module docstring). Host-side: not for use under
  jit."""
  w = check_weight(w)
  scale_dtype = check_scale_dtype(scale_dtype)
  fmt = get_format(format)
  g = check_group_size(group_size, w.shape[0])
  act_format = check_act_format(act_format)
  kernel = cpu_kernel.check_kernel(kernel)
  compute_dtype = _check_float_dtype(compute_dtype, "compute_dtype")
  x = check_calibration(calibration, w.shape[0])
  if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) \
      or not 0 < clip_ratio <= 1:
    raise ValueError(f"clip_ratio: expected a number in (0, 1], got {clip_ratio!r}")
  if isinstance(fmt, FloatSearch):
    found = search_float_format(w, fmt, group_size=g, x=x)
    fmt, clip_ratio = found.format, found.clip_ratio
  check_kernel_format(kernel, fmt, act_format)
  q, scale = _fake_quantize(w, fmt, g, jnp.float32(clip_ratio))
  return from_grid(q, scale, fmt, group_size=g, compute_dtype=compute_dtype,
                   act_format=act_format, clip_ratio=clip_ratio, kernel=kernel,
                   scale_dtype=scale_dtype)


def quantize_embedding(table: Any, format: Any, **options: Any) -> QEmbedding:
  """Round-to-nearest quantization of an embedding table `[vocab, dim]` (the models' layout,
  e.g. `nnx.Embed.embedding`) as a `QEmbedding`: `quantize` of its transpose, with the same
  `options` (`group_size` divides `dim`; `act_format` applies to a tied head's input)."""
  table = check_weight(table, "table")
  return QEmbedding(quantize(table.T, format, **options))


def dequantize(w: QuantizedWeight) -> jax.Array:
  """The floating weight of a quantized one (`w.dequantize()`)."""
  if not isinstance(w, QuantizedWeight):
    raise TypeError(f"w: expected a QuantizedWeight, got {type(w).__name__}")
  return w.dequantize()

