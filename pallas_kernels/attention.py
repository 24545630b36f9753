"""Softmax attention: causal or not, explicit scale, GQA, per-sequence key lengths, and a decode step.

Three implementations of one function (`reference.softmax_attention` is the spec):

* "xla": queries in chunks (`lax.map`), each chunk against every key with an exact softmax, so
  memory is O(chunk * Tk) instead of O(Tq * Tk); compute stays O(Tq * Tk).
* "pallas": FlashAttention-2 (Dao 2023, Algorithm 1): one program per (batch, head, query
  block), an online softmax over key blocks with fp32 running max / sum / accumulator, written for
  the Triton backend (and run by the Pallas interpreter on CPU).
* "reference": the quadratic oracle.

Masks are expressed as one integer per query, `limit[b, i]`: query i sees keys s < limit[b, i].
That single number covers key lengths (limit <= kv_lengths[b]), causality
(limit <= q_offsets[b] + i + 1) and decoding against a cache, and lets the kernel stop its loop
over key blocks at the last visible block.
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
from pallas_kernels.dispatch import SQUEEZED

# A large finite negative instead of -inf: exp(mask - mask) must not produce NaN for a row whose
# every key in a block is masked.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
  """Static tile sizes. `block_q`/`block_k` tile the Pallas kernel (powers of two, >= 16 for the
  Triton dot); `xla_chunk` is the number of queries per chunk in the XLA form."""
  block_q: int = 64
  block_k: int = 64
  xla_chunk: int = 256


def _check(q, k, v, kv_lengths, q_offsets, scale, causal) -> None:
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
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(
        f"the number of query heads (q.shape[2]={heads}) must be a multiple of the number of "
        f"key/value heads (k.shape[2]={kv_heads}) for grouped-query attention")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
    raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
  if not isinstance(causal, bool):
    raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
  if kv_lengths is not None:
    dispatch.check_lengths("kv_lengths", kv_lengths, batch)
    value = dispatch.concrete_value(kv_lengths)
    if value is not None and ((value < 0) | (value > k.shape[1])).any():
      raise ValueError(f"kv_lengths must lie in [0, Tk={k.shape[1]}], got {value.tolist()}")
  if q_offsets is not None:
    dispatch.check_lengths("q_offsets", q_offsets, batch)


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
) -> jax.Array:
  """Softmax attention (Vaswani et al. 2017, eq. 1; FlashAttention-2, Dao 2023, Algorithm 1).

  o_i = sum_s softmax_s(scale * q_i . k_s) v_s over keys s < kv_lengths[b] and, if causal,
  s <= q_offsets[b] + i. Queries that see no key output zeros. Softmax statistics and the
  accumulator are fp32 whatever the input dtype.

  Args:
    q: [B, Tq, H, D].  k: [B, Tk, Hkv, D], v: [B, Tk, Hkv, Dv], H % Hkv == 0 (GQA: query head h
      reads key head h // (H // Hkv), as `jax.nn.dot_product_attention`).
    causal: mask keys after each query's absolute position.
    scale: logit scale, default D ** -0.5.
    kv_lengths: [B] int, valid keys per sequence (default Tk).
    q_offsets: [B] int, absolute position of query 0 (default 0: the top-left causal mask).
    impl: "auto" | "reference" | "xla" | "pallas".  interpret: run the Pallas kernel in the
      interpreter (needed on CPU).
  Returns:
    [B, Tq, H, Dv] in q's dtype.
  """
  _check(q, k, v, kv_lengths, q_offsets, scale, causal)
  impl = dispatch.resolve_impl(impl, interpret)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if impl == "reference":
    return _reference_jit(q, k, v, causal=causal, scale=scale, kv_lengths=kv_lengths,
                          q_offsets=q_offsets)
  limits = _visible_limits(q.shape[0], q.shape[1], k.shape[1], causal, kv_lengths, q_offsets)
  if impl == "xla":
    return _attention_xla(q, k, v, limits, scale=scale, chunk=blocks.xla_chunk)
  return _attention_pallas(q, k, v, limits, scale=scale, block_q=blocks.block_q,
                           block_k=blocks.block_k, interpret=interpret)


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
) -> jax.Array:
  """Decode step: the K newest queries against a KV cache (K = 1 for decoding, K > 1 to verify K
  draft tokens in speculative decoding).

  The caller has already written the new keys/values at positions [lengths - K, lengths) of the
  cache; query j sits at position lengths - K + j and sees cache slots s <= lengths - K + j.

  Args:
    q: [B, K, H, D].  k_cache: [B, S, Hkv, D], v_cache: [B, S, Hkv, Dv].
    lengths: [B] int, valid cache length per sequence including the K new tokens (K <= lengths
      <= S).
  Returns:
    [B, K, H, Dv] in q's dtype.
  """
  dispatch.check_array("q", q, 4)
  dispatch.check_lengths("lengths", lengths, q.shape[0])
  value = dispatch.concrete_value(lengths)
  if value is not None and (value < q.shape[1]).any():
    raise ValueError(
        f"lengths must count the {q.shape[1]} new tokens already in the cache, got {value.tolist()}")
  offsets = lengths.astype(jnp.int32) - q.shape[1]
  return attention(q, k_cache, v_cache, causal=True, scale=scale, kv_lengths=lengths,
                   q_offsets=offsets, impl=impl, interpret=interpret, blocks=blocks)


_reference_jit = jax.jit(reference.softmax_attention, static_argnames=("causal", "scale"))


@functools.partial(jax.jit, static_argnames=("scale", "chunk"))
def _attention_xla(q, k, v, limits, *, scale: float, chunk: int):
  batch, tq, heads, _ = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
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
    logits = scale * jnp.einsum("bkgcd,bskd->bkgcs", q_c, k32)
    visible = key_pos[None, None, None, None, :] < limit_c[:, None, None, :, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgcs,bskd->bkgcd", weights, v32)
    return out / jnp.where(denom > 0, denom, 1.0)

  out = lax.map(one_chunk, (q_chunks, limit_chunks))
  out = rearrange(out, "n b hk g c d -> b (n c) (hk g) d")[:, :tq]
  return out.astype(q.dtype)


def _flash_kernel(q_ref, k_ref, v_ref, limit_ref, o_ref, *, scale: float, block_k: int):
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


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def _attention_pallas(q, k, v, limits, *, scale: float, block_q: int, block_k: int,
                      interpret: bool):
  batch, tq, heads, dim = q.shape
  tk, kv_heads, dim_v = k.shape[1], k.shape[2], v.shape[3]
  groups = heads // kv_heads
  block_q, block_k = dispatch.tile(block_q, tq), dispatch.tile(block_k, tk)
  tq_pad, tk_pad = dispatch.round_up(tq, block_q), dispatch.round_up(tk, block_k)
  # Triton tiles must be powers of two: zero-padding D leaves q.k unchanged, and padded value
  # columns are sliced off. Padded keys are never visible (limit <= Tk); padded queries have
  # limit 0.
  d_pad, dv_pad = max(16, dispatch.next_power_of_2(dim)), max(16, dispatch.next_power_of_2(dim_v))
  q = dispatch.pad_axis(dispatch.pad_axis(q, 1, tq_pad), 3, d_pad)
  k = dispatch.pad_axis(dispatch.pad_axis(k, 1, tk_pad), 3, d_pad)
  v = dispatch.pad_axis(dispatch.pad_axis(v, 1, tk_pad), 3, dv_pad)
  limits = dispatch.pad_axis(limits, 1, tq_pad)
  kernel = functools.partial(_flash_kernel, scale=scale, block_k=block_k)
  out = pl.pallas_call(
      kernel,
      grid=(batch, heads, tq_pad // block_q),
      in_specs=[
          pl.BlockSpec((SQUEEZED, block_q, SQUEEZED, d_pad), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((SQUEEZED, tk_pad, SQUEEZED, d_pad), lambda b, h, i: (b, 0, h // groups, 0)),
          pl.BlockSpec((SQUEEZED, tk_pad, SQUEEZED, dv_pad), lambda b, h, i: (b, 0, h // groups, 0)),
          pl.BlockSpec((SQUEEZED, block_q), lambda b, h, i: (b, i)),
      ],
      out_specs=pl.BlockSpec((SQUEEZED, block_q, SQUEEZED, dv_pad), lambda b, h, i: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, tq_pad, heads, dv_pad), q.dtype),
      compiler_params=dispatch.gpu_compiler_params(num_warps=4 if d_pad <= 64 else 8, num_stages=2),
      interpret=interpret,
      name="flash_attention",
  )(q, k, v, limits)
  return out[:, :tq, :, :dim_v]
