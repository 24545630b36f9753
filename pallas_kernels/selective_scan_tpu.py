"""The selective scan's TPU (Mosaic) form: time chunks on a sequential grid axis, state in VMEM.

x_t = exp(delta_t A) * x_{t-1} + delta_t u_t B_t,  y_t = C_t . x_t,  out = (y + D u) * silu(z),
per channel d with a diagonal [N] state (Mamba, Gu & Dao 2023, Algorithm 2).

Mapping onto Pallas TPU:
* grid = (B, D' / block_d, T' / C). Batch and channel blocks are "parallel": channels never mix
  (the state is diagonal per channel), so D splits without communication. The time chunks are
  "arbitrary" (sequential on one core) and walked in order.
* layout: channel-minor, as the model produces it. u, delta, z, out are [B, T', D'] blocks of
  [C, block_d] (time on sublanes, channels on lanes: C a multiple of 8, 16 for bfloat16, block_d
  a multiple of 128 or the full channel dim). The state is held transposed, [N, block_d], so its
  lanes are channels too; A^T, and a time-invariant B^T / C^T, are [N, block_d] blocks that stay
  put over the time axis. Time-varying B/C are fp32 [B, G, T', N] blocks of [C, N] (N, the full
  state size, on lanes); a channel block lies inside one group (each group is padded to a
  multiple of 128 lanes, see `channel_blocks`), so its group is j // (blocks per group). Many
  small groups therefore cost padding (8 groups of 64 channels compute 1024 lanes).
* block sizes (`SelectiveScanBlocks.tpu_chunk`, `.tpu_block_d`; defaults 64 and 256, one set
  for every TPU generation: the VMEM working set, a few [C, block_d] fp32 buffers and the
  double-buffered input blocks, is well under 1 MiB, far inside every generation's VMEM).
* scratch (VMEM): the fp32 state [N, block_d], loaded from the initial state at chunk 0 and
  written to the final-state output after the last chunk; fp32 [C, block_d] buffers for the
  chunk's delta_t (bias and softplus applied to the whole chunk at once), delta_t u_t and y_t.
* inside a chunk, a `lax.fori_loop` over its C steps (8 unrolled): per step one exp and a few
  multiply-adds on the [N, block_d] state, and a sublane reduction for y_t. A time-varying B_t
  row [1, N] becomes the [N, 1] column the update needs through a masked lane reduction with
  the [N, N] identity pattern (no transpose of a one-row vector). The skip term D u and the z
  gate are applied to the whole chunk after the loop, and the output is stored once per chunk.

Padding: T to a multiple of C, the padded steps masked to delta = 0 inside the kernel (exp(0 A)
= 1 and a zero drive leave the state untouched, so the final state is the state after the last
real token, whatever softplus(delta_bias) is); channels to whole blocks per group, with
u = delta = A = B = C = 0 (their state stays at its zero padding and is sliced off).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, reference
from pallas_kernels.attention_tpu import sublanes
from pallas_kernels.dispatch import SQUEEZED

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
LANES = 128
_UNROLL = 8


def check_tpu_blocks(chunk, block_d, dtype, what: str = "blocks", arg: str = "u") -> None:
  """Named errors, before tracing, for blocks that do not tile and dtypes the form lacks.

  `what` names the blocks argument, `arg` the input whose dtype is checked (u's, shared by delta
  and z; B, C, A, D and delta_bias are converted to fp32 at the boundary whatever their dtype).
  """
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"{arg} must be float32 or bfloat16 for impl='pallas_tpu', got {dtype}")
  rows = sublanes(dtype)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0 or chunk % rows:
    raise ValueError(f"{what}.tpu_chunk must be a positive multiple of {rows} (TPU sublanes for "
                     f"{jnp.dtype(dtype).name}), got {chunk!r}")
  if isinstance(block_d, bool) or not isinstance(block_d, int) or block_d <= 0 or block_d % LANES:
    raise ValueError(f"{what}.tpu_block_d must be a positive multiple of {LANES} (TPU lanes), "
                     f"got {block_d!r}")


def channel_blocks(channels: int, groups: int, block_d: int) -> tuple[int, int]:
  """(block width, padded channels per group) for `channels` split in `groups`.

  One group no wider than `block_d`: a single block of the full (unpadded) width, which TPU
  tiling allows. Otherwise each group is padded to a multiple of 128 lanes and split into blocks
  of the widest multiple of 128 that is at most `block_d` and divides it, so no block straddles
  two groups and no more than 127 padded channels per group are computed.
  """
  per_group = channels // groups
  if groups == 1 and channels <= block_d:
    return channels, channels
  padded = dispatch.round_up(per_group, LANES)
  width = max(w for w in range(LANES, min(block_d, padded) + 1, LANES) if padded % w == 0)
  return width, padded


def _kernel(*refs, chunk: int, length: int, delta_softplus: bool, has_z: bool,
            time_invariant: bool):
  """One (batch, channel block, time chunk): C steps of the recurrence on the [N, block_d] state."""
  if has_z:
    (u_ref, dt_ref, z_ref, a_ref, b_ref, c_ref, skip_ref, bias_ref, s0_ref, y_ref, s_out_ref,
     state_ref, dt_buf, du_buf, y_buf) = refs
  else:
    (u_ref, dt_ref, a_ref, b_ref, c_ref, skip_ref, bias_ref, s0_ref, y_ref, s_out_ref,
     state_ref, dt_buf, du_buf, y_buf) = refs
    z_ref = None
  f32 = jnp.float32
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state_ref[...] = s0_ref[...]

  # The whole chunk's step sizes at once; steps past the sequence's end get delta = 0.
  u = u_ref[...].astype(f32)
  dt = dt_ref[...].astype(f32) + bias_ref[...]
  if delta_softplus:
    dt = reference.softplus(dt)
  position = n * chunk + lax.broadcasted_iota(jnp.int32, dt.shape, 0)
  dt = jnp.where(position < length, dt, 0.0)
  dt_buf[...] = dt
  du_buf[...] = dt * u
  a_t = a_ref[...]  # A^T [N, block_d]
  n_state = a_t.shape[0]
  if time_invariant:
    b_t, c_t = b_ref[...], c_ref[...]  # [N, block_d]
  else:
    eye = (lax.broadcasted_iota(jnp.int32, (n_state, n_state), 0)
           == lax.broadcasted_iota(jnp.int32, (n_state, n_state), 1))
    column = lambda ref, row: jnp.sum(jnp.where(eye, ref[row, :], 0.0), axis=1, keepdims=True)

  def step(t, x):  # x: [N, block_d]
    row = pl.ds(t, 1)
    dt_t, du_t = dt_buf[row, :], du_buf[row, :]  # [1, block_d]
    if time_invariant:
      x = jnp.exp(a_t * dt_t) * x + b_t * du_t
      y_buf[row, :] = jnp.sum(x * c_t, axis=0, keepdims=True)
    else:
      x = jnp.exp(a_t * dt_t) * x + column(b_ref, row) * du_t  # [N, 1] * [1, block_d]
      y_buf[row, :] = jnp.sum(x * column(c_ref, row), axis=0, keepdims=True)
    return x

  state = lax.fori_loop(0, chunk, step, state_ref[...], unroll=min(_UNROLL, chunk))
  state_ref[...] = state
  out = y_buf[...] + skip_ref[...] * u
  if has_z:
    zt = z_ref[...].astype(f32)
    out = out * zt / (1.0 + jnp.exp(-zt))
  y_ref[...] = out.astype(y_ref.dtype)

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    s_out_ref[...] = state


@functools.partial(jax.jit, static_argnames=("delta_softplus", "chunk", "block_d", "interpret",
                                             "detect_races"))
def selective_scan_tpu(u, delta, A, B, C, D, z, delta_bias, state, *, delta_softplus: bool,
                       chunk: int, block_d: int, interpret: bool, detect_races: bool = False):
  """u, delta, z [B, T, D]; A [D, N]; B, C [B, T, N], [B, T, G, N] or time-invariant [D, N];
  D, delta_bias [D] or None; state [B, D, N] fp32 -> (out [B, T, D] in u's dtype, final state
  [B, D, N] fp32). Blocks and dtypes are checked by the caller (`check_tpu_blocks`)."""
  f32 = jnp.float32
  batch, t_len, channels = u.shape
  n_state = A.shape[1]
  time_invariant = B.ndim == 2
  if B.ndim == 3:
    B, C = B[:, :, None, :], C[:, :, None, :]
  groups = 1 if time_invariant else B.shape[2]
  width, per_group_pad = channel_blocks(channels, groups, block_d)
  d_pad = groups * per_group_pad
  chunk = min(chunk, dispatch.round_up(t_len, sublanes(u.dtype)))
  padded = dispatch.round_up(t_len, chunk)

  # Channels padded per group to whole blocks, time to whole chunks (masked in the kernel).
  by_channel = lambda x: rearrange(dispatch.pad_axis(
      rearrange(x, "... (g d) -> ... g d", g=groups), -1, per_group_pad), "... g d -> ... (g d)")
  sequence = lambda x: dispatch.pad_axis(by_channel(x), 1, padded)
  per_channel = lambda x: by_channel(
      (jnp.zeros((channels,), f32) if x is None else x.astype(f32))[None, :])  # [1, D']
  transposed = lambda x: by_channel(rearrange(x.astype(f32), "d s -> s d"))  # [N, D']
  seq_inputs = [sequence(u), sequence(delta)] + ([sequence(z)] if z is not None else [])
  if time_invariant:
    B, C = transposed(B), transposed(C)
  else:
    B, C = (rearrange(dispatch.pad_axis(x.astype(f32), 1, padded), "b t g s -> b g t s")
            for x in (B, C))
  s0 = by_channel(rearrange(state.astype(f32), "b d s -> b s d"))  # [B, N, D']

  from jax.experimental.pallas import tpu as pltpu
  blocks_per_group = per_group_pad // width
  seq_spec = pl.BlockSpec((SQUEEZED, chunk, width), lambda b, j, n: (b, n, j))
  fixed_spec = pl.BlockSpec((n_state, width), lambda b, j, n: (0, j))
  vec_spec = pl.BlockSpec((1, width), lambda b, j, n: (0, j))
  state_spec = pl.BlockSpec((SQUEEZED, n_state, width), lambda b, j, n: (b, 0, j))
  bc_spec = (fixed_spec if time_invariant else pl.BlockSpec(
      # lax.div, not //: floor division of a traced int lowers through sign, which asks the
      # TPU generation (absent when lowering on a CPU host); both are non-negative here.
      (SQUEEZED, SQUEEZED, chunk, n_state),
      lambda b, j, n: (b, lax.div(j, blocks_per_group), n, 0)))
  kernel = functools.partial(_kernel, chunk=chunk, length=t_len, delta_softplus=delta_softplus,
                             has_z=z is not None, time_invariant=time_invariant)
  y, final = pl.pallas_call(
      kernel,
      grid=(batch, d_pad // width, padded // chunk),
      in_specs=[seq_spec] * len(seq_inputs) + [fixed_spec, bc_spec, bc_spec, vec_spec, vec_spec,
                                               state_spec],
      out_specs=[seq_spec, state_spec],
      out_shape=[
          jax.ShapeDtypeStruct((batch, padded, d_pad), u.dtype),
          jax.ShapeDtypeStruct((batch, n_state, d_pad), f32),
      ],
      scratch_shapes=[pltpu.VMEM((n_state, width), f32)] + [pltpu.VMEM((chunk, width), f32)] * 3,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=dispatch.tpu_interpret_params(interpret, detect_races=detect_races),
      name="selective_scan_tpu",
  )(*seq_inputs, transposed(A), B, C, per_channel(D), per_channel(delta_bias), s0)
  unpad = lambda x: rearrange(
      rearrange(x, "... (g d) -> ... g d", g=groups)[..., :channels // groups],
      "... g d -> ... (g d)")
  return unpad(y[:, :t_len]), rearrange(unpad(final), "b s d -> b d s")
