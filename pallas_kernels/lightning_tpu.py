"""Lightning attention's TPU (Mosaic) form: Lightning Attention-2 with the state in VMEM scratch.

Algorithm (Qin et al. 2024, Algorithm 1), per (batch, head): for each block of C positions,
  O_blk = [(Q K^T) * M] V + (Q * lambda^{i+1}) S,   M_ij = lambda^{i-j} (i >= j) else 0,
  S    <- lambda^C S + (K * lambda^{C-1-j})^T V.

Mapping onto Pallas TPU:
* grid = (B, H, Dv / block_v, T' / C); the first three axes are "parallel" (independent
  programs: the columns of S never mix, so Dv splits without communication), the last is
  "arbitrary" (sequential on one core): it walks the time blocks in order.
* blocks: q, k [C, Dk'] and v, o [C, block_v] of the head-major [B, H, T', D] copies made at the
  boundary (time on sublanes, features on lanes: C a multiple of 8, D' the full padded head dim);
  the initial and final state [Dk', block_v] stay on one block for the whole time axis.
* scratch: the fp32 state [Dk', block_v] in VMEM, loaded from the initial state at time block 0,
  read and updated every block, written to the final-state output at the last block.
* the per-head log decay is a scalar-prefetch operand (SMEM). It is clamped to the log of the
  smallest normal fp32 (decays in (0, tiny) are below every representable product anyway), so a
  subnormal decay that the hardware flushes to 0 gives no log(0) = -inf and no inf - inf = NaN.
  Decay powers are exp(log_lambda * integer lag), masked before the exp.
Every product touching the state (the read q S, the update K^T V) has fp32 operands at the
highest precision; only the intra-block [(Q K^T) * M] V uses bf16 operands for bf16 inputs.

Padding: T to a multiple of C (padded positions: k = v = 0, and the decay exponents count only
real positions, so the final state is S after the last real token); Dk, Dv to the next power of
two below 128 and to a multiple of 128 above (zeros: no effect on q.k, extra columns sliced off).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.dispatch import SQUEEZED

# log of the smallest normal fp32: the floor of every log decay (see the module docstring).
TINY = float(np.finfo(np.float32).tiny)
LOG_TINY = math.log(TINY)
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def lane_dim(d: int) -> int:
  """A head dim padded for TPU lanes: the next power of two (>= 8) below 128, else a multiple."""
  return max(8, dispatch.next_power_of_2(d)) if d <= 128 else dispatch.round_up(d, 128)


def check_tpu_blocks(chunk: int, block_v: int, dtype, dv: int, what: str, arg: str) -> None:
  """Named errors, before tracing, for blocks that do not tile and dtypes the form lacks.

  `what` names the blocks argument, `arg` the input whose dtype is checked."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"{arg} must be float32 or bfloat16 for impl='pallas_tpu', got {dtype}")
  if not isinstance(chunk, int) or chunk <= 0 or chunk % 8:
    raise ValueError(f"{what}.tpu_chunk must be a positive multiple of 8 (TPU sublanes), "
                     f"got {chunk!r}")
  dv_pad = lane_dim(dv)
  if not isinstance(block_v, int) or block_v <= 0:
    raise ValueError(f"{what}.tpu_block_v must be a positive int, got {block_v!r}")
  if block_v < dv_pad and (block_v % 128 or dv_pad % block_v):
    raise ValueError(
        f"{what}.tpu_block_v must be a multiple of 128 dividing the padded Dv ({dv_pad}) or at "
        f"least Dv (one block), got {block_v}")


def _kernel(g_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, s_out_ref, state_ref, *, chunk: int,
            length: int):
  """One (batch, head, Dv block, time block): Algorithm 1's body, the state in `state_ref`."""
  f32 = jnp.float32
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = s0_ref[...]

  log_lambda = g_ref[pl.program_id(1)]
  # Steps taken inside this block, counting only real positions: padding must not decay.
  valid = length - n * chunk
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  idx = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  steps_i = jnp.minimum(row + 1, valid).astype(f32)
  steps_j = jnp.minimum(col + 1, valid).astype(f32)
  steps = jnp.minimum(idx + 1, valid).astype(f32)  # [C, 1]
  total = jnp.minimum(chunk, valid).astype(f32)
  decay = jnp.where(row >= col, jnp.exp(log_lambda * jnp.maximum(steps_i - steps_j, 0.0)), 0.0)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  cd = q.dtype
  precision = lax.Precision.HIGHEST if cd == f32 else None
  scores = lax.dot_general(q, k, _NT, precision=precision, preferred_element_type=f32)
  intra = jnp.dot((scores * decay).astype(cd), v, precision=precision,
                  preferred_element_type=f32)
  state = state_ref[...]
  hp = lax.Precision.HIGHEST
  read = jnp.dot(q.astype(f32) * jnp.exp(log_lambda * steps), state, precision=hp,
                 preferred_element_type=f32)
  o_ref[...] = (intra + read).astype(o_ref.dtype)
  k_to_end = k.astype(f32) * jnp.exp(log_lambda * (total - steps))
  state = jnp.exp(log_lambda * total) * state + lax.dot_general(
      k_to_end, v.astype(f32), _TN, precision=hp, preferred_element_type=f32)
  state_ref[...] = state

  @pl.when(n == pl.num_programs(3) - 1)
  def _():
    s_out_ref[...] = state


@functools.partial(jax.jit, static_argnames=("chunk", "block_v", "interpret", "detect_races"))
def lightning_tpu(q, k, v, log_decay, state, *, chunk: int, block_v: int, interpret: bool,
                  detect_races: bool = False):
  """q, k [B, T, H, Dk], v [B, T, H, Dv], log_decay [H] fp32, state [B, H, Dk, Dv] fp32 ->
  (o [B, T, H, Dv] in q's dtype, final state fp32). Blocks are checked by the caller."""
  batch, t_len, heads, dk = q.shape
  dv = v.shape[3]
  chunk = min(chunk, dispatch.round_up(t_len, 8))
  padded = dispatch.round_up(t_len, chunk)
  dk_pad, dv_pad = lane_dim(dk), lane_dim(dv)
  block_v = min(block_v, dv_pad)
  head_major = lambda x, d: rearrange(
      dispatch.pad_axis(dispatch.pad_axis(x, 1, padded), 3, d), "b t h d -> b h t d")
  q, k, v = head_major(q, dk_pad), head_major(k, dk_pad), head_major(v, dv_pad)
  state = dispatch.pad_axis(dispatch.pad_axis(state.astype(jnp.float32), 2, dk_pad), 3, dv_pad)
  log_decay = jnp.maximum(log_decay.astype(jnp.float32), LOG_TINY)

  from jax.experimental.pallas import tpu as pltpu
  key_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, chunk, dk_pad), lambda b, h, j, n, g: (b, h, n, 0))
  value_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, chunk, block_v),
                            lambda b, h, j, n, g: (b, h, n, j))
  state_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, dk_pad, block_v),
                            lambda b, h, j, n, g: (b, h, 0, j))
  out, final = pl.pallas_call(
      functools.partial(_kernel, chunk=chunk, length=t_len),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, dv_pad // block_v, padded // chunk),
          in_specs=[key_spec, key_spec, value_spec, state_spec],
          out_specs=[value_spec, state_spec],
          scratch_shapes=[pltpu.VMEM((dk_pad, block_v), jnp.float32)],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((batch, heads, padded, dv_pad), q.dtype),
          jax.ShapeDtypeStruct((batch, heads, dk_pad, dv_pad), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=dispatch.tpu_interpret_params(interpret, detect_races=detect_races),
      name="lightning_attention_tpu",
  )(log_decay, q, k, v, state)
  out = rearrange(out, "b h t d -> b t h d")[:, :t_len, :, :dv]
  return out, final[:, :, :dk, :dv]
