"""Layers shared by the model families: embeddings, norms, rotary positions, gating, patchify.

Everything here is a pure function of arrays (the NNX modules hold the parameters), except
`RMSNorm`, the one-weight module several language-model families share; statistics are computed in
fp32 whatever the activation dtype.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                       freq_shift: float = 0.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, `[B] -> [B, dim]`, in fp32.

  As in DiT's `TimestepEmbedder` (after ADM / "Attention is all you need"): frequencies
  `exp(-log(max_period) * i / (half - freq_shift))` for `i < half`, the cosines first, then the
  sines; an odd `dim` is padded with one zero. DiT uses `freq_shift = 0`; diffusers' `Timesteps`
  calls it `downscale_freq_shift` (1 in its DiT port).
  """
  half = dim // 2
  freqs = jnp.exp(
      -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """1-D sin-cos embedding (MAE / DiT): `[M] -> [M, embed_dim]`, the sines first."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim: expected an even number, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding `[grid_size**2, embed_dim]` in row-major token order.

  Reproduces DiT's `get_2d_sincos_pos_embed` exactly (so converted checkpoints line up): half the
  channels encode one grid axis and half the other, from `np.meshgrid(w, h)`.
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim: expected a multiple of 4, got {embed_dim}")
  coords = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(coords, coords), axis=0)  # w goes first, as in DiT
  emb_a = sincos_1d(embed_dim // 2, grid[0])
  emb_b = sincos_1d(embed_dim // 2, grid[1])
  return np.concatenate([emb_a, emb_b], axis=1).astype(np.float32)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """`[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`, each patch flattened in (p, q, c) order."""
  return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(tokens: jax.Array, patch: int, grid: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: `[B, grid*grid, p*p*C] -> [B, grid*p, grid*p, C]`."""
  return einops.rearrange(
      tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, w=grid, p=patch, q=patch, c=channels
  )


@jax.custom_jvp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity on `x`, whose tangent (and so, under `jax.grad`, whose cotangent) is computed
  once into its own buffer on the CPU backend; a no-op on every other backend and in the forward
  pass.

  Why: XLA:CPU duplicates cheap elementwise producers into each of their consumers. In a residual
  network's backward pass the residual stream's cotangent (a chain of adds and LayerNorm-backward
  terms) feeds each layer's weight-gradient dot through a transposing copy, so every such copy
  re-computes the chain of all the layers above it: the DiT-digits training step spent 15 of its
  37 ms there. `lax.optimization_barrier` cannot stop it on CPU (XLA:CPU expands barriers away
  before fusion); a conditional is a fusion boundary, so the tangent passes through a `lax.cond`
  whose two branches are the identity (its predicate is a primal value, so the map stays linear
  and transposes). Placed on a block's input, it brings the DiT-digits step to 24 ms with the same
  gradients (`tests/models/test_layers.py`). Other backends fuse differently and would pay for a
  conditional (a device-to-host read of the predicate on GPU), so they get the plain identity.
  """
  return x


@materialize_cotangent.defjvp
def _materialize_cotangent_jvp(primals, tangents):
  (x,), (t,) = primals, tangents

  def on_cpu(x, t):
    first = x.reshape(-1)[0]
    # both branches are the identity; the second is written `u * 1` because JAX lifts outputs
    # that are bare inputs of every branch out of a conditional, which would remove it
    return jax.lax.cond(jnp.isnan(first), lambda u: u * 1, lambda u: u, t)

  return x, jax.lax.platform_dependent(x, t, cpu=on_cpu, default=lambda x, t: t)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, statistics in fp32, result in `x.dtype`."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation `x * (1 + scale) + shift`, per sample: x `[B, T, D]`, shift/scale `[B, D]`."""
  return x * (1 + scale[:, None]) + shift[:, None]


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
  """RMSNorm (Zhang & Sennrich 2019): `weight * x / sqrt(mean(x^2) + eps)`, statistics in fp32.

  In the order of transformers' `LlamaRMSNorm` / `MambaRMSNorm`: the normalised activations are cast
  back to `x.dtype` before the weight multiplies them, so a bf16 model rounds where they round.
  `weight=None` is the weightless form (TransNormerLLM's SRMSNorm).
  """
  xf = x.astype(jnp.float32)
  normed = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps))
  normed = normed.astype(x.dtype)
  return normed if weight is None else weight.astype(x.dtype) * normed


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """RoPE inverse frequencies `theta^(-2i/d)`, i < d/2 (Su et al. 2021, RoFormer, eq. 15), fp32."""
  if head_dim % 2:
    raise ValueError(f"head_dim: RoPE needs an even head dimension, got {head_dim}")
  return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(
      np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of `x` `[B, T, H, D]` at integer `positions` `[B, T]`.

  The "rotate half" layout of GPT-NeoX and transformers' Llama (`rotate_half`): dimension i is
  paired with i + D/2, not with its neighbour as in the paper's interleaved form, so weights
  converted from transformers need no permutation. Angles are computed in fp32.
  """
  inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """SwiGLU's gating `silu(gate) * up` (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6);
  the projections around it belong to the module that holds their weights."""
  return jax.nn.silu(gate) * up


class RMSNorm(nnx.Module):
  """`rms_norm` with a learned per-channel weight (initialised to ones), as `LlamaRMSNorm`."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


def embed(module: nnx.Embed, tokens: jax.Array) -> jax.Array:
  """`module(tokens)`, or, when its table is a low-bit `jaxinf.quant.qarray.QEmbedding`, that
  table's lookup (which decodes only the looked-up rows)."""
  table = module.embedding[...]
  if hasattr(table, "lookup"):
    return table.lookup(tokens)
  return module(tokens)


class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, initialisation and dtype promotion) whose kernel may also be a
  low-bit weight (`jaxinf.quant.base.QuantizedWeight`): then the product is `x @ kernel`, which the
  weight computes from its stored form. Every family's projections go through this layer or through
  `x @ w`, so a quantized parameter tree runs through the same model code."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    from jaxinf.quant.base import (
      QuantizedWeight,  # here: jaxinf.quant may import the models
    )
    kernel = self.kernel[...]
    if not isinstance(kernel, QuantizedWeight):
      return super().__call__(inputs, out_sharding=out_sharding)
    bias = self.bias[...] if self.bias is not None else None
    dtype = self.dtype if self.dtype is not None else jnp.result_type(inputs.dtype, kernel.dtype)
    y = inputs.astype(dtype) @ kernel.astype(dtype)
    if bias is not None:
      y = y + bias.astype(dtype)
    return y


def project(inputs: jax.Array, *linears: Linear) -> list[jax.Array]:
  """`[linear(inputs) for linear in linears]` (projections of one input, such as q, k and v):
  one call of the CPU kernel for all of them when their kernels are low-bit weights that can
  share it (`jaxinf.quant.qarray.matmul_many`: the same kind in the kernel's layout), with the
  same results; otherwise one product each, as `Linear` computes it."""
  from jaxinf.quant.base import QuantizedWeight  # here: jaxinf.quant may import the models

  kernels = [linear.kernel[...] for linear in linears]
  if len(linears) > 1 and all(isinstance(k, QuantizedWeight) for k in kernels):
    dtypes = {linear.dtype if linear.dtype is not None
              else jnp.result_type(inputs.dtype, k.dtype) for linear, k in zip(linears, kernels)}
    if len(dtypes) == 1:
      from jaxinf.quant.qarray import matmul_many

      dtype = dtypes.pop()
      ys = matmul_many(inputs.astype(dtype), [k.astype(dtype) for k in kernels])
      if ys is not None:
        return [y if linear.bias is None else y + linear.bias[...].astype(dtype)
                for y, linear in zip(ys, linears)]
  return [linear(inputs) for linear in linears]
