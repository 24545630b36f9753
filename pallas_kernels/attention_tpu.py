"""Softmax attention's TPU (Mosaic) form: a FlashAttention-2 forward with fp32 statistics in VMEM.

Algorithm (FlashAttention-2, Dao 2023, Algorithm 1), per (batch, query head, query block i): for
each key block j, S = scale * Q_i K_j^T (masked), m' = max(m, rowmax S), P = exp(S - m'),
l <- exp(m - m') l + rowsum P, acc <- exp(m - m') acc + P V_j, m <- m'; at the end
O_i = acc / l and LSE_i = m + log l.

Mapping onto Pallas TPU:
* grid = (B, H, Tq' / block_q, Tk' / block_k): the first three axes are "parallel" (independent
  programs), the last is "arbitrary" (sequential on one core): it walks the key blocks of one
  query block in order, which is the inner loop of Algorithm 1.
* blocks: q, o [block_q, D'] and k, v [block_k, D'] of head-major [B, H, T', D'] copies made at
  the boundary (positions on sublanes, features on lanes; block_q a multiple of 8 (16 for bf16),
  block_k a multiple of 128 because it is the lane dim of S, D' the full padded head dim). GQA:
  query head h reads key head h // (H / Hkv) through the k/v index map (K/V are re-read once
  per query head of a group).
* scratch: m and l as [block_q, 128] fp32 (all lanes equal, the TPU's layout for a per-row
  scalar) and acc [block_q, Dv'] fp32, in VMEM across the key axis: reset at key block 0,
  normalised and written at the last key block.
* masks come from two scalar-prefetch vectors in SMEM, kv_lengths [B] and q_offsets [B]: query i
  sees keys s < kv_lengths[b] and, if causal, s <= q_offsets[b] + i. A key block no query of the
  block can see is skipped (`pl.when`), and its index map is clamped to the last visible block,
  so the pipeline issues no DMA for it either.
Matmuls take the input dtype (bf16 operands for bf16 inputs, P rounded to bf16 for P V, as the
GPU form) with fp32 accumulation; fp32 inputs use the highest precision.

Padding: Tq and Tk to multiples of the blocks (padded keys are never visible because
kv_lengths <= Tk; padded queries are sliced off); D and Dv to the next power of two below 128 and
to a multiple of 128 above (zeros: q.k unchanged, extra value columns sliced off).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.dispatch import SQUEEZED

# A large finite negative instead of -inf, so exp(mask - max) is 0 and never NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def lane_dim(d: int) -> int:
  """A head dim padded for TPU lanes: the next power of two (>= 8) below 128, else a multiple."""
  return max(8, dispatch.next_power_of_2(d)) if d <= 128 else dispatch.round_up(d, 128)


def sublanes(dtype) -> int:
  """Rows of one native TPU tile: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 if jnp.dtype(dtype).itemsize == 4 else 16


def check_tpu_blocks(block_q, block_k, dtype) -> None:
  """Named errors, before tracing, for tiles that do not tile a TPU and dtypes the form lacks."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"impl='pallas_tpu' supports float32 and bfloat16 q/k/v, got {dtype}")
  rows = sublanes(dtype)
  if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q <= 0 or block_q % rows:
    raise ValueError(f"blocks.tpu_block_q must be a positive multiple of {rows} (TPU sublanes for "
                     f"{jnp.dtype(dtype).name}), got {block_q!r}")
  if (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k <= 0
      or block_k % _LANES):
    raise ValueError(f"blocks.tpu_block_k must be a positive multiple of {_LANES} (TPU lanes: it "
                     f"is the last dim of the logits tile), got {block_k!r}")


def _last_visible_block(lengths_ref, offsets_ref, b, i, *, causal: bool, block_q: int,
                        block_k: int, tq: int):
  """Index of the last key block any real query of query block i of row b can see (-1: none)."""
  limit = lengths_ref[b]
  if causal:
    last_query = jnp.minimum((i + 1) * block_q, tq)  # exclusive, real queries only
    limit = jnp.minimum(limit, offsets_ref[b] + last_query)
  return lax.div(limit + (block_k - 1), block_k) - 1


def _kernel(lengths_ref, offsets_ref, q_ref, k_ref, v_ref, *refs, scale: float, causal: bool,
            block_q: int, block_k: int, tq: int, with_lse: bool):
  """One (batch, head, query block, key block): Algorithm 1's inner loop body."""
  if with_lse:
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  else:
    (o_ref, m_ref, l_ref, acc_ref), lse_ref = refs, None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  f32 = jnp.float32

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  last = _last_visible_block(lengths_ref, offsets_ref, b, i, causal=causal, block_q=block_q,
                             block_k=block_k, tq=tq)

  @pl.when(j <= last)
  def _():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == f32 else None
    s = lax.dot_general(q, k, _NT, precision=precision, preferred_element_type=f32) * scale
    key = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    visible = key < lengths_ref[b]
    if causal:
      query = offsets_ref[b] + i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
      visible = visible & (key <= query)
    s = jnp.where(visible, s, _MASK_VALUE)
    m_prev, l_prev = m_ref[...], l_ref[...]  # [block_q, 128], lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    # The where keeps rows with no visible key in this block at exactly zero weight.
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=f32)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_ref[...]
    seen = l > 0
    # Rows that saw no key: acc == 0 and l == 0; output zeros and lse = -inf.
    o_ref[...] = (acc_ref[...] / jnp.where(seen, l, 1.0)[:, :1]).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_k",
                                             "return_lse", "interpret", "detect_races",
                                             "kv_head_major"))
def attention_tpu(q, k, v, kv_lengths, q_offsets, *, causal: bool, scale: float, block_q: int,
                  block_k: int, return_lse: bool = False, interpret: bool = False,
                  detect_races: bool = False, kv_head_major: bool = False):
  """q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv], kv_lengths / q_offsets [B] int ->
  o [B, Tq, H, Dv] in q's dtype (and lse [B, H, Tq] fp32 with `return_lse`). Blocks and dtypes
  are checked by the caller (`check_tpu_blocks`); kv_lengths must lie in [0, Tk].
  `kv_head_major`: k, v come head-major, [B, Hkv, Tk, D] (the layout the kernel reads)."""
  from jax.experimental.pallas import tpu as pltpu

  batch, tq, heads, dim = q.shape
  t_axis = 2 if kv_head_major else 1
  tk, kv_heads, dim_v = k.shape[t_axis], k.shape[3 - t_axis], v.shape[3]
  groups = heads // kv_heads
  block_q = min(block_q, dispatch.round_up(tq, sublanes(q.dtype)))
  block_k = min(block_k, dispatch.round_up(tk, _LANES))
  tq_pad, tk_pad = dispatch.round_up(tq, block_q), dispatch.round_up(tk, block_k)
  d_pad, dv_pad = lane_dim(dim), lane_dim(dim_v)
  head_major = lambda x, t, d: rearrange(
      dispatch.pad_axis(dispatch.pad_axis(x, 1, t), 3, d), "b t h d -> b h t d")
  q = head_major(q, tq_pad, d_pad)
  if kv_head_major:
    k = dispatch.pad_axis(dispatch.pad_axis(k, 2, tk_pad), 3, d_pad)
    v = dispatch.pad_axis(dispatch.pad_axis(v, 2, tk_pad), 3, dv_pad)
  else:
    k, v = head_major(k, tk_pad, d_pad), head_major(v, tk_pad, dv_pad)
  lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, tk)  # the clip only guards traced input
  offsets = q_offsets.astype(jnp.int32)
  last = functools.partial(_last_visible_block, causal=causal, block_q=block_q, block_k=block_k,
                           tq=tq)

  def kv_index(b, h, i, j, lengths_ref, offsets_ref):
    # Skipped blocks map onto the last visible one: same block index, so no new DMA.
    # lax.div, not //: floor division lowers through `sign`, which Mosaic lowers per TPU
    # generation (and so not on a host without one); h >= 0 makes the two agree.
    return (b, lax.div(h, groups), jnp.maximum(jnp.minimum(j, last(lengths_ref, offsets_ref, b, i)), 0),
            0)

  q_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, block_q, d_pad), lambda b, h, i, j, *_: (b, h, i, 0))
  o_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, block_q, dv_pad),
                        lambda b, h, i, j, *_: (b, h, i, 0))
  out_specs = [o_spec]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, tq_pad, dv_pad), q.dtype)]
  if return_lse:
    out_specs.append(pl.BlockSpec((SQUEEZED, SQUEEZED, block_q, _LANES),
                                  lambda b, h, i, j, *_: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, tq_pad, _LANES), jnp.float32))
  kernel = functools.partial(_kernel, scale=scale, causal=causal, block_q=block_q,
                             block_k=block_k, tq=tq, with_lse=return_lse)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, heads, tq_pad // block_q, tk_pad // block_k),
          in_specs=[q_spec, pl.BlockSpec((SQUEEZED, SQUEEZED, block_k, d_pad), kv_index),
                    pl.BlockSpec((SQUEEZED, SQUEEZED, block_k, dv_pad), kv_index)],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, _LANES), jnp.float32),
                          pltpu.VMEM((block_q, _LANES), jnp.float32),
                          pltpu.VMEM((block_q, dv_pad), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=dispatch.tpu_interpret_params(interpret, detect_races=detect_races),
      name="flash_attention_tpu",
  )(lengths, offsets, q, k, v)
  out = rearrange(outs[0], "b h t d -> b t h d")[:, :tq, :, :dim_v]
  if return_lse:
    return out, outs[1][:, :, :tq, 0]
  return out
