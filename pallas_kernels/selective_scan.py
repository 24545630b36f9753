"""Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2), with `mamba_ssm.selective_scan_ref`'s
semantics in a time-major layout.

x_t = exp(delta_t A) * x_{t-1} + delta_t u_t B_t,  y_t = C_t . x_t,  out = (y + D u) * silu(z),
per channel d with a diagonal [N] state. `reference.selective_scan` is the spec.

* "xla": a `lax.scan` over blocks of C steps, so memory is O(C D N) per block, not O(T D N).
  Inside a block the linear recurrence x_t = a_t x_{t-1} + b_t is solved by
  `lax.associative_scan` (Blelloch 1990) on the pairs (a, b), O(C D N log C) work in log depth,
  on parallel hardware; on CPU a sequential `lax.scan` over the block's steps is faster
  (`SelectiveScanBlocks.xla_inner`).
* "pallas_gpu" (Triton): one program per (batch, group, block of channels) walking time with the
  fp32 [N, block_d] state in registers, the fused recurrent form of mamba_ssm's CUDA kernel
  (state never leaves the chip; each step reads one row of u, delta, z, B, C and writes y).
* "pallas_tpu" (Mosaic): `selective_scan_tpu.py`, the same recurrence with time chunks on a
  sequential grid axis, channel blocks on a parallel one and the fp32 state in VMEM scratch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, reference, selective_scan_tpu
from pallas_kernels.dispatch import SQUEEZED


@dataclasses.dataclass(frozen=True)
class SelectiveScanBlocks:
  """Static sizes: `block_d` channels per GPU Pallas program, `xla_chunk` steps per XLA block;
  `tpu_chunk` steps per time chunk of the TPU kernel (a multiple of 8, of 16 for bfloat16) and
  `tpu_block_d` channels per TPU program (a multiple of 128; a single group of at most that many
  channels is one block of its full width).

  `xla_inner` is how the XLA form solves the recurrence inside a block: "associative" (log-depth
  `lax.associative_scan`, for parallel hardware), "sequential" (a `lax.scan` over the block's
  steps) or "auto": sequential on CPU, where the associative scan's 2 log2(C) extra passes over
  the [C, D, N] block measured 3-6x slower, associative elsewhere.
  """
  block_d: int = 64
  xla_chunk: int = 64
  xla_inner: str = "auto"
  tpu_chunk: int = 64
  tpu_block_d: int = 256


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
  dispatch.check_array("u", u, 3)
  dispatch.check_array("delta", delta, 3)
  batch, t_len, channels = u.shape
  if delta.shape != u.shape:
    raise ValueError(f"delta must have u's shape [B, T, D] {u.shape}, got {delta.shape}")
  if t_len == 0:
    raise ValueError("u needs at least one position, got T=0")
  dispatch.check_same_dtype(("u", "delta"), (u, delta))
  dispatch.check_array("A", A, 2)
  if A.shape[0] != channels:
    raise ValueError(f"A must have shape [D={channels}, N], got {A.shape}")
  n_state = A.shape[1]
  for name, x in (("B", B), ("C", C)):
    if not hasattr(x, "ndim") or x.ndim not in (2, 3, 4):
      raise ValueError(f"{name} must be [B, T, N], grouped [B, T, G, N] or time-invariant [D, N], "
                       f"got {getattr(x, 'shape', type(x).__name__)}")
    dispatch.check_array(name, x, x.ndim)
  if B.shape != C.shape:
    raise ValueError(f"B and C must have the same shape, got {B.shape} and {C.shape}")
  dispatch.check_same_dtype(("B", "C"), (B, C))
  if B.ndim == 2:
    if B.shape != (channels, n_state):
      raise ValueError(f"B must be time-invariant [D={channels}, N={n_state}] when 2-D, got "
                       f"{B.shape}")
  elif B.shape[:2] != (batch, t_len) or B.shape[-1] != n_state:
    raise ValueError(f"B must be [B={batch}, T={t_len}, (G,) N={n_state}], got {B.shape}")
  if B.ndim == 4 and channels % B.shape[2]:
    raise ValueError(f"B: the number of groups (B.shape[2]={B.shape[2]}) must divide "
                     f"D={channels}")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None:
      dispatch.check_array(name, x, 1)
      dispatch.check_shape(name, x, (channels,))
  if z is not None:
    dispatch.check_array("z", z, 3)
    dispatch.check_shape("z", z, u.shape)
    dispatch.check_same_dtype(("u", "z"), (u, z))
  if initial_state is not None:
    dispatch.check_array("initial_state", initial_state, 3)
    dispatch.check_shape("initial_state", initial_state, (batch, channels, n_state))


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
    return_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
    blocks: SelectiveScanBlocks = SelectiveScanBlocks(),
):
  """Selective scan (Mamba, Gu & Dao 2023, Algorithm 2 / eq. 2a-2b with ZOH-Euler discretisation).

  delta <- softplus(delta + delta_bias) (each optional); x_t = exp(delta_t A) x_{t-1} +
  delta_t u_t B_t; y_t = C_t . x_t; out = (y + D u) * silu(z). As mamba_ssm's
  `selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`
  but time-major: mamba_ssm's u is [B, D, L], ours is [B, T, D].

  Args:
    u, delta: [B, T, D] (one dtype).  A: [D, N], real.
    B, C: [B, T, N], or grouped [B, T, G, N] (channel d reads group d // (D // G)), or
      time-invariant [D, N] (mamba_ssm's non-selective case, an S4D layer).
    D, delta_bias: [D].  z: [B, T, D].
    initial_state: [B, D, N] (fp32), default zeros.
    impl: "auto" | "reference" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu" (see
      `dispatch.resolve_impl`).  interpret: run a Pallas form in its interpreter (CPU).
    blocks: `SelectiveScanBlocks`; the TPU form refuses blocks that do not tile and dtypes other
      than float32 / bfloat16 before tracing.
  Returns:
    out [B, T, D] in u's dtype; with `return_final_state`, (out, x_{T-1} [B, D, N] fp32).
  """
  _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
  if not isinstance(delta_softplus, bool):
    raise TypeError(f"delta_softplus must be a bool, got {type(delta_softplus).__name__}")
  dispatch.check_blocks(blocks, SelectiveScanBlocks, ())
  if blocks.xla_inner not in ("auto", "associative", "sequential"):
    raise ValueError("blocks.xla_inner must be 'auto', 'associative' or 'sequential', got "
                     f"{blocks.xla_inner!r}")
  impl = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  dispatch.check_blocks(blocks, SelectiveScanBlocks,
                        {"xla": ("xla_chunk",), "pallas_gpu": ("block_d",)}.get(impl, ()))
  if impl == "pallas_tpu":
    selective_scan_tpu.check_tpu_blocks(blocks.tpu_chunk, blocks.tpu_block_d, u.dtype, "blocks",
                                        "u")
  batch, _, channels = u.shape
  state = (jnp.zeros((batch, channels, A.shape[1]), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  if impl == "reference":
    out, final = _reference_jit(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                initial_state=state)
  elif impl == "xla":
    inner = blocks.xla_inner
    if inner == "auto":
      inner = "sequential" if jax.default_backend() == "cpu" else "associative"
    out, final = _selective_scan_xla(u, delta, A, B, C, D, z, delta_bias, state,
                                     delta_softplus=delta_softplus, chunk=blocks.xla_chunk,
                                     inner=inner)
  elif impl == "pallas_tpu":
    out, final = selective_scan_tpu.selective_scan_tpu(
        u, delta, A, B, C, D, z, delta_bias, state, delta_softplus=delta_softplus,
        chunk=blocks.tpu_chunk, block_d=blocks.tpu_block_d, interpret=interpret)
  else:
    out, final = _selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, state,
                                        delta_softplus=delta_softplus, block_d=blocks.block_d,
                                        interpret=interpret)
  return (out, final) if return_final_state else out


def selective_scan_step(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    state: jax.Array | None = None,
    *,
    delta_softplus: bool = False,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of the selective scan (mamba_ssm's `selective_state_update`).

  One token is a [D, N] multiply-add, so every impl runs the same plain jnp step (a kernel launch
  would cost more than the arithmetic); `impl` and `interpret` are validated like
  `selective_scan`'s (one API for every op) and otherwise unused. For k > 1 tokens call
  `selective_scan` with `initial_state=state, return_final_state=True`.

  The arguments are `selective_scan`'s without the time axis, in the same order, with the state
  last (as in every step form of this package); `delta_softplus` is keyword-only here.

  Args:
    u, delta: [B, D].  A: [D, N].  B, C: [B, N], [B, G, N] or time-invariant [D, N].
    D, delta_bias: [D].  z: [B, D].  state: [B, D, N] (None: zeros, as `initial_state=None`).
  Returns:
    (out [B, D] in u's dtype, new state [B, D, N] fp32).
  """
  dispatch.resolve_impl(impl, interpret, tpu_form=True)
  # The shapes with a time axis of 1, for `_check` (placeholders: nothing is computed here).
  add_time = lambda x: (jax.ShapeDtypeStruct((x.shape[0], 1, *x.shape[1:]), x.dtype)
                        if hasattr(x, "shape") and hasattr(x, "dtype") and x.ndim else x)
  dispatch.check_array("u", u, 2)  # the step's own ranks and names, before `_check`'s
  dispatch.check_array("delta", delta, 2)
  _check(add_time(u), add_time(delta), A, add_time(B), add_time(C), D, add_time(z), delta_bias,
         None)
  if state is not None:
    dispatch.check_array("state", state, 3)
    dispatch.check_shape("state", state, (*u.shape, A.shape[1]))
  if not isinstance(delta_softplus, bool):
    raise TypeError(f"delta_softplus must be a bool, got {type(delta_softplus).__name__}")
  if state is None:
    state = jnp.zeros((*u.shape, A.shape[1]), jnp.float32)
  return _step(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus)


@functools.partial(jax.jit, static_argnames=("delta_softplus",))
def _step(state, u, delta, A, B, C, D, z, delta_bias, *, delta_softplus: bool):
  f32 = jnp.float32
  u32 = u.astype(f32)
  dt = _discretisation_step(delta, delta_bias, delta_softplus)  # [B, D]
  if B.ndim == 3:
    # channel d reads group d // (D // G): expand the groups over their channels.
    per_group = u.shape[1] // B.shape[1]
    B = jnp.repeat(B, per_group, axis=1)
    C = jnp.repeat(C, per_group, axis=1)
  else:
    B, C = B[:, None, :], C[:, None, :]
  state = (jnp.exp(dt[..., None] * A.astype(f32)) * state.astype(f32)
           + (dt * u32)[..., None] * B.astype(f32))
  out = jnp.sum(state * C.astype(f32), axis=-1)
  out = _finish(out, u32, D, z)
  return out.astype(u.dtype), state


def _discretisation_step(delta, delta_bias, delta_softplus: bool) -> jax.Array:
  dt = delta.astype(jnp.float32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(jnp.float32)
  return reference.softplus(dt) if delta_softplus else dt


def _finish(y, u32, D, z):
  """out = (y + D u) * silu(z), each term optional, in fp32."""
  if D is not None:
    y = y + u32 * D.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y


_reference_jit = jax.jit(reference.selective_scan, static_argnames=("delta_softplus",))


def _combine(earlier, later):
  """Composition of x -> a x + b maps: `earlier` applied first."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


@functools.partial(jax.jit, static_argnames=("delta_softplus", "chunk", "inner"))
def _selective_scan_xla(u, delta, A, B, C, D, z, delta_bias, state, *, delta_softplus: bool,
                        chunk: int, inner: str):
  f32 = jnp.float32
  t_len = u.shape[1]
  time_invariant = B.ndim == 2
  if B.ndim == 3:
    B, C = B[:, :, None, :], C[:, :, None, :]
  groups = 1 if time_invariant else B.shape[2]
  chunk = min(chunk, t_len)
  padded = dispatch.round_up(t_len, chunk)
  u32 = u.astype(f32)
  dt = _discretisation_step(delta, delta_bias, delta_softplus)
  # Padded steps have delta = 0: exp(0 * A) = 1 and delta u B = 0 leave the state untouched.
  to_blocks = lambda x: rearrange(dispatch.pad_axis(x, 1, padded),
                                  "b (n c) (g d) -> n c b g d", c=chunk, g=groups)
  bc_blocks = lambda x: rearrange(dispatch.pad_axis(x.astype(f32), 1, padded),
                                  "b (n c) g s -> n c b g s", c=chunk)
  per_channel = lambda x: rearrange(x.astype(f32), "(g d) s -> g d s", g=groups)
  A_g = per_channel(A)
  state = rearrange(state, "b (g d) s -> b g d s", g=groups)
  # B_t, C_t per step: [..., G, N] read by every channel of a group, or one time-invariant
  # [G=1, D, N] (then the scanned B, C are None and these constants are used).
  B_ti, C_ti = (per_channel(B), per_channel(C)) if time_invariant else (None, None)
  per_state = lambda x_t, fixed: fixed if time_invariant else x_t[..., :, None, :]  # [.., G, Dg, N]

  def coefficients(u_c, dt_c, B_c):
    """x_t = decay_t * x_{t-1} + drive_t, [..., G, Dg, N]."""
    decay = jnp.exp(dt_c[..., None] * A_g)
    drive = (dt_c * u_c)[..., None] * per_state(B_c, B_ti)
    return decay, drive

  def step(x, inputs):
    u_t, dt_t, B_t, C_t = inputs  # [B, G, Dg] and [B, G, N]
    decay, drive = coefficients(u_t, dt_t, B_t)
    x = decay * x + drive
    return x, jnp.sum(x * per_state(C_t, C_ti), axis=-1)

  def block(x, inputs):
    if inner == "sequential":
      return lax.scan(step, x, inputs)
    u_c, dt_c, B_c, C_c = inputs  # [C, B, G, Dg] and [C, B, G, N]
    decay, drive = coefficients(u_c, dt_c, B_c)
    decay_cum, drive_cum = lax.associative_scan(_combine, (decay, drive), axis=0)
    xs = decay_cum * x[None] + drive_cum
    return xs[-1], jnp.sum(xs * per_state(C_c, C_ti), axis=-1)

  bc = (None, None) if time_invariant else (bc_blocks(B), bc_blocks(C))
  final, ys = lax.scan(block, state, (to_blocks(u32), to_blocks(dt), *bc))
  y = rearrange(ys, "n c b g d -> b (n c) (g d)")[:, :t_len]
  out = _finish(y, u32, D, z)
  return out.astype(u.dtype), rearrange(final, "b g d s -> b (g d) s")


def _selective_scan_kernel(*refs, length: int, delta_softplus: bool, has_z: bool,
                           time_invariant: bool):
  """One (batch, group, channel block): the recurrence over time, state [N, block_d] in registers."""
  if has_z:
    u_ref, dt_ref, z_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, s0_ref, y_ref, s_out_ref = refs
  else:
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, s0_ref, y_ref, s_out_ref = refs
    z_ref = None
  f32 = jnp.float32
  a_t = a_ref[...].astype(f32)  # A transposed: [N, block_d]
  skip = d_ref[...].astype(f32)  # [1, block_d]
  bias = bias_ref[...].astype(f32)
  if time_invariant:  # B^T, C^T [N, block_d], the same at every step
    b_fixed, c_fixed = b_ref[...].astype(f32), c_ref[...].astype(f32)

  def body(t, x):
    row = pl.ds(t, 1)
    u = u_ref[row, :].astype(f32)  # [1, block_d]
    dt = dt_ref[row, :].astype(f32) + bias
    if delta_softplus:
      dt = reference.softplus(dt)
    if time_invariant:
      b, c = b_fixed, c_fixed
    else:
      b = b_ref[row, :].astype(f32).T  # [N, 1]
      c = c_ref[row, :].astype(f32).T
    x = jnp.exp(a_t * dt) * x + b * (dt * u)
    y = jnp.sum(x * c, axis=0, keepdims=True) + skip * u
    if has_z:
      zt = z_ref[row, :].astype(f32)
      y = y * zt / (1.0 + jnp.exp(-zt))
    y_ref[row, :] = y.astype(y_ref.dtype)
    return x

  s_out_ref[...] = lax.fori_loop(0, length, body, s0_ref[...].astype(f32))


@functools.partial(jax.jit, static_argnames=("delta_softplus", "block_d", "interpret"))
def _selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, state, *, delta_softplus: bool,
                           block_d: int, interpret: bool):
  batch, t_len, channels = u.shape
  n_state = A.shape[1]
  time_invariant = B.ndim == 2
  if B.ndim == 3:
    B, C = B[:, :, None, :], C[:, :, None, :]
  groups = 1 if time_invariant else B.shape[2]
  per_group = channels // groups
  block_d = min(dispatch.next_power_of_2(block_d), dispatch.next_power_of_2(per_group))
  d_pad = dispatch.round_up(per_group, block_d)
  n_pad = dispatch.next_power_of_2(n_state)
  # Channels padded with u = delta = 0 (and A = B = C = 0 for padded states) stay at zero and are
  # sliced off; Triton tiles need power-of-two extents.
  by_group = lambda x: dispatch.pad_axis(
      rearrange(x, "b t (g d) -> b t g d", g=groups), 3, d_pad)
  per_channel = lambda x: dispatch.pad_axis(
      rearrange(x.astype(jnp.float32), "(g d) -> g 1 d", g=groups), 2, d_pad)
  transposed = lambda x: dispatch.pad_axis(dispatch.pad_axis(
      rearrange(x.astype(jnp.float32), "(g d) s -> g s d", g=groups), 2, d_pad), 1, n_pad)
  a_t = transposed(A)
  skip = per_channel(D if D is not None else jnp.zeros((channels,), jnp.float32))
  bias = per_channel(delta_bias if delta_bias is not None else jnp.zeros((channels,), jnp.float32))
  s0 = dispatch.pad_axis(dispatch.pad_axis(
      rearrange(state, "b (g d) s -> b g s d", g=groups), 3, d_pad), 2, n_pad)
  fixed_spec = pl.BlockSpec((SQUEEZED, n_pad, block_d), lambda b, g, j: (g, 0, j))
  if time_invariant:  # B^T, C^T [1, N', D'] like A
    B, C = transposed(B), transposed(C)
    bc_spec = fixed_spec
  else:
    B, C = dispatch.pad_axis(B, 3, n_pad), dispatch.pad_axis(C, 3, n_pad)
    bc_spec = pl.BlockSpec((SQUEEZED, t_len, SQUEEZED, n_pad), lambda b, g, j: (b, 0, g, 0))

  seq_spec = pl.BlockSpec((SQUEEZED, t_len, SQUEEZED, block_d), lambda b, g, j: (b, 0, g, j))
  vec_spec = pl.BlockSpec((SQUEEZED, 1, block_d), lambda b, g, j: (g, 0, j))
  state_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, n_pad, block_d), lambda b, g, j: (b, g, 0, j))
  has_z = z is not None
  seq_inputs = [by_group(u), by_group(delta)] + ([by_group(z)] if has_z else [])
  kernel = functools.partial(_selective_scan_kernel, length=t_len, delta_softplus=delta_softplus,
                             has_z=has_z, time_invariant=time_invariant)
  y, final = pl.pallas_call(
      kernel,
      grid=(batch, groups, d_pad // block_d),
      in_specs=[seq_spec] * len(seq_inputs) + [fixed_spec, bc_spec, bc_spec, vec_spec, vec_spec,
                                               state_spec],
      out_specs=[seq_spec, state_spec],
      out_shape=[
          jax.ShapeDtypeStruct((batch, t_len, groups, d_pad), u.dtype),
          jax.ShapeDtypeStruct((batch, groups, n_pad, d_pad), jnp.float32),
      ],
      compiler_params=dispatch.gpu_compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="selective_scan",
  )(*seq_inputs, a_t, B, C, skip, bias, s0)
  y = rearrange(y[..., :per_group], "b t g d -> b t (g d)")
  final = rearrange(final[:, :, :n_state, :per_group], "b g s d -> b (g d) s")
  return y, final
