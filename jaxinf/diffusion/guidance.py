"""Classifier-free guidance (Ho & Salimans 2022): a denoiser in, a denoiser out.

`out = out_uncond + scale * (out_cond - out_uncond)`; scale 1 is the conditional model, 0 the
unconditional one. The conditional and unconditional passes run as one batched forward of size 2B.
Guidance is applied to the raw model output: x0, eps and v are affine in it with the same x_t, so
guiding any of them is the same. With a learned variance only the prediction half is guided and the
variance half comes from the conditional pass, as in DiT's `forward_with_cfg`.

`guided_channels=k` guides only the first k prediction channels and takes the rest from the
conditional pass. The DiT release's `forward_with_cfg` (and its `sample.py`) guide the first 3 of
the 4 latent channels "for exact reproducibility"; pass `guided_channels=3` to reproduce its
samples. diffusers' `DiTPipeline` guides all `in_channels` latent channels (the default here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec, FeatureApply


@dataclasses.dataclass(frozen=True)
class _GuidedApply:
  inner: DenoiserSpec
  guided_channels: int | None = None

  def __call__(self, params, x_t, t, cond):
    return self.combine(params, self.inner.apply(params["inner"], *self.batch(x_t, t, cond)))

  def batch(self, x_t, t, cond):
    """The conditional and unconditional inputs as one batch of 2B."""
    null = jnp.full_like(cond, self.inner.null_cond)
    return jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([cond, null])

  def combine(self, params, out):
    out_c, out_u = jnp.split(out.astype(jnp.float32), 2)
    scale = params["scale"]
    c = out.shape[-1] // 2 if self.inner.learned_sigma else out.shape[-1]
    if self.guided_channels is not None:
      c = self.guided_channels
    if c == out.shape[-1]:
      return out_u + scale * (out_c - out_u)
    guided = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
    return jnp.concatenate([guided, out_c[..., c:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class _GuidedWithFeatures:
  guided: _GuidedApply

  def __call__(self, params, x_t, t, cond):
    out, features = self.guided.inner.features.with_features(
        params["inner"], *self.guided.batch(x_t, t, cond))
    return self.guided.combine(params, out), features


@dataclasses.dataclass(frozen=True)
class _GuidedFromFeatures:
  guided: _GuidedApply

  def __call__(self, params, x_t, t, cond, features):
    out = self.guided.inner.features.from_features(
        params["inner"], *self.guided.batch(x_t, t, cond), features)
    return self.guided.combine(params, out)


def classifier_free_guidance(denoiser: Denoiser, scale, *,
                             guided_channels: int | None = None) -> Denoiser:
  """Wraps a class-conditional denoiser; `scale` stays a traced leaf, so sweeping it never
  recompiles. `guided_channels`: guide only the first k prediction channels (None: all)."""
  if not isinstance(denoiser, Denoiser):
    raise TypeError(f"denoiser: expected a jaxinf Denoiser, got {type(denoiser).__name__}")
  if denoiser.spec.null_cond is None:
    raise ValueError(
        "denoiser: classifier-free guidance needs a null condition; this denoiser has none "
        "(a DiT built with class_dropout_prob = 0)")
  if not isinstance(scale, jax.core.Tracer) and not np.isfinite(np.asarray(scale)).all():
    raise ValueError(f"scale: expected a finite number, got {scale!r}")
  _check_guided_channels(guided_channels, denoiser.spec)
  guided = _GuidedApply(denoiser.spec, guided_channels)
  features = None
  if denoiser.spec.features is not None:  # the cached features then hold both halves' (2B rows)
    features = FeatureApply(_GuidedWithFeatures(guided), _GuidedFromFeatures(guided))
  spec = dataclasses.replace(denoiser.spec, apply=guided, features=features)
  return Denoiser({"inner": denoiser.params, "scale": jnp.asarray(scale, jnp.float32)}, spec)


def _check_guided_channels(guided_channels, spec: DenoiserSpec) -> None:
  if guided_channels is None:
    return
  if isinstance(guided_channels, bool) or not isinstance(guided_channels, (int, np.integer)):
    raise TypeError(f"guided_channels: expected an int or None, got {guided_channels!r}")
  # the prediction has the sample's channel count (the variance half, if any, comes after it)
  hi = spec.sample_shape[-1] if spec.sample_shape is not None else None
  if guided_channels < 1 or (hi is not None and guided_channels > hi):
    raise ValueError(f"guided_channels: expected in [1, {hi if hi is not None else 'C'}] "
                     f"(the prediction's channels), got {guided_channels}")


@dataclasses.dataclass(frozen=True)
class CFG:
  """`guidance=CFG(scale)` for `sample`: classifier-free guidance at a fixed scale;
  `CFG(scale, guided_channels=3)` guides only the first 3 channels as the DiT release does."""

  scale: float
  guided_channels: int | None = None

  def __call__(self, denoiser: Denoiser) -> Denoiser:
    return classifier_free_guidance(denoiser, self.scale, guided_channels=self.guided_channels)


jax.tree_util.register_dataclass(CFG, data_fields=["scale"], meta_fields=["guided_channels"])
