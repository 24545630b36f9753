"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3 and App. G), computed as diffusers' `AutoencoderKL` computes it.

Layout is channels-last: images `[B, H, W, C]` in [-1, 1], latents `[B, H/f, W/f, latent_channels]`
with `f = 2 ** (len(block_out_channels) - 1)` (8 for Stable Diffusion's VAE, `sd-vae-ft-ema`).

Encoder: `conv_in`, one down block per entry of `block_out_channels` (`layers_per_block`
ResnetBlock2D, then a stride-2 3x3 conv on the input padded by one row and column at the bottom and
right only — diffusers' `Downsample2D(padding=0)` — on all but the last), a mid block (resnet,
single-head self-attention with a GroupNorm in front and a residual, resnet), GroupNorm, SiLU,
`conv_out` to `2 * latent_channels`, then the 1x1 `quant_conv`. The channels split into the mean and
the log-variance (clamped to [-30, 20]) of a diagonal Gaussian. Decoder: 1x1 `post_quant_conv`,
`conv_in`, mid block, up blocks in reverse (`layers_per_block + 1` resnets, then 2x nearest
upsampling and a 3x3 conv on all but the last), GroupNorm, SiLU, `conv_out`.

ResnetBlock2D (no time embedding): GroupNorm-SiLU-conv3x3-GroupNorm-SiLU-conv3x3 plus the input
(through a 1x1 conv when the width changes). Every GroupNorm has eps 1e-6 and affine parameters.
Parameter names follow diffusers' so that `jaxinf.checkpoints.vae` maps them one to one.
A diffusion model sees `scaling_factor * (z - shift_factor)`; `latents_to_vae` undoes it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.config import check_fields

_EPS = 1e-6  # every GroupNorm of diffusers' Encoder/Decoder


# Logical axis names of every VAE parameter (path regex, names), for `jaxinf.parallel`'s rules
# (the mechanism of `jaxinf.models.families.param_axes_from_rules`). A convolutional net: the
# default rules replicate it and run it data parallel.
VAE_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r".*attention/to_(q|k|v|out)/kernel", ("channels_in", "channels")),
    (r".*/kernel", ("kernel_h", "kernel_w", "channels_in", "channels")),
    (r".*/(bias|scale)", ("channels",)),
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Static configuration; defaults are Stable Diffusion's VAE (`stabilityai/sd-vae-ft-ema`)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # Parameters are fp32; activations run in this dtype. GroupNorm statistics and softmax are fp32.
  dtype: str = "float32"

  def __post_init__(self):
    check_fields(self, positive=("scaling_factor",))
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not self.block_out_channels or not all(
        isinstance(c, int) and c > 0 for c in self.block_out_channels):
      raise ValueError(f"block_out_channels: expected positive ints, got {self.block_out_channels!r}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"norm_num_groups: {self.norm_num_groups} does not divide the widths {bad}")
    if not self.scaling_factor > 0:
      raise ValueError(f"scaling_factor: expected > 0, got {self.scaling_factor}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(cin: int, cout: int, k: int, dtype, rngs: nnx.Rngs, *, stride: int = 1,
          padding=None) -> nnx.Conv:
  pad = ((k // 2, k // 2),) * 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, rngs=rngs)


class GroupNorm(nnx.Module):
  """torch's `GroupNorm(groups, C, eps=1e-6)` channels-last: two-pass statistics in fp32 over each
  group of consecutive channels and all pixels, then a per-channel affine map."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    del rngs
    self.groups = groups
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + _EPS)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock2D(nnx.Module):
  """diffusers' `ResnetBlock2D` without a time embedding (`temb_channels=None`)."""

  def __init__(self, cin: int, cout: int, groups: int, dtype, *, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cin, groups, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, dtype, rngs)
    self.norm2 = GroupNorm(cout, groups, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, dtype, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class SpatialSelfAttention(nnx.Module):
  """The mid block's attention: GroupNorm, one head over all H*W positions, output projection and a
  residual (diffusers' `Attention(residual_connection=True, norm_num_groups=...)`, one head of width
  C)."""

  def __init__(self, c: int, groups: int, dtype, *, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(c, groups, rngs=rngs)
    self.to_q = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
    self.to_k = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
    self.to_v = nnx.Linear(c, c, dtype=dtype, rngs=rngs)
    self.to_out = nnx.Linear(c, c, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)  # [B, T, H=1, D=C]
    out = jax.nn.dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
    return x + self.to_out(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """resnet, (attention, resnet) — diffusers' `UNetMidBlock2D` with one layer and no time input."""

  def __init__(self, c: int, groups: int, add_attention: bool, dtype, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(c, c, groups, dtype, rngs=rngs) for _ in range(2)])
    self.attention = SpatialSelfAttention(c, groups, dtype, rngs=rngs) if add_attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  """`DownEncoderBlock2D`: resnets, then a stride-2 conv padded (0, 1) on each spatial axis."""

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool, dtype,
               *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, dtype, rngs=rngs)
                             for i in range(num_layers)])
    # diffusers pads (0, 1, 0, 1) by hand and convolves with padding 0 (the LDM release's choice).
    self.downsample = _conv(cout, cout, 3, dtype, rngs, stride=2,
                            padding=((0, 1), (0, 1))) if downsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """`UpDecoderBlock2D`: resnets, then 2x nearest-neighbour upsampling and a 3x3 conv."""

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool, dtype,
               *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, dtype, rngs=rngs)
                             for i in range(num_layers)])
    self.upsample = _conv(cout, cout, 3, dtype, rngs) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsample is None:
      return x
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.upsample(x)


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dtype, g, chans = jnp.dtype(cfg.dtype), cfg.norm_num_groups, cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, chans[0], 3, dtype, rngs)
    self.down_blocks = nnx.List([
        DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(chans) - 1, dtype,
                  rngs=rngs) for i, c in enumerate(chans)])
    self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention, dtype, rngs=rngs)
    self.conv_norm_out = GroupNorm(chans[-1], g, rngs=rngs)
    self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dtype, g = jnp.dtype(cfg.dtype), cfg.norm_num_groups
    chans = tuple(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, chans[0], 3, dtype, rngs)
    self.mid_block = MidBlock(chans[0], g, cfg.mid_block_add_attention, dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(chans) - 1, dtype,
                rngs=rngs) for i, c in enumerate(chans)])
    self.conv_norm_out = GroupNorm(chans[-1], g, rngs=rngs)
    self.conv_out = _conv(chans[-1], cfg.out_channels, 3, dtype, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`encode(x) -> (mean, logvar)`, `decode(z) -> x`, `__call__(x) = decode(mean)`.

  Latents here are the VAE's own (unscaled); see `vae_to_latents` / `latents_to_vae` for the
  scaled latents a diffusion model works in.
  """

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, lc = jnp.dtype(cfg.dtype), cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = _conv(2 * lc, 2 * lc, 1, dtype, rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(lc, lc, 1, dtype, rngs) if cfg.use_post_quant_conv else None

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images `[B, H, W, in_channels]` in [-1, 1] -> (mean, logvar) of the latent Gaussian."""
    cfg = self.cfg
    f = cfg.downsample_factor
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"x: expected [B, H, W, {cfg.in_channels}] with H, W multiples of {f}, "
                       f"got {tuple(x.shape)}")
    h = self.encoder(x.astype(jnp.dtype(cfg.dtype)))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents `[B, h, w, latent_channels]` -> images `[B, h*f, w*f, out_channels]`."""
    cfg = self.cfg
    if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
      raise ValueError(f"z: expected [B, h, w, {cfg.latent_channels}], got {tuple(z.shape)}")
    z = z.astype(jnp.dtype(cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """Decodes the scaled latents of a diffusion model (what DiTPipeline hands to its VAE)."""
    return self.decode(latents_to_vae(latents, self.cfg))

  def __call__(self, x: jax.Array) -> jax.Array:
    mean, _ = self.encode(x)
    return self.decode(mean)


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A draw from the encoder's diagonal Gaussian: `mean + exp(logvar / 2) * N(0, I)`."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def vae_to_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """VAE latents -> the unit-scale latents diffusion models are trained on."""
  return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def latents_to_vae(latents: jax.Array, cfg: VAEConfig) -> jax.Array:
  """Inverse of `vae_to_latents` (diffusers: `latents / scaling_factor + shift_factor`)."""
  return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
