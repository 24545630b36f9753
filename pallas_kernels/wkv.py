"""RWKV-7 WKV: the generalised delta rule with a diagonal-plus-rank-one transition.

S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,  y_t = S_t r_t^T  (RWKV-7 "Goose", Peng et al.
2025, its WKV state update), state S [Dv, Dk] per head. `reference.wkv7` is the spec.

* "xla": chunks of C steps, in the WY-style form flash-linear-attention uses for DPLR (Yang et al.
  2024, "Parallelizing Linear Transformers with the Delta Rule", sec. 3). Write u_i = S_{i-1} a_i^T.
  With G_i the within-chunk cumulative log-decay, every S_i is S_0 diag(e^{G_i}) plus outer
  products of the u_j, v_j (j <= i) with decayed b_j, k_j, so the u_i solve one unit
  lower-triangular system
      (I - L_ab) U = A~ S_0^T + L_ak V,   L_xy[i, j] = sum_c x_i[c] y_j[c] e^{G_{i-1}[c] - G_j[c]} (j < i),
  and the outputs and the chunk's last state follow by matmuls. Pairwise decays are formed as
  e^{G_i - G_j} with the mask applied before the exp (never e^{G_i} e^{-G_j}, which overflows when
  w is small). log w is clamped below at log(smallest normal fp32): a subnormal w, which the
  hardware may flush to 0 before the log, would otherwise give -inf and NaN for the whole chunk.
  Work O(T C (Dk + Dv) Dk); a `lax.scan` carries S from chunk to chunk.
  On CPU "auto" uses a plain `lax.scan` over steps instead (see `WKVBlocks.xla_form`).
* "pallas_gpu" (Triton): one program per (batch, head, block of Dv rows) walking time with the
  fp32 state block in registers: rows of S evolve independently (S_t's row i depends only on row
  i of S_{t-1}), so splitting Dv needs no communication. This is fla's fused recurrent form.
* "pallas_tpu" (Mosaic): `wkv_tpu.py`, the same recurrence over time chunks on a sequential grid
  axis with the fp32 state in VMEM scratch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, reference, wkv_tpu
from pallas_kernels.dispatch import SQUEEZED
from pallas_kernels.lightning_tpu import TINY

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class WKVBlocks:
  """Static sizes: `block_v` state rows per Pallas program, `xla_chunk` steps per XLA chunk.

  `xla_form` picks the XLA form: "chunked" (the WY-style chunk form above), "recurrent" (a
  `lax.scan` over steps, the fused-recurrent form) or "auto": recurrent on CPU, where the chunked
  form's extra O(C Dk) work per token measured 2-4x slower than the scan at Dk = 64, chunked
  elsewhere.

  `tpu_chunk` steps per time block of the TPU kernel (a multiple of 8) and `tpu_block_v` state
  rows per TPU program (a multiple of 128 dividing the padded Dv, or >= Dv for one block).
  """
  block_v: int = 32
  xla_chunk: int = 16
  xla_form: str = "auto"
  tpu_chunk: int = 64
  tpu_block_v: int = 128


_NAMES = ("r", "w", "k", "v", "a", "b")


def _check(r, w, k, v, a, b, initial_state, time_axis: bool = True) -> None:
  ndim = 4 if time_axis else 3
  layout = "[B, T, H, Dk]" if time_axis else "[B, H, Dk]"
  for name, x in zip(_NAMES, (r, w, k, v, a, b)):
    dispatch.check_array(name, x, ndim)
  dispatch.check_same_dtype(_NAMES, (r, w, k, v, a, b))
  for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise ValueError(f"{name} must have r's shape {layout} {r.shape}, got {x.shape}")
  if v.shape[:-1] != r.shape[:-1]:
    raise ValueError(f"v must agree with r on all but the last axis, got {v.shape} and {r.shape}")
  if time_axis and r.shape[1] == 0:
    raise ValueError("r needs at least one position, got T=0")
  # The decay's domain, read only when its value is known now (never a tracer or a sharded array).
  dispatch.check_unit_interval("w", w)
  if initial_state is not None:
    name = "initial_state" if time_axis else "state"
    batch, heads = r.shape[0], r.shape[-2]
    dispatch.check_array(name, initial_state, 4)
    dispatch.check_shape(name, initial_state, (batch, heads, v.shape[-1], r.shape[-1]))


def wkv7(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
    blocks: WKVBlocks = WKVBlocks(),
):
  """RWKV-7 WKV (Peng et al. 2025, the state update): S_t = S_{t-1}(diag(w_t) + a_t^T b_t) + v_t^T k_t,
  y_t = S_t r_t^T.

  As RWKV-LM's `rwkv_v7_numpy.py` with a = -kk, b = kk * a_rate (and fla's naive DPLR
  recurrence); here a and b are free. The state is [B, H, Dv, Dk] and stays fp32.

  Args:
    r, w, k, a, b: [B, T, H, Dk]; w is the per-step decay, in (0, 1] (values outside are refused
      by name when w is concrete, e.g. numpy or a small single-device array; a traced w is not
      checked). Every form is stable on the whole domain, subnormal w included.
      v: [B, T, H, Dv].
    initial_state: [B, H, Dv, Dk], default zeros.
    impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" (see
      `dispatch.resolve_impl`).  interpret: run a Pallas form in its interpreter (CPU).
    blocks: `WKVBlocks`; the TPU form refuses blocks that do not tile and dtypes other than
      float32 / bfloat16 before tracing.
  Returns:
    y [B, T, H, Dv] in r's dtype; with `return_final_state`, (y, S_{T-1} [B, H, Dv, Dk] fp32).
  """
  _check(r, w, k, v, a, b, initial_state)
  dispatch.check_blocks(blocks, WKVBlocks, ())
  if blocks.xla_form not in ("auto", "chunked", "recurrent"):
    raise ValueError("blocks.xla_form must be 'auto', 'chunked' or 'recurrent', got "
                     f"{blocks.xla_form!r}")
  impl = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  dispatch.check_blocks(blocks, WKVBlocks,
                        {"xla": ("xla_chunk",), "pallas_gpu": ("block_v",)}.get(impl, ()))
  if impl == "pallas_tpu":
    wkv_tpu.check_tpu_blocks(blocks.tpu_chunk, blocks.tpu_block_v, r.dtype, v.shape[3], "blocks",
                             "r")
  batch, _, heads, dk = r.shape
  state = (jnp.zeros((batch, heads, v.shape[3], dk), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  if impl == "reference":
    out, final = _reference_jit(r, w, k, v, a, b, initial_state=state)
  elif impl == "xla":
    form = blocks.xla_form
    if form == "auto":
      form = "recurrent" if jax.default_backend() == "cpu" else "chunked"
    if form == "recurrent":
      out, final = _wkv7_recurrent(r, w, k, v, a, b, state)
    else:
      out, final = _wkv7_xla(r, w, k, v, a, b, state, chunk=blocks.xla_chunk)
  elif impl == "pallas_tpu":
    out, final = wkv_tpu.wkv7_tpu(r, w, k, v, a, b, state, chunk=blocks.tpu_chunk,
                                  block_v=blocks.tpu_block_v, interpret=interpret)
  else:
    out, final = _wkv7_pallas(r, w, k, v, a, b, state, block_v=blocks.block_v,
                              interpret=interpret)
  return (out, final) if return_final_state else out


def wkv7_step(r, w, k, v, a, b, state, *, impl: str = "auto",
              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """One decoding step: S <- S (diag(w) + a^T b) + v^T k, y = S r^T.

  Every impl runs the same plain jnp step (one token is a few [Dv, Dk] elementwise ops per head;
  a kernel launch would cost more); `impl` and `interpret` are validated like `wkv7`'s (one API
  for every op) and otherwise unused. For k > 1 tokens call `wkv7` with `initial_state=state,
  return_final_state=True`.

  Args:
    r, w, k, a, b: [B, H, Dk]; w in (0, 1].  v: [B, H, Dv].  state: [B, H, Dv, Dk] (last, as in
      every step form).
  Returns:
    (y [B, H, Dv] in r's dtype, new state [B, H, Dv, Dk] fp32).
  """
  _check(r, w, k, v, a, b, state, time_axis=False)
  dispatch.resolve_impl(impl, interpret, tpu_form=True)
  return _step(r, w, k, v, a, b, state)


def _recurrence(state, r, w, k, v, a, b):
  """One step of S <- S (diag(w) + a^T b) + v^T k, y = S r^T in fp32; inputs [B, H, D]."""
  r, w, k, v, a, b = (x.astype(jnp.float32) for x in (r, w, k, v, a, b))
  state_a = jnp.einsum("bhvk,bhk->bhv", state, a, precision=_HIGHEST)  # S a^T, before the update
  state = (state * w[:, :, None, :] + state_a[..., None] * b[:, :, None, :]
           + v[..., None] * k[:, :, None, :])
  return state, jnp.einsum("bhvk,bhk->bhv", state, r, precision=_HIGHEST)


@jax.jit
def _step(r, w, k, v, a, b, state):
  state, y = _recurrence(state.astype(jnp.float32), r, w, k, v, a, b)
  return y.astype(r.dtype), state


@jax.jit
def _wkv7_recurrent(r, w, k, v, a, b, state):
  time_major = lambda x: rearrange(x, "b t h d -> t b h d")
  final, ys = lax.scan(lambda s, x: _recurrence(s, *x), state,
                       tuple(time_major(x) for x in (r, w, k, v, a, b)))
  return rearrange(ys, "t b h d -> b t h d").astype(r.dtype), final


_reference_jit = jax.jit(reference.wkv7)


def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
  """(I - L)^{-1} for strictly lower-triangular L [..., C, C], as prod_k (I + L^{2^k}).

  L is nilpotent (L^C = 0), so the Neumann series I + L + L^2 + ... is finite and factors into
  log2(C) products; batched matmuls instead of C dependent substitution steps (or a LAPACK call
  per [C, C] block, which dominated the CPU time).
  """
  size = lower.shape[-1]
  inverse = jnp.eye(size, dtype=lower.dtype) + lower
  power = lower
  for _ in range(max(0, (size - 1).bit_length() - 1)):
    power = jnp.matmul(power, power, precision=_HIGHEST)
    inverse = inverse + jnp.matmul(inverse, power, precision=_HIGHEST)
  return inverse


@functools.partial(jax.jit, static_argnames=("chunk",))
def _wkv7_xla(r, w, k, v, a, b, state, *, chunk: int):
  f32 = jnp.float32
  t_len = r.shape[1]
  chunk = min(chunk, t_len)
  padded = dispatch.round_up(t_len, chunk)
  to_chunks = lambda x, fill=0.0: rearrange(
      dispatch.pad_axis(x.astype(f32), 1, padded, fill), "b (n c) h d -> n b h c d", c=chunk)
  # Padded steps: w = 1 and k = v = a = b = 0 make the transition the identity, so the final
  # state is the state after the last real token.
  rc, kc, vc, ac, bc = (to_chunks(x) for x in (r, k, v, a, b))
  # Clamped: log of a subnormal w (flushed to 0) is -inf, and -inf - -inf = NaN below.
  log_w = to_chunks(jnp.log(jnp.maximum(w.astype(f32), TINY)))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)[:, :, None]
  inclusive = jnp.tril(jnp.ones((chunk, chunk), bool))[:, :, None]

  def one_chunk(s0, inputs):
    r_c, lw, k_c, v_c, a_c, b_c = inputs  # [B, H, C, D]
    g = jnp.cumsum(lw, axis=2)  # G_i: log prod_{j<=i} w_j
    g_prev = g - lw  # G_{i-1}
    # e^{G_{i-1} - G_j} for j < i and e^{G_i - G_j} for j <= i, [B, H, C, C, Dk], masked in log space.
    decay_prev = jnp.exp(jnp.where(strict, g_prev[:, :, :, None] - g[:, :, None], -jnp.inf))
    decay_incl = jnp.exp(jnp.where(inclusive, g[:, :, :, None] - g[:, :, None], -jnp.inf))
    pair = lambda x, y, d: jnp.einsum("bhic,bhjc,bhijc->bhij", x, y, d, precision=_HIGHEST)
    l_ab, l_ak = pair(a_c, b_c, decay_prev), pair(a_c, k_c, decay_prev)
    m_rb, m_rk = pair(r_c, b_c, decay_incl), pair(r_c, k_c, decay_incl)
    a_tilde = a_c * jnp.exp(g_prev)  # a_i decayed from the chunk start
    rhs = (jnp.einsum("bhik,bhvk->bhiv", a_tilde, s0, precision=_HIGHEST)
           + jnp.einsum("bhij,bhjv->bhiv", l_ak, v_c, precision=_HIGHEST))
    u = jnp.einsum("bhij,bhjv->bhiv", _unit_lower_inverse(l_ab), rhs, precision=_HIGHEST)
    y = (jnp.einsum("bhik,bhvk->bhiv", r_c * jnp.exp(g), s0, precision=_HIGHEST)
         + jnp.einsum("bhij,bhjv->bhiv", m_rb, u, precision=_HIGHEST)
         + jnp.einsum("bhij,bhjv->bhiv", m_rk, v_c, precision=_HIGHEST))
    last = g[:, :, -1:, :]  # G_{C-1}
    to_end = jnp.exp(last - g)  # e^{G_{C-1} - G_j} <= 1
    s_end = (s0 * jnp.exp(last)
             + jnp.einsum("bhjv,bhjk->bhvk", u, b_c * to_end, precision=_HIGHEST)
             + jnp.einsum("bhjv,bhjk->bhvk", v_c, k_c * to_end, precision=_HIGHEST))
    return s_end, y

  final, ys = lax.scan(one_chunk, state, (rc, log_w, kc, vc, ac, bc))
  y = rearrange(ys, "n b h c d -> b (n c) h d")[:, :t_len]
  return y.astype(r.dtype), final


def _wkv7_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, s_out_ref, *,
                 length: int):
  """One (batch, head, block of state rows): the recurrence over time, state in registers."""
  f32 = jnp.float32

  def body(t, state):  # state: [block_v, Dk]
    row = pl.ds(t, 1)
    r = r_ref[row, :].astype(f32)  # [1, Dk]
    w = w_ref[row, :].astype(f32)
    k = k_ref[row, :].astype(f32)
    a = a_ref[row, :].astype(f32)
    b = b_ref[row, :].astype(f32)
    v = v_ref[row, :].astype(f32).T  # [block_v, 1]
    state_a = jnp.sum(state * a, axis=1, keepdims=True)  # S_{t-1} a_t^T
    state = state * w + state_a * b + v * k
    y_ref[row, :] = jnp.sum(state * r, axis=1, keepdims=True).T.astype(y_ref.dtype)
    return state

  s_out_ref[...] = lax.fori_loop(0, length, body, s0_ref[...].astype(f32))


@functools.partial(jax.jit, static_argnames=("block_v", "interpret"))
def _wkv7_pallas(r, w, k, v, a, b, state, *, block_v: int, interpret: bool):
  batch, t_len, heads, dk = r.shape
  dv = v.shape[3]
  dk_pad, dv_pad = dispatch.next_power_of_2(dk), dispatch.next_power_of_2(dv)
  block_v = min(dispatch.next_power_of_2(block_v), dv_pad)
  # Padded key channels (r = k = a = b = 0) and value rows (v = 0) keep a zero state; sliced off.
  r, w, k, a, b = (dispatch.pad_axis(x, 3, dk_pad) for x in (r, w, k, a, b))
  v = dispatch.pad_axis(v, 3, dv_pad)
  state = dispatch.pad_axis(dispatch.pad_axis(state, 2, dv_pad), 3, dk_pad)
  key_spec = pl.BlockSpec((SQUEEZED, t_len, SQUEEZED, dk_pad), lambda i, h, j: (i, 0, h, 0))
  value_spec = pl.BlockSpec((SQUEEZED, t_len, SQUEEZED, block_v), lambda i, h, j: (i, 0, h, j))
  state_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, block_v, dk_pad), lambda i, h, j: (i, h, j, 0))
  y, final = pl.pallas_call(
      functools.partial(_wkv7_kernel, length=t_len),
      grid=(batch, heads, dv_pad // block_v),
      in_specs=[key_spec, key_spec, key_spec, value_spec, key_spec, key_spec, state_spec],
      out_specs=[value_spec, state_spec],
      out_shape=[
          jax.ShapeDtypeStruct((batch, t_len, heads, dv_pad), r.dtype),
          jax.ShapeDtypeStruct((batch, heads, dv_pad, dk_pad), jnp.float32),
      ],
      compiler_params=dispatch.gpu_compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="wkv7",
  )(r, w, k, v, a, b, state)
  return y[..., :dv], final[:, :, :dv, :dk]
