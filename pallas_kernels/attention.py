"""Softmax attention: causal or not, explicit scale, GQA, per-sequence key lengths, and a decode step.

Four implementations of one function (`reference.softmax_attention` is the spec):

* "xla": queries in chunks (`lax.map`), each chunk against every key with an exact softmax, so
  memory is O(chunk * Tk) instead of O(Tq * Tk); compute stays O(Tq * Tk).
* "pallas_gpu": FlashAttention-2 (Dao 2023, Algorithm 1): one program per (batch, head, query
  block), an online softmax over key blocks with fp32 running max / sum / accumulator, written for
  the Triton backend (and run by the Pallas interpreter on CPU).
* "pallas_tpu": the same algorithm for Mosaic TPU (`pallas_kernels.attention_tpu`): the key
  blocks on a sequential grid axis, the statistics in VMEM scratch (run by JAX's TPU interpret
  mode on CPU).
* "reference": the quadratic oracle.

Masks are expressed as one integer per query, `limit[b, i]`: query i sees keys s < limit[b, i].
That single number covers key lengths (limit <= kv_lengths[b]), causality
(limit <= q_offsets[b] + i + 1) and decoding against a cache, and lets the kernel stop its loop
over key blocks at the last visible block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import attention_tpu, dispatch, reference
from pallas_kernels.dispatch import SQUEEZED

# A large finite negative instead of -inf: exp(mask - mask) must not produce NaN for a row whose
# every key in a block is masked.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# KV layouts of `attention_step`'s cache: sequence-major (as `attention`) or head-major
LAYOUTS = ("bshd", "bhsd")
_LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
  """Static tile sizes, each clamped to the sequence for short inputs.

  * `block_q`/`block_k`: the GPU (Triton) kernel's tiles, powers of two >= 16 (the Triton dot's
    minimum). 128 x 128 by default: on an H200 (causal bf16, B 4, H 32, D 128, T = 4k/8k/16k) it
    ran 2.1-2.3x faster than 64 x 64 (2.73/9.33/35.8 ms against 5.76/20.9/81.2 ms).
  * `tpu_block_q`/`tpu_block_k`: the TPU (Mosaic) kernel's tiles; `tpu_block_q` a multiple of 8
    (16 for bf16: sublanes), `tpu_block_k` a multiple of 128 (lanes). 512 x 512 by default, the
    block sizes MaxText uses for splash attention on v5e/v6e (about 3 MiB of VMEM at D = 128,
    within the 16 MiB default scoped VMEM of v5e); not yet timed on a TPU here.
  * `xla_chunk`: queries per chunk in the XLA form.
  """
  block_q: int = 128
  block_k: int = 128
  xla_chunk: int = 256
  tpu_block_q: int = 512
  tpu_block_k: int = 512


def _check_blocks(blocks, impl: str, dtype) -> None:
  if not isinstance(blocks, AttentionBlocks):
    raise TypeError(f"blocks must be an AttentionBlocks, got {type(blocks).__name__}")
  if impl == "pallas_tpu":
    attention_tpu.check_tpu_blocks(blocks.tpu_block_q, blocks.tpu_block_k, dtype)
  elif impl == "pallas_gpu":
    for name in ("block_q", "block_k"):
      size = getattr(blocks, name)
      if (isinstance(size, bool) or not isinstance(size, int) or size < 16
          or size & (size - 1)):
        raise ValueError(f"blocks.{name} must be a power of two >= 16 (Triton tiles), "
                         f"got {size!r}")
  elif impl == "xla":
    chunk = blocks.xla_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
      raise ValueError(f"blocks.xla_chunk must be a positive int, got {chunk!r}")


def _check_scale(scale, dim: int) -> float:
  """The logit scale as a Python float (it is static to the kernels): a Python, numpy or JAX
  scalar whose value is known now, finite and > 0."""
  if scale is None:
    return float(dim ** -0.5)
  if isinstance(scale, bool) or (hasattr(scale, "dtype") and jnp.dtype(scale.dtype) == bool):
    raise TypeError("scale must be a real number, got a bool")
  if hasattr(scale, "shape") and tuple(scale.shape) != ():
    raise ValueError(f"scale must be a scalar (0-d), got shape {tuple(scale.shape)}")
  if not isinstance(scale, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f"scale must be a Python, numpy or JAX real scalar or None, got "
                    f"{type(scale).__name__}")
  value = dispatch.concrete_value(scale)
  if value is None:
    raise TypeError("scale must be known before tracing (a Python float or a concrete "
                    "single-device scalar): the kernels take it as a static constant")
  value = float(value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"scale must be finite and > 0, got {value}")
  return value


def _check(q, k, v, kv_lengths, q_offsets, scale, causal) -> float:
  """Every argument check, before tracing; returns the scale as a float."""
  dispatch.check_array("q", q, 4)
  dispatch.check_array("k", k, 4)
  dispatch.check_array("v", v, 4)
  dispatch.check_same_dtype(("q", "k", "v"), (q, k, v))
  batch, _, heads, dim = q.shape
  if k.shape[0] != batch or v.shape[0] != batch:
    raise ValueError(f"q, k, v must share the batch size, got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on [B, Tk, Hkv], got {k.shape} and {v.shape}")
  if k.shape[3] != dim:
    raise ValueError(f"q and k must share the head dim D, got {dim} and {k.shape[3]}")
  if k.shape[1] == 0 or q.shape[1] == 0:
    raise ValueError(f"q and k need at least one position, got Tq={q.shape[1]}, Tk={k.shape[1]}")
  if dim == 0 or heads == 0 or k.shape[2] == 0 or v.shape[3] == 0:
    raise ValueError(f"q, k, v need at least one head and one channel, got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(
        f"q: the number of query heads (q.shape[2]={heads}) must be a multiple of the number of "
        f"key/value heads (k.shape[2]={kv_heads}) for grouped-query attention")
  scale = _check_scale(scale, dim)
  if not isinstance(causal, bool):
    raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
  if causal and q.shape[1] != k.shape[1] and q_offsets is None:
    raise ValueError(
        f"q_offsets: causal attention with Tq={q.shape[1]} != Tk={k.shape[1]} needs q_offsets, "
        "the absolute position of each sequence's first query: zeros for top-left alignment, "
        "Tk - Tq for bottom-right, kv_lengths - Tq for the newest queries of a cache (or use "
        "attention_step)")
  if kv_lengths is not None:
    dispatch.check_lengths("kv_lengths", kv_lengths, batch)
    value = dispatch.concrete_value(kv_lengths)
    if value is not None and ((value < 0) | (value > k.shape[1])).any():
      raise ValueError(f"kv_lengths must lie in [0, Tk={k.shape[1]}], got {value.tolist()}")
  if q_offsets is not None:
    dispatch.check_lengths("q_offsets", q_offsets, batch)
    value = dispatch.concrete_value(q_offsets)
    if value is not None and (value < 0).any():
      raise ValueError(f"q_offsets must be >= 0, got {value.tolist()}")
  return scale


def _visible_limits(batch, tq, tk, causal, kv_lengths, q_offsets) -> jax.Array:
  """limit[b, i]: query i of sequence b sees keys s < limit[b, i]. [B, Tq] int32."""
  lengths = (jnp.full((batch,), tk, jnp.int32) if kv_lengths is None
             else jnp.clip(kv_lengths.astype(jnp.int32), 0, tk))  # clip only guards traced input
  limits = jnp.broadcast_to(lengths[:, None], (batch, tq))
  if causal:
    offsets = jnp.zeros((batch,), jnp.int32) if q_offsets is None else q_offsets.astype(jnp.int32)
    limits = jnp.minimum(limits, offsets[:, None] + jnp.arange(tq, dtype=jnp.int32)[None] + 1)
  return jnp.maximum(limits, 0)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    q_offsets: jax.Array | None = None,
    impl: str = "auto",
    interpret: bool = False,
    blocks: AttentionBlocks = AttentionBlocks(),
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Softmax attention (Vaswani et al. 2017, eq. 1; FlashAttention-2, Dao 2023, Algorithm 1).

  o_i = sum_s softmax_s(scale * q_i . k_s) v_s over keys s < kv_lengths[b] and, if causal,
  s <= q_offsets[b] + i. Queries that see no key output zeros. Softmax statistics and the
  accumulator are fp32 whatever the input dtype.

  Causal alignment is explicit: with Tq == Tk query i sits at position q_offsets[b] + i with
  default offset 0 (the usual causal mask; for ragged prefills with kv_lengths as well). With
  Tq != Tk there is no default (top-left and bottom-right differ, and a silent choice was a
  source of wrong results): causal attention then requires `q_offsets` — zeros for top-left,
  Tk - Tq for bottom-right (FlashAttention >= 2.1), kv_lengths - Tq for the newest queries of a
  cache (what `attention_step` passes).

  Args:
    q: [B, Tq, H, D].  k: [B, Tk, Hkv, D], v: [B, Tk, Hkv, Dv], H % Hkv == 0 (GQA: query head h
      reads key head h // (H // Hkv), as `jax.nn.dot_product_attention`).
    causal: mask keys after each query's absolute position.
    scale: logit scale, default D ** -0.5: a Python, numpy or JAX scalar known before tracing
      (it is a static constant of the kernels), finite and > 0.
    kv_lengths: [B] int in [0, Tk], valid keys per sequence (default Tk).
    q_offsets: [B] int >= 0, absolute position of query 0 (default 0 when Tq == Tk; required
      for causal attention with Tq != Tk, see above). Ignored when not causal.
    impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu".
    interpret: run the Pallas kernel in an interpreter (needed on CPU; "pallas_tpu" runs in
      JAX's TPU interpret mode).
    blocks: tile sizes (`AttentionBlocks`).
    return_lse: also return the log-sum-exp of each query's scaled logits over its visible keys
      (what split-KV decoding and ring attention merge partial results with).
  Returns:
    [B, Tq, H, Dv] in q's dtype; with `return_lse`, (that, lse [B, H, Tq] fp32), where
    lse = log sum_s exp(scale * q_i . k_s) and -inf for a query that sees no key.
  """
  scale = _check(q, k, v, kv_lengths, q_offsets, scale, causal)
  return _attention_checked(q, k, v, causal, scale, kv_lengths, q_offsets, impl, interpret,
                            blocks, return_lse, "bshd")


def _attention_checked(q, k, v, causal, scale, kv_lengths, q_offsets, impl, interpret, blocks,
                       return_lse, layout):
  """`attention` after `_check`, with k/v in `layout` ("bshd" or head-major "bhsd")."""
  if not isinstance(return_lse, bool):
    raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
  impl = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  _check_blocks(blocks, impl, q.dtype)
  head_major = layout == "bhsd"
  tk = k.shape[2 if head_major else 1]
  if impl == "reference":
    if head_major:  # the spec reads [B, Tk, Hkv, D]
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return _reference_jit(q, k, v, causal=causal, scale=scale, kv_lengths=kv_lengths,
                          q_offsets=q_offsets, return_lse=return_lse)
  if impl == "pallas_tpu":
    batch = q.shape[0]
    lengths = jnp.full((batch,), tk, jnp.int32) if kv_lengths is None else kv_lengths
    offsets = (q_offsets if causal and q_offsets is not None
               else jnp.zeros((batch,), jnp.int32))
    return attention_tpu.attention_tpu(
        q, k, v, lengths, offsets, causal=causal, scale=scale, block_q=blocks.tpu_block_q,
        block_k=blocks.tpu_block_k, return_lse=return_lse, interpret=interpret,
        kv_head_major=head_major)
  limits = _visible_limits(q.shape[0], q.shape[1], tk, causal, kv_lengths, q_offsets)
  if impl == "xla":
    out, lse = _attention_xla(q, k, v, limits, scale=scale, chunk=blocks.xla_chunk,
                              head_major=head_major)
    return (out, lse) if return_lse else out
  return _attention_pallas(q, k, v, limits, scale=scale, block_q=blocks.block_q,
                           block_k=blocks.block_k, interpret=interpret, return_lse=return_lse,
                           head_major=head_major)


def attention_step(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    blocks: AttentionBlocks = AttentionBlocks(),
    return_lse: bool = False,
    layout: str = "bshd",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Decode step: the K newest queries against a KV cache (K = 1 for decoding, K > 1 to verify K
  draft tokens in speculative decoding).

  The caller has already written the new keys/values at positions [lengths - K, lengths) of the
  cache; query j sits at position lengths - K + j and sees cache slots s <= lengths - K + j.

  Args:
    q: [B, K, H, D].
    k_cache, v_cache: [B, S, Hkv, D] and [B, S, Hkv, Dv] (layout "bshd", as `attention`'s k/v),
      or head-major [B, Hkv, S, D] and [B, Hkv, S, Dv] (layout "bhsd": each head's slots
      contiguous, so the XLA form's products read the cache without a transpose; the
      transformer's KV cache).
    lengths: [B] int, valid cache length per sequence including the K new tokens (K <= lengths
      <= S).
    scale, impl, interpret, blocks, return_lse: as `attention`.
    layout: "bshd" or "bhsd", the caches' layout (above).
  Returns:
    [B, K, H, Dv] in q's dtype (and the log-sum-exp [B, H, K] with `return_lse`).
  """
  # The cache's own names here: `attention` would report k_cache as "k" and lengths as
  # "kv_lengths".
  if not isinstance(layout, str) or layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
  dispatch.check_array("q", q, 4)
  dispatch.check_array("k_cache", k_cache, 4)
  dispatch.check_array("v_cache", v_cache, 4)
  named = "[B, S, Hkv]" if layout == "bshd" else "[B, Hkv, S]"
  if k_cache.shape[:3] != v_cache.shape[:3]:
    raise ValueError(f"k_cache and v_cache must agree on {named}, got {k_cache.shape} and "
                     f"{v_cache.shape}")
  if k_cache.shape[0] != q.shape[0] or k_cache.shape[3] != q.shape[3]:
    raise ValueError(f"k_cache must share q's batch size B and head dim D, got {k_cache.shape} "
                     f"and q {q.shape}")
  size, kv_axis = (k_cache.shape[1], 2) if layout == "bshd" else (k_cache.shape[2], 1)
  if k_cache.shape[kv_axis] == 0 or q.shape[2] % k_cache.shape[kv_axis]:
    raise ValueError(
        f"q: the number of query heads (q.shape[2]={q.shape[2]}) must be a multiple of the "
        f"number of key/value heads (k_cache.shape[{kv_axis}]={k_cache.shape[kv_axis]}) for "
        "grouped-query attention")
  dispatch.check_lengths("lengths", lengths, q.shape[0])
  value = dispatch.concrete_value(lengths)
  if value is not None and (value < q.shape[1]).any():
    raise ValueError(
        f"lengths must count the {q.shape[1]} new tokens already in the cache, got {value.tolist()}")
  if value is not None and (value > size).any():
    raise ValueError(f"lengths must be at most the cache size S={size}, got {value.tolist()}")
  offsets = lengths.astype(jnp.int32) - q.shape[1]
  if layout == "bshd":
    return attention(q, k_cache, v_cache, causal=True, scale=scale, kv_lengths=lengths,
                     q_offsets=offsets, impl=impl, interpret=interpret, blocks=blocks,
                     return_lse=return_lse)
  # `attention`'s checks on the [B, S, Hkv, D] view of the head-major caches (shapes only)
  as_bshd = lambda x: jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1], x.shape[3]),
                                           x.dtype)
  scale = _check(q, as_bshd(k_cache), as_bshd(v_cache), lengths, offsets, scale, True)
  return _attention_checked(q, k_cache, v_cache, True, scale, lengths, offsets, impl, interpret,
                            blocks, return_lse, layout)


_reference_jit = jax.jit(reference.softmax_attention,
                         static_argnames=("causal", "scale", "return_lse"))


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "head_major"))
def _attention_xla(q, k, v, limits, *, scale: float, chunk: int, head_major: bool = False):
  batch, tq, heads, _ = q.shape
  tk, kv_heads = (k.shape[2], k.shape[1]) if head_major else (k.shape[1], k.shape[2])
  kv = "bksd" if head_major else "bskd"  # head-major: plain batched products over (b, k)
  chunk = min(chunk, tq)
  padded = dispatch.round_up(tq, chunk)
  # Padded queries get limit 0: they see nothing and are sliced off below.
  q = dispatch.pad_axis(q, 1, padded)
  limits = dispatch.pad_axis(limits, 1, padded)
  q_chunks = rearrange(q.astype(jnp.float32), "b (n c) (hk g) d -> n b hk g c d", c=chunk,
                       hk=kv_heads)
  limit_chunks = rearrange(limits, "b (n c) -> n b c", c=chunk)
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  key_pos = jnp.arange(tk)

  def one_chunk(args):
    q_c, limit_c = args  # [B, Hkv, G, C, D], [B, C]
    logits = scale * jnp.einsum(f"bkgcd,{kv}->bkgcs", q_c, k32)
    visible = key_pos[None, None, None, None, :] < limit_c[:, None, None, :, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum(f"bkgcs,{kv}->bkgcd", weights, v32)
    lse = (row_max + jnp.log(denom))[..., 0]  # log(0) = -inf: the query sees no key
    return out / jnp.where(denom > 0, denom, 1.0), lse

  out, lse = lax.map(one_chunk, (q_chunks, limit_chunks))
  out = rearrange(out, "n b hk g c d -> b (n c) (hk g) d")[:, :tq]
  lse = rearrange(lse, "n b hk g c -> b (hk g) (n c)")[:, :, :tq]
  return out.astype(q.dtype), lse


def _flash_kernel(q_ref, k_ref, v_ref, limit_ref, o_ref, *lse_ref, scale: float, block_k: int):
  """One (batch, head, query block): FlashAttention-2's online softmax over key blocks."""
  block_q = q_ref.shape[0]
  cd = dispatch.compute_dtype(q_ref.dtype)
  q = q_ref[...]
  limit = limit_ref[...]  # [block_q] int32
  # Stop at the last key block any query of this block can see (causal and length skipping).
  num_blocks = lax.div(jnp.max(limit) + (block_k - 1), block_k)

  def body(j, carry):
    acc, row_max, row_sum = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    # Base-2 logits (log2(e) folded into the scale): exp2 is the GPU's native exponential.
    logits = dispatch.kernel_dot(q, k.T, cd) * (scale * _LOG2_E)
    key_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    visible = key_pos < limit[:, None]
    logits = jnp.where(visible, logits, _MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    correction = jnp.exp2(row_max - new_max)
    # The where keeps fully-masked rows at exactly zero weight (exp(mask - mask) would be 1).
    probs = jnp.where(visible, jnp.exp2(logits - new_max[:, None]), 0.0)
    row_sum = correction * row_sum + jnp.sum(probs, axis=1)
    acc = correction[:, None] * acc + dispatch.kernel_dot(probs, v, cd)
    return acc, new_max, row_sum

  acc = jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32)
  row_max = jnp.full((block_q,), -jnp.inf, jnp.float32)
  row_sum = jnp.zeros((block_q,), jnp.float32)
  acc, row_max, row_sum = lax.fori_loop(0, num_blocks, body, (acc, row_max, row_sum))
  # Rows that saw no key have acc == 0 and row_sum == 0: divide by 1 to output zeros.
  o_ref[...] = (acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
  if lse_ref:
    # Base-2 statistics back to natural log: lse = (max + log2 sum) * ln 2; -inf if no key.
    seen = row_sum > 0
    lse_ref[0][...] = jnp.where(
        seen, (row_max + jnp.log2(jnp.where(seen, row_sum, 1.0))) / _LOG2_E, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret",
                                             "return_lse", "head_major"))
def _attention_pallas(q, k, v, limits, *, scale: float, block_q: int, block_k: int,
                      interpret: bool, return_lse: bool = False, head_major: bool = False):
  batch, tq, heads, dim = q.shape
  t_axis = 2 if head_major else 1  # k/v: [B, Hkv, Tk, D] or [B, Tk, Hkv, D]
  tk, kv_heads, dim_v = k.shape[t_axis], k.shape[3 - t_axis], v.shape[3]
  groups = heads // kv_heads
  block_q, block_k = dispatch.tile(block_q, tq), dispatch.tile(block_k, tk)
  tq_pad, tk_pad = dispatch.round_up(tq, block_q), dispatch.round_up(tk, block_k)
  # Triton tiles must be powers of two: zero-padding D leaves q.k unchanged, and padded value
  # columns are sliced off. Padded keys are never visible (limit <= Tk); padded queries have
  # limit 0.
  d_pad, dv_pad = max(16, dispatch.next_power_of_2(dim)), max(16, dispatch.next_power_of_2(dim_v))
  q = dispatch.pad_axis(dispatch.pad_axis(q, 1, tq_pad), 3, d_pad)
  k = dispatch.pad_axis(dispatch.pad_axis(k, t_axis, tk_pad), 3, d_pad)
  v = dispatch.pad_axis(dispatch.pad_axis(v, t_axis, tk_pad), 3, dv_pad)
  limits = dispatch.pad_axis(limits, 1, tq_pad)
  kernel = functools.partial(_flash_kernel, scale=scale, block_k=block_k)

  def kv_spec(width):  # the whole of one KV head's keys (values), either layout
    if head_major:
      return pl.BlockSpec((SQUEEZED, SQUEEZED, tk_pad, width),
                          lambda b, h, i: (b, h // groups, 0, 0))
    return pl.BlockSpec((SQUEEZED, tk_pad, SQUEEZED, width), lambda b, h, i: (b, 0, h // groups, 0))

  out_specs = [pl.BlockSpec((SQUEEZED, block_q, SQUEEZED, dv_pad), lambda b, h, i: (b, i, h, 0))]
  out_shape = [jax.ShapeDtypeStruct((batch, tq_pad, heads, dv_pad), q.dtype)]
  if return_lse:
    out_specs.append(pl.BlockSpec((SQUEEZED, SQUEEZED, block_q), lambda b, h, i: (b, h, i)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, tq_pad), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid=(batch, heads, tq_pad // block_q),
      in_specs=[
          pl.BlockSpec((SQUEEZED, block_q, SQUEEZED, d_pad), lambda b, h, i: (b, i, h, 0)),
          kv_spec(d_pad),
          kv_spec(dv_pad),
          pl.BlockSpec((SQUEEZED, block_q), lambda b, h, i: (b, i)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=dispatch.gpu_compiler_params(num_warps=4 if d_pad <= 64 else 8, num_stages=2),
      interpret=interpret,
      name="flash_attention",
  )(q, k, v, limits)
  out = outs[0][:, :tq, :, :dim_v]
  return (out, outs[1][:, :, :tq]) if return_lse else out
