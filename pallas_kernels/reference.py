"""Naive references: the specification every kernel in this package is tested against.

Each function reads like its paper's equation and computes in fp32 at the highest matmul
precision, whatever the input dtype; outputs are cast back to the input dtype. Nothing here is
fast: the softmax and lightning references are quadratic in T, the recurrences are one
`lax.scan` step per token. Layouts are time-major, `[B, T, H, D]` (heads) or `[B, T, D]`
(channels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def softplus(x: jax.Array) -> jax.Array:
  """torch.nn.functional.softplus (beta=1, threshold=20), the one mamba_ssm applies to delta."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def masked_softmax(logits: jax.Array, visible: jax.Array):
  """Softmax over the last axis of the `visible` entries of fp32 `logits` (invisible ones get
  probability 0; a row that sees nothing is all zeros, not NaN). Returns (probs, row max, row sum
  of exp(logits - row max)), the last two with a kept last axis, for the log-sum-exp."""
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(denom > 0, denom, 1.0), row_max, denom


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    kv_lengths: jax.Array | None = None,
    q_offsets: jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with GQA and key lengths.

  o_i = sum_s softmax_s(scale * q_i . k_s) v_s over the keys s visible to query i:
  s < kv_lengths[b] and, if causal, s <= q_offsets[b] + i (query i sits at absolute position
  q_offsets[b] + i). Causal attention with Tq != Tk needs `q_offsets` (no silent alignment); with
  Tq == Tk the default offset 0 is the usual causal mask. A query that sees no key outputs zeros
  and has log-sum-exp -inf.

  Args:
    q: [B, Tq, H, D].
    k: [B, Tk, Hkv, D] with H % Hkv == 0; query head h reads key head h // (H // Hkv).
    v: [B, Tk, Hkv, Dv].
    scale: logit scale, default D ** -0.5.
    kv_lengths: [B] int, valid keys per sequence (default Tk).
    q_offsets: [B] int, absolute position of the first query (default 0; required if causal and
      Tq != Tk).
    return_lse: also return log sum_s exp(scale * q_i . k_s) over the visible keys.
  Returns:
    [B, Tq, H, Dv] in q's dtype, and with `return_lse` the log-sum-exp [B, H, Tq] in fp32.
  """
  batch, tq, heads, dim = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  if causal and tq != tk and q_offsets is None:
    raise ValueError(f"causal attention with Tq={tq} != Tk={tk} needs q_offsets (the absolute "
                     "position of each sequence's first query)")
  scale = dim ** -0.5 if scale is None else scale
  groups = heads // kv_heads
  k = repeat(k.astype(jnp.float32), "b s h d -> b s (h g) d", g=groups)
  v = repeat(v.astype(jnp.float32), "b s h d -> b s (h g) d", g=groups)
  logits = scale * jnp.einsum("bihd,bshd->bhis", q.astype(jnp.float32), k, precision=_HIGHEST)
  lengths = jnp.full((batch,), tk, jnp.int32) if kv_lengths is None else kv_lengths
  offsets = jnp.zeros((batch,), jnp.int32) if q_offsets is None else q_offsets
  key_pos = jnp.arange(tk)
  visible = key_pos[None, None, :] < lengths[:, None, None]  # [B, 1, Tk]
  if causal:
    query_pos = offsets[:, None] + jnp.arange(tq)[None, :]  # [B, Tq]
    visible = visible & (key_pos[None, None, :] <= query_pos[:, :, None])
  visible = visible[:, None]  # [B, 1, Tq or 1, Tk]
  probs, row_max, denom = masked_softmax(logits, visible)
  out = jnp.einsum("bhis,bshd->bihd", probs, v, precision=_HIGHEST).astype(q.dtype)
  if not return_lse:
    return out
  # log(0) = -inf for a query that sees no key.
  lse = (row_max + jnp.log(denom))[..., 0]
  return out, jnp.broadcast_to(lse, (batch, heads, tq))


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay: jax.Array,
    *,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Linear attention with per-head exponential decay (TransNormerLLM, Qin et al. 2023).

  o_t = sum_{s<=t} lambda_h^{t-s} (q_t . k_s) v_s + lambda_h^{t+1} q_t S_0,
  with no normalisation and no implicit scale. Equivalently S_t = lambda_h S_{t-1} + k_t^T v_t,
  o_t = q_t S_t (the recurrent form of Lightning Attention-2, Qin et al. 2024). This reference is the quadratic
  sum, written out with the masked decay matrix lambda^{t-s}.

  Args:
    q, k: [B, T, H, Dk]. v: [B, T, H, Dv]. decay: [H] in (0, 1].
    initial_state: [B, H, Dk, Dv] (fp32), default zeros.
  Returns:
    o [B, T, H, Dv] in q's dtype, final state S_{T-1} [B, H, Dk, Dv] in fp32.
  """
  batch, t_len, heads, dk = q.shape
  dv, dtype = v.shape[-1], q.dtype
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  lam = decay.astype(jnp.float32)  # [H]
  # lambda_h^n for integer n >= 0, shape n.shape + [H]. A power, not exp(n log lambda): a
  # subnormal lambda (flushed to 0 by the hardware) would make that 0 * -inf = NaN; 0^0 = 1 and
  # 1^n = 1 exactly, so every lambda in (0, 1] is right at the domain's edges.
  power = lambda n: lam ** n[..., None].astype(jnp.float32)
  t = jnp.arange(t_len)
  lag = t[:, None] - t[None, :]  # t - s
  decay_matrix = jnp.where((lag >= 0)[..., None], power(jnp.maximum(lag, 0)), 0.0)  # [T, S, H]
  scores = jnp.einsum("bthd,bshd->btsh", q, k, precision=_HIGHEST) * decay_matrix[None]
  out = jnp.einsum("btsh,bshe->bthe", scores, v, precision=_HIGHEST)
  state = (jnp.zeros((batch, heads, dk, dv), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  # lambda^{t+1} S_0: the initial state has been decayed once more by the time o_t reads it.
  from_state = power(t + 1)  # [T, H]
  out = out + jnp.einsum("bthd,bhde->bthe", q, state, precision=_HIGHEST) * from_state[None, :, :, None]
  to_end = power(t_len - 1 - t)  # lambda^{T-1-s}, [T, H]
  final = (power(jnp.asarray(t_len))[None, :, None, None] * state
           + jnp.einsum("bshd,bshe,sh->bhde", k, v, to_end, precision=_HIGHEST))
  return out.astype(dtype), final


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2), `mamba_ssm.selective_scan_ref` semantics.

  delta <- softplus(delta + delta_bias) (each step optional);
  x_t = exp(delta_t A) * x_{t-1} + delta_t u_t B_t;   y_t = C_t . x_t;
  out = (y + D * u) * silu(z).

  Layout differs from mamba_ssm's channel-major [B, D, L]: here time is the second axis.

  Args:
    u, delta: [B, T, D].  A: [D, N] (real).
    B, C: [B, T, N], or grouped [B, T, G, N] with channel d reading group d // (D // G)
      (mamba_ssm's `repeat(B, "B G N L -> B (G H) N L")`), or time-invariant [D, N] (mamba_ssm's
      non-selective case, an S4D layer).
    D, delta_bias: [D].  z: [B, T, D].
    initial_state: [B, D, N] (fp32), default zeros; mamba_ssm's ref always starts at zero.
  Returns:
    out [B, T, D] in u's dtype and the last state x_{T-1} [B, D, N] in fp32.
  """
  batch, _, channels = u.shape
  n_state = A.shape[-1]
  f32 = jnp.float32
  u32, delta32 = u.astype(f32), delta.astype(f32)
  if delta_bias is not None:
    delta32 = delta32 + delta_bias.astype(f32)
  if delta_softplus:
    delta32 = softplus(delta32)
  time_invariant = B.ndim == 2
  if B.ndim == 4:
    B = repeat(B, "b t g n -> b t (g h) n", h=channels // B.shape[2])
    C = repeat(C, "b t g n -> b t (g h) n", h=channels // C.shape[2])
  elif B.ndim == 3:
    B, C = B[:, :, None, :], C[:, :, None, :]  # one B_t shared by every channel
  A32 = A.astype(f32)
  B32, C32 = B.astype(f32), C.astype(f32)

  def step(x, inputs):
    u_t, delta_t, B_t, C_t = inputs
    if time_invariant:  # the same [D, N] at every step
      B_t, C_t = B32, C32
    x = jnp.exp(delta_t[..., None] * A32) * x + (delta_t * u_t)[..., None] * B_t
    return x, jnp.sum(x * C_t, axis=-1)

  x0 = (jnp.zeros((batch, channels, n_state), f32) if initial_state is None
        else initial_state.astype(f32))
  time_major = lambda x: None if time_invariant else jnp.moveaxis(x, 1, 0)
  last, ys = lax.scan(step, x0, (jnp.moveaxis(u32, 1, 0), jnp.moveaxis(delta32, 1, 0),
                                 time_major(B32), time_major(C32)))
  y = jnp.moveaxis(ys, 0, 1)
  out = y if D is None else y + u32 * D.astype(f32)
  if z is not None:
    out = out * jax.nn.silu(z.astype(f32))
  return out.astype(u.dtype), last


def wkv7(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """RWKV-7 "Goose" WKV: the generalised delta rule (Peng et al. 2025, the WKV state update).

  S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,   y_t = S_t r_t^T,
  with row vectors a_t, b_t, k_t, r_t, w_t in R^{Dk} and v_t in R^{Dv}. The state S is
  [Dv, Dk] per head, as `state` in RWKV-LM's `rwkv_v7_numpy.py` (there a = -kk and
  b = kk * a_rate) and `S` in flash-linear-attention's naive DPLR recurrence.

  Args:
    r, w, k, a, b: [B, T, H, Dk]; w is the per-step decay in (0, 1].  v: [B, T, H, Dv].
    initial_state: [B, H, Dv, Dk] (fp32), default zeros.
  Returns:
    y [B, T, H, Dv] in r's dtype, final state S_{T-1} [B, H, Dv, Dk] in fp32.
  """
  batch, _, heads, dk = r.shape
  dv = v.shape[-1]
  f32 = jnp.float32

  def step(state, inputs):
    r_t, w_t, k_t, v_t, a_t, b_t = inputs  # [B, H, D]
    state_a = jnp.einsum("bhvk,bhk->bhv", state, a_t, precision=_HIGHEST)  # S_{t-1} a_t^T
    state = (state * w_t[:, :, None, :] + state_a[..., None] * b_t[:, :, None, :]
             + v_t[..., None] * k_t[:, :, None, :])
    return state, jnp.einsum("bhvk,bhk->bhv", state, r_t, precision=_HIGHEST)

  s0 = (jnp.zeros((batch, heads, dv, dk), f32) if initial_state is None
        else initial_state.astype(f32))
  inputs = tuple(rearrange(x.astype(f32), "b t h d -> t b h d") for x in (r, w, k, v, a, b))
  last, ys = lax.scan(step, s0, inputs)
  return rearrange(ys, "t b h d -> b t h d").astype(r.dtype), last


def lut_matmul(x: jax.Array, codes: jax.Array, lut: jax.Array, *, bits: int,
               in_features: int) -> jax.Array:
  """y = x W with W[k, n] = lut[n, idx[k, n]]: a per-output-channel lookup table (SqueezeLLM,
  Kim et al. 2023, Sec. 4), the b-bit indices packed as `pallas_kernels.lut_matmul` documents.

  Read bit by bit: row k lies in group g = k // P at position r = k % P, P = lcm(8, b) / b; bit t
  of idx[k, n] is bit (r b + t) mod 8 of byte (r b + t) // 8 of that group, `codes[byte, g, n]`.

  Args:
    x: [M, K].  codes: uint8 [lcm(8, b) / 8, ceil(K / P), N].  lut: [N, 2^b].
  Returns:
    [M, N] in x's dtype (computed in fp32).
  """
  groups = 8 // math.gcd(8, bits)
  k = jnp.arange(in_features)
  g, r = k // groups, k % groups
  idx = jnp.zeros((in_features, codes.shape[2]), jnp.int32)
  for t in range(bits):
    position = r * bits + t  # [K]
    byte = codes[position // 8, g, :].astype(jnp.int32)  # [K, N]
    idx = idx + (((byte >> (position % 8)[:, None]) & 1) << t)
  n = jnp.arange(codes.shape[2])
  w = lut.astype(jnp.float32)[n[None, :], idx]  # [K, N]
  return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST).astype(x.dtype)
