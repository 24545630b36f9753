"""RWKV-7 WKV's TPU (Mosaic) form: the recurrence over time chunks, the state in VMEM scratch.

S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,  y_t = S_t r_t^T, state S [Dv, Dk] per head.

Mapping onto Pallas TPU:
* grid = (B, H, Dv / block_v, T' / C); batch, heads and blocks of state rows are "parallel"
  (row i of S_t depends only on row i of S_{t-1}, so Dv splits without communication); the time
  chunks are "arbitrary" (sequential on one core) and walked in order.
* blocks: r, w, k, a, b [C, Dk'] and v, y [C, block_v] of head-major [B, H, T', D] copies made
  at the boundary (time on sublanes, channels on lanes; C a multiple of 8, D' the full padded
  head dim); the initial and final state [block_v, Dk'] stay on one block for the whole time axis.
* scratch (VMEM): the fp32 state [block_v, Dk'], loaded from the initial state at chunk 0 and
  written to the final-state output at the last chunk; fp32 copies of the chunk's inputs; the
  chunk's fp32 outputs [C, block_v], stored to y once per chunk.
* inside a chunk, a `lax.fori_loop` over its C steps (fla's fused-recurrent form): per step a few
  [block_v, Dk'] elementwise products and lane reductions on the VPU, all fp32. v_t is needed as a
  column and y_t is produced as one; both change orientation through a masked reduction with the
  [block_v, block_v] identity pattern instead of a transpose of a 1-row vector.
The decay w enters only as a multiplier (no log), so every w in (0, 1], subnormal included, is
exact here.

Padding: T to a multiple of C with identity steps (w = 1, r = k = v = a = b = 0), so the final
state is S after the last real token; Dk, Dv to the next power of two below 128 and to a multiple
of 128 above (zero channels keep a zero state and are sliced off).
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
from pallas_kernels.lightning_tpu import check_tpu_blocks, lane_dim  # noqa: F401 (re-exported)


def _kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, s_out_ref,
            state_ref, r_buf, w_buf, k_buf, v_buf, a_buf, b_buf, y_buf, *, chunk: int):
  """One (batch, head, block of state rows, time chunk): C steps of the recurrence."""
  f32 = jnp.float32
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = s0_ref[...]

  for src, dst in ((r_ref, r_buf), (w_ref, w_buf), (k_ref, k_buf), (v_ref, v_buf),
                   (a_ref, a_buf), (b_ref, b_buf)):
    dst[...] = src[...].astype(f32)
  block_v = state_ref.shape[0]
  eye = (lax.broadcasted_iota(jnp.int32, (block_v, block_v), 0)
         == lax.broadcasted_iota(jnp.int32, (block_v, block_v), 1))

  def step(t, state):  # state: [block_v, Dk]
    row = pl.ds(t, 1)
    r, w, k, a, b = (buf[row, :] for buf in (r_buf, w_buf, k_buf, a_buf, b_buf))  # [1, Dk]
    v_col = jnp.sum(jnp.where(eye, v_buf[row, :], 0.0), axis=1, keepdims=True)  # [block_v, 1]
    state_a = jnp.sum(state * a, axis=1, keepdims=True)  # S_{t-1} a_t^T
    state = state * w + state_a * b + v_col * k
    y_col = jnp.sum(state * r, axis=1, keepdims=True)  # S_t r_t^T
    y_buf[row, :] = jnp.sum(jnp.where(eye, y_col, 0.0), axis=0, keepdims=True)
    return state

  state = lax.fori_loop(0, chunk, step, state_ref[...])
  state_ref[...] = state
  y_ref[...] = y_buf[...].astype(y_ref.dtype)

  @pl.when(n == pl.num_programs(3) - 1)
  def _():
    s_out_ref[...] = state


@functools.partial(jax.jit, static_argnames=("chunk", "block_v", "interpret", "detect_races"))
def wkv7_tpu(r, w, k, v, a, b, state, *, chunk: int, block_v: int, interpret: bool,
             detect_races: bool = False):
  """r, w, k, a, b [B, T, H, Dk], v [B, T, H, Dv], state [B, H, Dv, Dk] fp32 -> (y [B, T, H, Dv]
  in r's dtype, final state fp32). Blocks are checked by the caller."""
  batch, t_len, heads, dk = r.shape
  dv = v.shape[3]
  chunk = min(chunk, dispatch.round_up(t_len, 8))
  padded = dispatch.round_up(t_len, chunk)
  dk_pad, dv_pad = lane_dim(dk), lane_dim(dv)
  block_v = min(block_v, dv_pad)
  head_major = lambda x, d, fill=0.0: rearrange(
      dispatch.pad_axis(dispatch.pad_axis(x, 1, padded, fill), 3, d), "b t h d -> b h t d")
  r, k, a, b = (head_major(x, dk_pad) for x in (r, k, a, b))
  w = head_major(w, dk_pad, 1.0)  # identity steps in the time padding
  v = head_major(v, dv_pad)
  state = dispatch.pad_axis(dispatch.pad_axis(state.astype(jnp.float32), 2, dv_pad), 3, dk_pad)

  from jax.experimental.pallas import tpu as pltpu
  key_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, chunk, dk_pad), lambda i, h, j, n: (i, h, n, 0))
  value_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, chunk, block_v), lambda i, h, j, n: (i, h, n, j))
  state_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, block_v, dk_pad), lambda i, h, j, n: (i, h, j, 0))
  f32 = jnp.float32
  y, final = pl.pallas_call(
      functools.partial(_kernel, chunk=chunk),
      grid=(batch, heads, dv_pad // block_v, padded // chunk),
      in_specs=[key_spec, key_spec, key_spec, value_spec, key_spec, key_spec, state_spec],
      out_specs=[value_spec, state_spec],
      out_shape=[
          jax.ShapeDtypeStruct((batch, heads, padded, dv_pad), r.dtype),
          jax.ShapeDtypeStruct((batch, heads, dv_pad, dk_pad), f32),
      ],
      scratch_shapes=[pltpu.VMEM((block_v, dk_pad), f32)]
      + [pltpu.VMEM((chunk, dk_pad), f32)] * 3 + [pltpu.VMEM((chunk, block_v), f32)]
      + [pltpu.VMEM((chunk, dk_pad), f32)] * 2 + [pltpu.VMEM((chunk, block_v), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=dispatch.tpu_interpret_params(interpret, detect_races=detect_races),
      name="wkv7_tpu",
  )(r, w, k, v, a, b, state)
  y = rearrange(y, "b h t d -> b t h d")[:, :t_len, :, :dv]
  return y, final[:, :, :dv, :dk]
