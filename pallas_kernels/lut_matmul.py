"""Lookup-table dequant-matmul: y = x @ W with W[k, n] = lut[n, idx[k, n]], idx stored in b bits.

The matmul of a non-uniformly quantized weight (SqueezeLLM, Kim et al. 2023, Sec. 4: one
codebook of 2^b centroids per output channel): the weight is never stored in floating point,
only its b-bit centroid indices and the table `lut [N, 2^b]`. This file holds the packing layout
(one definition, used by `jaxinf.quant.squeeze`), the XLA form and both Pallas forms.

Packing (`pack_indices`, `PACKINGS`): the indices of one output channel are cut, along the
contraction axis K, into groups of P consecutive rows whose P * b bits fill whole bytes: b = 4
packs P = 2 indices in 1 byte, b = 3 packs P = 8 indices in 3 bytes (true 3-bit storage), b = 2
packs P = 4 in 1 byte. Inside a group, index r (row k = g P + r) occupies bits [r b, (r + 1) b) of
the group's little-endian bit string, and byte j of that string is `codes[j, g, n]`:
`codes` is uint8 `[bytes per group, ceil(K / P), N]` (K padded with index 0 to a multiple of P;
the padded rows meet zero activations, so they add nothing).

Phases: row k = g P + r belongs to phase r. Splitting the contraction by phase,
  y = sum_r x[:, r::P] @ W[r::P, :],
lets a kernel unpack phase r of a tile of groups with one shift and mask of the group's word
(no interleaving of unpacked rows, which Triton and Mosaic cannot do cheaply); the activations
are rearranged once per call to `[P, M, K / P]` (a copy of x, small next to W when decoding).
The dequantization is a select chain over the 2^b table rows (w = lut[c] where idx == c): no
gather, which neither Triton nor Mosaic lowers for a [tile] index array.

Forms (`impl`, see `dispatch.resolve_impl`):
* "reference": `reference.lut_matmul`, bit by bit as the layout above reads.
* "xla": unpack all indices, gather the table, one dot (dequantize-then-dot).
* "pallas_gpu" (Triton-shaped): one program per (block_m rows, block_n columns), a
  `fori_loop` over K in steps of block_k rows, an fp32 accumulator in registers.
* "pallas_tpu" (Mosaic): grid (M / tpu_block_m, N / tpu_block_n, K / tpu_block_k), the last
  axis "arbitrary" with the fp32 accumulator in VMEM scratch, the first two "parallel".
Both Pallas forms live in this one file (they share the unpacking and the select chain).

Operands of the dot are x's dtype (fp32 asks for HIGHEST precision; bf16 feeds the tensor cores
with the dequantized tile rounded to bf16), accumulation fp32, output in x's dtype. Tile sizes are
checked before tracing: each must divide its (padded) dimension; M alone is padded (activations).
On hardware, the GPU form needs power-of-two tiles with block_k / P >= 16 and block_m, block_n
>= 16 (Triton's dot), the TPU form lane-dense tiles (block_n and block_k / P multiples of 128,
block_m of 8); the interpreters accept smaller ones, which the tests use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, reference

# bits -> (indices per group P, bytes per group): P * bits = 8 * bytes, the smallest whole bytes.
PACKINGS = {2: (4, 1), 3: (8, 3), 4: (2, 1)}
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class LutBlocks:
  """Static tile sizes. GPU form: `block_m` activation rows and `block_n` output columns per
  program, `block_k` contraction rows per loop step (a multiple of the packing group P). TPU form:
  the same three as `tpu_block_*` (one grid step each). A tile larger than its dimension means
  one tile; otherwise it must divide the dimension (K padded to a multiple of P; M is padded)."""
  block_m: int = 16
  block_n: int = 64
  block_k: int = 128
  tpu_block_m: int = 128
  tpu_block_n: int = 128
  tpu_block_k: int = 1024


def fit_blocks(in_features: int, out_features: int, bits: int,
               blocks: LutBlocks = LutBlocks()) -> LutBlocks:
  """`blocks` with each N and K tile lowered to the largest size that tiles the weight: for N
  the largest divisor of N not above the request, for K the largest multiple of P dividing the
  padded K. (Hardware-friendly sizes are the caller's choice; this only makes the shapes fit.)"""
  groups = PACKINGS[bits][0]
  k_pad = packed_rows(in_features, bits) * groups

  def fit(requested: int, dim: int, unit: int) -> int:
    size = max(unit, min(requested, dim) // unit * unit)
    while dim % size:
      size -= unit
    return size

  return dataclasses.replace(
      blocks, block_n=fit(blocks.block_n, out_features, 1),
      block_k=fit(blocks.block_k, k_pad, groups),
      tpu_block_n=fit(blocks.tpu_block_n, out_features, 1),
      tpu_block_k=fit(blocks.tpu_block_k, k_pad, groups))


def packed_rows(in_features: int, bits: int) -> int:
  """Groups along K: ceil(K / P)."""
  return -(-in_features // PACKINGS[bits][0])


def check_bits(bits) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACKINGS:
    raise ValueError(f"bits must be one of {tuple(PACKINGS)}, got {bits!r}")


def pack_indices(idx: jax.Array, bits: int) -> jax.Array:
  """`idx` int `[K, N]` in [0, 2^bits) -> `codes` uint8 `[bytes, ceil(K / P), N]` (module doc)."""
  check_bits(bits)
  groups, nbytes = PACKINGS[bits]
  k = idx.shape[0]
  idx = dispatch.pad_axis(idx.astype(jnp.uint32), 0, packed_rows(k, bits) * groups)
  idx = rearrange(idx, "(g p) n -> p g n", p=groups)
  word = functools.reduce(jnp.bitwise_or, [idx[r] << (bits * r) for r in range(groups)])
  return jnp.stack([(word >> (8 * j)) & 0xFF for j in range(nbytes)]).astype(jnp.uint8)


def _words(codes) -> jax.Array:
  """The groups' bit strings as int32 words (<= 24 bits): byte j shifted by 8 j."""
  return functools.reduce(jnp.bitwise_or, [codes[j].astype(jnp.int32) << (8 * j)
                                           for j in range(codes.shape[0])])


def unpack_indices(codes: jax.Array, bits: int, in_features: int) -> jax.Array:
  """Inverse of `pack_indices`: int32 `[K, N]`."""
  check_bits(bits)
  groups = PACKINGS[bits][0]
  word = _words(codes)
  phases = jnp.stack([(word >> (bits * r)) & ((1 << bits) - 1) for r in range(groups)])
  return rearrange(phases, "p g n -> (g p) n")[:in_features]


def lookup(codes: jax.Array, lut: jax.Array, rows: jax.Array, cols: jax.Array,
           bits: int) -> jax.Array:
  """W[rows, cols] of the packed weight (fp32), reading only those entries' bytes."""
  groups = PACKINGS[bits][0]
  word = _words(codes[:, rows // groups, cols])
  idx = (word >> (bits * (rows % groups))) & ((1 << bits) - 1)
  return lut[cols, idx].astype(jnp.float32)


def dequantize(codes: jax.Array, lut: jax.Array, bits: int, in_features: int) -> jax.Array:
  """The fp32 weight `[K, N]`: W[k, n] = lut[n, idx[k, n]] (a gather)."""
  idx = unpack_indices(codes, bits, in_features)
  return jnp.take_along_axis(lut.astype(jnp.float32).T, idx, axis=0)


def _check(x, codes, lut, bits, in_features) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"x must be an array, got {type(x).__name__}")
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating array [..., K], got {x.dtype} of shape {x.shape}")
  check_bits(bits)
  if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
    raise ValueError(f"in_features must be a positive int, got {in_features!r}")
  if x.shape[-1] != in_features:
    raise ValueError(f"x must end in in_features={in_features}, got shape {tuple(x.shape)}")
  if not hasattr(codes, "dtype") or codes.dtype != jnp.uint8:
    raise TypeError(f"codes must be a uint8 array, got {getattr(codes, 'dtype', type(codes))}")
  dispatch.check_array("lut", lut, 2)
  n = lut.shape[0]
  dispatch.check_shape("lut", lut, (n, 1 << bits))
  dispatch.check_shape("codes", codes, (PACKINGS[bits][1], packed_rows(in_features, bits), n))


def _tiles(blocks: LutBlocks, impl: str, k_pad: int, n: int, groups: int) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) of the chosen form, clamped to one tile, checked to divide."""
  prefix = "tpu_" if impl == "pallas_tpu" else ""
  names = [f"{prefix}block_{a}" for a in "mnk"]
  dispatch.check_blocks(blocks, LutBlocks, names)
  bm, bn, bk = (getattr(blocks, name) for name in names)
  bn, bk = min(bn, n), min(bk, k_pad)
  if n % bn:
    raise ValueError(f"blocks.{names[1]}={bn} must divide the output features N={n} "
                     "(or be at least N)")
  if bk % groups or k_pad % bk:
    raise ValueError(f"blocks.{names[2]}={bk} must be a multiple of the packing group "
                     f"P={groups} and divide the padded in_features {k_pad} (or be at least it)")
  return bm, bn, bk


def lut_matmul(x: jax.Array, codes: jax.Array, lut: jax.Array, *, bits: int, in_features: int,
               impl: str = "auto", interpret: bool = False,
               blocks: LutBlocks = LutBlocks()) -> jax.Array:
  """y = x @ W, W[k, n] = lut[n, idx[k, n]], idx unpacked from `codes` (module docstring).

  Args:
    x: `[..., K]` float32 or bfloat16 (K = in_features).
    codes: uint8 `[bytes, ceil(K / P), N]` from `pack_indices`.
    lut: `[N, 2^bits]` centroids per output channel (any float dtype; read as fp32).
    bits: 2, 3 or 4.  in_features: K.
    impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu".
    interpret: run a Pallas form in its interpreter (CPU).
    blocks: `LutBlocks`, checked before tracing.
  Returns:
    `[..., N]` in x's dtype (fp32 accumulation).
  """
  _check(x, codes, lut, bits, in_features)
  impl = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  groups = PACKINGS[bits][0]
  k_pad, n = codes.shape[1] * groups, lut.shape[0]
  if impl.startswith("pallas"):
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
      raise TypeError(f"x must be float32 or bfloat16 for impl={impl!r}, got {x.dtype}")
    bm, bn, bk = _tiles(blocks, impl, k_pad, n, groups)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, in_features)
  if impl == "reference":
    y = _reference_jit(x2, codes, lut, bits=bits, in_features=in_features)
  elif impl == "xla":
    y = _lut_matmul_xla(x2, codes, lut, bits=bits, in_features=in_features)
  elif impl == "pallas_tpu":
    y = _lut_matmul_tpu(x2, codes, lut, bits=bits, block_m=bm, block_n=bn, block_k=bk,
                        interpret=interpret)
  else:
    y = _lut_matmul_gpu(x2, codes, lut, bits=bits, block_m=bm, block_n=bn, block_k=bk,
                        interpret=interpret)
  return y.reshape(*lead, n)


_reference_jit = jax.jit(reference.lut_matmul, static_argnames=("bits", "in_features"))


@functools.partial(jax.jit, static_argnames=("bits", "in_features"))
def _lut_matmul_xla(x, codes, lut, *, bits: int, in_features: int):
  w = dequantize(codes, lut, bits, in_features)
  cd = dispatch.compute_dtype(x.dtype)
  return dispatch.kernel_dot(x, w, cd).astype(x.dtype)


def _phases(x, k_pad: int, groups: int, m_pad: int):
  """x [M, K] -> [P, M', K / P]: phase r holds columns r, r + P, ... (module doc), zero-padded."""
  x = dispatch.pad_axis(dispatch.pad_axis(x, 1, k_pad), 0, m_pad)
  return rearrange(x, "m (g p) -> p m g", p=groups)


def _dequant_phase(word, r: int, bits: int, rows) -> jax.Array:
  """Phase r of a tile of group words `[G', bn]` dequantized by a select chain over `rows`
  (the 2^bits table rows, each `[1, bn]` fp32)."""
  idx = (word >> (bits * r)) & ((1 << bits) - 1)
  w = jnp.broadcast_to(rows[0], idx.shape)
  for c in range(1, len(rows)):
    w = jnp.where(idx == c, rows[c], w)
  return w


def _gpu_kernel(x_ref, codes_ref, lut_ref, o_ref, *, bits: int, block_g: int, steps: int):
  """One (block_m, block_n) output tile: a loop over K, phases unpacked by shift and mask."""
  groups, nbytes = PACKINGS[bits]
  cd = dispatch.compute_dtype(x_ref.dtype)
  rows = [lut_ref[pl.ds(c, 1), :].astype(jnp.float32) for c in range(1 << bits)]

  def body(i, acc):
    start = i * block_g
    word = functools.reduce(jnp.bitwise_or, [
        codes_ref[j, pl.ds(start, block_g), :].astype(jnp.int32) << (8 * j)
        for j in range(nbytes)])
    for r in range(groups):
      w = _dequant_phase(word, r, bits, rows)
      acc = acc + dispatch.kernel_dot(x_ref[r, :, pl.ds(start, block_g)], w, cd)
    return acc

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit,
                   static_argnames=("bits", "block_m", "block_n", "block_k", "interpret"))
def _lut_matmul_gpu(x, codes, lut, *, bits: int, block_m: int, block_n: int, block_k: int,
                    interpret: bool):
  groups, nbytes = PACKINGS[bits]
  m = x.shape[0]
  g_len, n = codes.shape[1], codes.shape[2]
  block_m = min(block_m, max(16, dispatch.next_power_of_2(m)))
  m_pad = dispatch.round_up(m, block_m)
  xp = _phases(x, g_len * groups, groups, m_pad)
  lut_t = lut.astype(jnp.float32).T  # [C, N]: a table row is a [1, block_n] load
  block_g = block_k // groups
  out = pl.pallas_call(
      functools.partial(_gpu_kernel, bits=bits, block_g=block_g, steps=g_len // block_g),
      grid=(m_pad // block_m, n // block_n),
      in_specs=[
          pl.BlockSpec((groups, block_m, g_len), lambda i, j: (0, i, 0)),
          pl.BlockSpec((nbytes, g_len, block_n), lambda i, j: (0, 0, j)),
          pl.BlockSpec((1 << bits, block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      compiler_params=dispatch.gpu_compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="lut_matmul",
  )(xp, codes, lut_t)
  return out[:m]


def _tpu_kernel(x_ref, codes_ref, lut_ref, o_ref, acc_ref, *, bits: int):
  """One (block_m, block_n) output tile at K step `program_id(2)`; fp32 accumulator in VMEM."""
  groups, nbytes = PACKINGS[bits]
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  cd = x_ref.dtype
  precision = lax.Precision.HIGHEST if cd == jnp.float32 else None
  rows = [lut_ref[pl.ds(c, 1), :] for c in range(1 << bits)]
  word = functools.reduce(jnp.bitwise_or, [codes_ref[j].astype(jnp.int32) << (8 * j)
                                           for j in range(nbytes)])
  acc = acc_ref[...]
  for r in range(groups):
    w = _dequant_phase(word, r, bits, rows).astype(cd)
    acc = acc + jnp.dot(x_ref[r], w, precision=precision, preferred_element_type=jnp.float32)
  acc_ref[...] = acc

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "block_m", "block_n", "block_k",
                                             "interpret", "detect_races"))
def _lut_matmul_tpu(x, codes, lut, *, bits: int, block_m: int, block_n: int, block_k: int,
                    interpret: bool, detect_races: bool = False):
  from jax.experimental.pallas import tpu as pltpu
  groups, nbytes = PACKINGS[bits]
  m = x.shape[0]
  g_len, n = codes.shape[1], codes.shape[2]
  block_m = min(block_m, dispatch.round_up(m, 8))
  m_pad = dispatch.round_up(m, block_m)
  xp = _phases(x, g_len * groups, groups, m_pad)
  lut_t = lut.astype(jnp.float32).T
  block_g = block_k // groups
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, bits=bits),
      grid=(m_pad // block_m, n // block_n, g_len // block_g),
      in_specs=[
          pl.BlockSpec((groups, block_m, block_g), lambda i, j, s: (0, i, s)),
          pl.BlockSpec((nbytes, block_g, block_n), lambda i, j, s: (0, s, j)),
          pl.BlockSpec((1 << bits, block_n), lambda i, j, s: (0, j)),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=dispatch.tpu_interpret_params(interpret, detect_races=detect_races),
      name="lut_matmul_tpu",
  )(xp, codes, lut_t)
  return out[:m]
