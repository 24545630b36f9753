"""Lightning attention: linear attention with a per-head exponential decay, in linear time.

o_t = sum_{s<=t} lambda_h^{t-s} (q_t . k_s) v_s  (TransNormerLLM, Qin et al. 2023), or as
a recurrence S_t = lambda_h S_{t-1} + k_t^T v_t, o_t = q_t S_t. Both fast forms follow Lightning
Attention-2 (Qin et al. 2024, Algorithm 1): inside a block of C positions a masked quadratic
product (q k^T * M) v with M_ij = lambda^{i-j}; between blocks a [Dk, Dv] state carried forward,
read by q_i lambda^{i+1} S and updated as S <- lambda^C S + (k * lambda^{C-1-j})^T v. Cost is
O(T C D + T D^2): linear in T.

* "xla": a `lax.fori_loop` over blocks, each step the intra-block product plus the state read
  and update (Algorithm 1's loop as written), slicing the inputs in place.
* "pallas_gpu" (Triton): one program per (batch, head, block of Dv columns) walking the blocks
  in order with the fp32 state in registers (the columns of S are independent, so splitting Dv
  adds programs without communication).
* "pallas_tpu" (Mosaic): `lightning_tpu.py`, the same algorithm with the time blocks on a
  sequential grid axis and the fp32 state in VMEM scratch.

Decays live in log space: a block's decay matrix is exp(log_lambda * (i - j)) with integer lags,
masked before the exp, so lambda near 0 underflows to exact zeros instead of producing inf * 0.
log_lambda is clamped below at log(smallest normal fp32): a subnormal decay, which
the hardware may flush to 0 before the log, would otherwise give -inf and then NaN.
The state, its read q S and its update K^T V are fp32 in every form, whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, lightning_tpu, reference
from pallas_kernels.dispatch import SQUEEZED
from pallas_kernels.lightning_tpu import TINY


@dataclasses.dataclass(frozen=True)
class LightningBlocks:
  """Static block sizes: `chunk` positions per block in the GPU Pallas kernel, `block_v` state
  columns per program there, `xla_chunk` positions per block in the XLA form; `tpu_chunk`
  positions per time block in the TPU kernel (a multiple of 8) and `tpu_block_v` state columns
  per TPU program (a multiple of 128 dividing the padded Dv, or >= Dv for one block)."""
  chunk: int = 64
  block_v: int = 64
  xla_chunk: int = 64
  tpu_chunk: int = 64
  tpu_block_v: int = 128


def _check(q, k, v, decay, initial_state) -> None:
  dispatch.check_array("q", q, 4)
  dispatch.check_array("k", k, 4)
  dispatch.check_array("v", v, 4)
  dispatch.check_same_dtype(("q", "k", "v"), (q, k, v))
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape [B, T, H, Dk], got {q.shape} and {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must agree with q on [B, T, H], got {v.shape} and {q.shape}")
  if q.shape[1] == 0:
    raise ValueError("q needs at least one position, got T=0")
  dispatch.check_array("decay", decay, 1)
  dispatch.check_shape("decay", decay, (q.shape[2],))
  dispatch.check_unit_interval("decay", decay)
  if initial_state is not None:
    batch, _, heads, dk = q.shape
    dispatch.check_array("initial_state", initial_state, 4)
    dispatch.check_shape("initial_state", initial_state, (batch, heads, dk, v.shape[3]))


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    decay: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
    blocks: LightningBlocks = LightningBlocks(),
):
  """Lightning attention (Lightning Attention-2, Qin et al. 2024, Algorithm 1).

  o_t = q_t S_t,  S_t = lambda_h S_{t-1} + k_t^T v_t,  S_{-1} = initial_state (default 0):
  no normalisation and no implicit scale (scale q yourself). Run [0, T1) with
  `return_final_state=True` and pass that state to [T1, T) to process a sequence in pieces.

  Args:
    q, k: [B, T, H, Dk].  v: [B, T, H, Dv].
    decay: [H], lambda_h in (0, 1].
    initial_state: [B, H, Dk, Dv], kept in fp32.
    impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" (see
      `dispatch.resolve_impl`).  interpret: run a Pallas form in its interpreter (CPU).
    blocks: `LightningBlocks`; the TPU form refuses blocks that do not tile and dtypes other
      than float32 / bfloat16 before tracing.
  Returns:
    o [B, T, H, Dv] in q's dtype; with `return_final_state`, (o, S_{T-1} [B, H, Dk, Dv] fp32).
  """
  _check(q, k, v, decay, initial_state)
  impl = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  dispatch.check_blocks(blocks, LightningBlocks, {"xla": ("xla_chunk",),
                                                  "pallas_gpu": ("chunk", "block_v")}.get(impl, ()))
  if impl == "pallas_tpu":
    lightning_tpu.check_tpu_blocks(blocks.tpu_chunk, blocks.tpu_block_v, q.dtype, v.shape[3],
                                   "blocks", "q")
  batch, _, heads, dk = q.shape
  state = (jnp.zeros((batch, heads, dk, v.shape[3]), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  log_decay = log_decays(decay)
  if impl == "reference":
    out, final = _reference_jit(q, k, v, decay, initial_state=state)
  elif impl == "xla":
    out, final = _lightning_xla(q, k, v, log_decay, state, chunk=blocks.xla_chunk)
  elif impl == "pallas_tpu":
    out, final = lightning_tpu.lightning_tpu(q, k, v, log_decay, state, chunk=blocks.tpu_chunk,
                                             block_v=blocks.tpu_block_v, interpret=interpret)
  else:
    out, final = _lightning_pallas(q, k, v, log_decay, state, chunk=blocks.chunk,
                                   block_v=blocks.block_v, interpret=interpret)
  return (out, final) if return_final_state else out


def log_decays(decay: jax.Array) -> jax.Array:
  """log lambda in fp32, lambda clamped below at `TINY` (the smallest normal fp32), so the log is
  finite for every decay in (0, 1], subnormal ones included."""
  return jnp.log(jnp.maximum(decay.astype(jnp.float32), TINY))


def lightning_attention_step(
    q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array, state: jax.Array, *,
    impl: str = "auto", interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of the recurrence: S <- lambda_h S + k^T v, o = q S.

  A single token is a few [Dk, Dv] outer products and mat-vecs per head, so every impl runs the
  same plain jnp step (a kernel launch would cost more than the arithmetic); `impl` and
  `interpret` are validated like `lightning_attention`'s (one API for every op) and otherwise
  unused. For k > 1 new tokens call `lightning_attention` with `initial_state=state,
  return_final_state=True`.

  Args:
    q, k: [B, H, Dk].  v: [B, H, Dv].  decay: [H] in (0, 1].  state: [B, H, Dk, Dv] (last, as in
      every step form).
  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] fp32).
  """
  dispatch.resolve_impl(impl, interpret, tpu_form=True)
  dispatch.check_array("q", q, 3)
  dispatch.check_array("k", k, 3)
  dispatch.check_array("v", v, 3)
  dispatch.check_same_dtype(("q", "k", "v"), (q, k, v))
  if q.shape != k.shape or v.shape[:2] != q.shape[:2]:
    raise ValueError(f"q, k must be [B, H, Dk] and v [B, H, Dv], got {q.shape}, {k.shape}, {v.shape}")
  dispatch.check_array("decay", decay, 1)
  dispatch.check_shape("decay", decay, (q.shape[1],))
  dispatch.check_unit_interval("decay", decay)
  dispatch.check_array("state", state, 4)
  dispatch.check_shape("state", state, (*q.shape, v.shape[2]))
  return _step(q, k, v, decay, state)


@jax.jit
def _step(q, k, v, decay, state):
  f32 = jnp.float32
  state = (decay.astype(f32)[None, :, None, None] * state.astype(f32)
           + jnp.einsum("bhd,bhe->bhde", k.astype(f32), v.astype(f32)))
  out = jnp.einsum("bhd,bhde->bhe", q.astype(f32), state, precision=lax.Precision.HIGHEST)
  return out.astype(q.dtype), state


_reference_jit = jax.jit(reference.lightning_attention)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _lightning_xla(q, k, v, log_decay, state, *, chunk: int):
  t_len, dtype = q.shape[1], q.dtype
  chunk = min(chunk, t_len)
  padded = dispatch.round_up(t_len, chunk)
  q, k, v = (dispatch.pad_axis(x.astype(jnp.float32), 1, padded) for x in (q, k, v))
  lower = jnp.tril(jnp.ones((chunk, chunk), bool))
  idx = jnp.arange(chunk)

  # Lightning Attention-2's loop, one block per step, slicing the [B, T, H, D] inputs in place:
  # a block's working set is O(B H C D) whatever T is, and no transposed copy of q, k, v or o is
  # made. (Materialising every block's [C, C] scores at once, or rearranging the inputs to
  # block-major, made CPU time grow faster than T once the arrays left the cache.)
  def block(n, carry):
    s, out = carry
    start = n * chunk
    q_c, k_c, v_c = (lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (q, k, v))
    # Steps taken inside the block, counting only real positions: padded positions (k = v = 0)
    # must not decay the state, so the final state is the state after the last real token.
    # Integer step counts times log lambda (not a cumsum of logs) keep every exponent exact.
    steps = jnp.minimum(idx + 1, t_len - start).astype(jnp.float32)  # [C]
    cum = log_decay[:, None] * steps[None, :]  # log lambda^{i+1}, [H, C]
    lag = jnp.where(lower, steps[:, None] - steps[None, :], 0.0)  # i - j, masked below
    scores = (jnp.einsum("bihd,bjhd->bhij", q_c, k_c, precision=lax.Precision.HIGHEST)
              * jnp.where(lower, jnp.exp(log_decay[:, None, None] * lag), 0.0))
    out_c = (jnp.einsum("bhij,bjhe->bihe", scores, v_c, precision=lax.Precision.HIGHEST)
             + jnp.einsum("bihd,bhde->bihe", q_c * jnp.exp(cum).T[None, :, :, None], s,
                          precision=lax.Precision.HIGHEST))
    last = cum[:, -1:]  # log lambda^{valid steps}
    s = (jnp.exp(last)[None, :, :, None] * s
         + jnp.einsum("bjhd,bjhe->bhde", k_c * jnp.exp(last - cum).T[None, :, :, None], v_c,
                      precision=lax.Precision.HIGHEST))
    return s, lax.dynamic_update_slice_in_dim(out, out_c, start, axis=1)

  out = jnp.zeros(v.shape, jnp.float32)
  final, out = lax.fori_loop(0, padded // chunk, block, (state, out))
  return out[:, :t_len].astype(dtype), final


def _lightning_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, s_out_ref, *, chunk: int,
                      length: int):
  """One (batch, head, Dv block): Lightning Attention-2's loop over blocks, state in registers."""
  log_lambda = jnp.max(g_ref[...])  # every entry holds this head's log lambda
  cd = dispatch.compute_dtype(q_ref.dtype)
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  idx = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)

  def body(c, state):
    start = c * chunk
    # Steps taken so far inside this block, counting only real positions: padded positions at
    # the end of the last block must not decay anything.
    valid = length - start
    steps_i = jnp.minimum(row + 1, valid).astype(jnp.float32)
    steps_j = jnp.minimum(col + 1, valid).astype(jnp.float32)
    steps = jnp.minimum(idx + 1, valid).astype(jnp.float32)  # [C, 1]
    total = jnp.minimum(chunk, valid).astype(jnp.float32)
    q = q_ref[pl.ds(start, chunk), :]
    k = k_ref[pl.ds(start, chunk), :]
    v = v_ref[pl.ds(start, chunk), :]
    scores = dispatch.kernel_dot(q, k.T, cd)
    lag = jnp.where(row >= col, log_lambda * (steps_i - steps_j), -jnp.inf)
    out = dispatch.kernel_dot(scores * jnp.exp(lag), v, cd)
    # The state's read and update stay fp32 (fp32 operands), whatever the input dtype: rounding
    # the decayed keys or the state to bf16 here is what drifts the state over long sequences.
    f32 = jnp.float32
    out = out + dispatch.kernel_dot(q.astype(f32) * jnp.exp(log_lambda * steps), state, f32)
    o_ref[pl.ds(start, chunk), :] = out.astype(o_ref.dtype)
    k_to_end = k.astype(f32) * jnp.exp(log_lambda * (total - steps))
    return jnp.exp(log_lambda * total) * state + dispatch.kernel_dot(k_to_end.T, v, f32)

  state = s0_ref[...].astype(jnp.float32)
  state = lax.fori_loop(0, q_ref.shape[0] // chunk, body, state)
  s_out_ref[...] = state


@functools.partial(jax.jit, static_argnames=("chunk", "block_v", "interpret"))
def _lightning_pallas(q, k, v, log_decay, state, *, chunk: int, block_v: int, interpret: bool):
  batch, t_len, heads, dk = q.shape
  dv = v.shape[3]
  chunk = dispatch.tile(chunk, t_len)
  padded = dispatch.round_up(t_len, chunk)
  dk_pad, dv_pad = max(16, dispatch.next_power_of_2(dk)), max(16, dispatch.next_power_of_2(dv))
  block_v = min(dispatch.next_power_of_2(block_v), dv_pad)
  # Zero padding: extra key dims add 0 to q.k, extra value dims are sliced off, extra positions
  # are masked out of the decay by `length` inside the kernel.
  q = dispatch.pad_axis(dispatch.pad_axis(q, 1, padded), 3, dk_pad)
  k = dispatch.pad_axis(dispatch.pad_axis(k, 1, padded), 3, dk_pad)
  v = dispatch.pad_axis(dispatch.pad_axis(v, 1, padded), 3, dv_pad)
  state = dispatch.pad_axis(dispatch.pad_axis(state, 2, dk_pad), 3, dv_pad)
  # A per-head scalar as a 16-wide row: Triton loads tiles, not scalars.
  g = jnp.broadcast_to(log_decay[:, None], (heads, 16))
  kernel = functools.partial(_lightning_kernel, chunk=chunk, length=t_len)
  out, final = pl.pallas_call(
      kernel,
      grid=(batch, heads, dv_pad // block_v),
      in_specs=[
          pl.BlockSpec((SQUEEZED, padded, SQUEEZED, dk_pad), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((SQUEEZED, padded, SQUEEZED, dk_pad), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((SQUEEZED, padded, SQUEEZED, block_v), lambda b, h, j: (b, 0, h, j)),
          pl.BlockSpec((SQUEEZED, 16), lambda b, h, j: (h, 0)),
          pl.BlockSpec((SQUEEZED, SQUEEZED, dk_pad, block_v), lambda b, h, j: (b, h, 0, j)),
      ],
      out_specs=[
          pl.BlockSpec((SQUEEZED, padded, SQUEEZED, block_v), lambda b, h, j: (b, 0, h, j)),
          pl.BlockSpec((SQUEEZED, SQUEEZED, dk_pad, block_v), lambda b, h, j: (b, h, 0, j)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, padded, heads, dv_pad), q.dtype),
          jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
      ],
      compiler_params=dispatch.gpu_compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="lightning_attention",
  )(q, k, v, g, state)
  return out[:, :t_len, :, :dv], final[:, :, :dk, :dv]
