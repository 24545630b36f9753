"""Classifier-free guidance (Ho & Salimans 2022): a denoiser in, a denoiser out.

`out = out_uncond + scale * (out_cond - out_uncond)`; scale 1 is the conditional model, 0 the
unconditional one. The conditional and unconditional passes run as one batched forward of size 2B.
Guidance is applied to the raw model output: x0, eps and v are affine in it with the same x_t, so
guiding any of them is the same. With a learned variance only the prediction half is guided and the
variance half comes from the conditional pass, as in DiT's `forward_with_cfg`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec


@dataclasses.dataclass(frozen=True)
class _GuidedApply:
  inner: DenoiserSpec

  def __call__(self, params, x_t, t, cond):
    null = jnp.full_like(cond, self.inner.null_cond)
    out = self.inner.apply(params["inner"], jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                           jnp.concatenate([cond, null]))
    out_c, out_u = jnp.split(out.astype(jnp.float32), 2)
    scale = params["scale"]
    if not self.inner.learned_sigma:
      return out_u + scale * (out_c - out_u)
    c = out.shape[-1] // 2
    guided = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
    return jnp.concatenate([guided, out_c[..., c:]], axis=-1)


def classifier_free_guidance(denoiser: Denoiser, scale) -> Denoiser:
  """Wraps a class-conditional denoiser; `scale` stays a traced leaf, so sweeping it never
  recompiles."""
  if not isinstance(denoiser, Denoiser):
    raise TypeError(f"denoiser: expected a jaxinf Denoiser, got {type(denoiser).__name__}")
  if denoiser.spec.null_cond is None:
    raise ValueError(
        "denoiser: classifier-free guidance needs a null condition; this denoiser has none "
        "(a DiT built with class_dropout_prob = 0)")
  if not isinstance(scale, jax.core.Tracer) and not np.isfinite(np.asarray(scale)).all():
    raise ValueError(f"scale: expected a finite number, got {scale!r}")
  spec = dataclasses.replace(denoiser.spec, apply=_GuidedApply(denoiser.spec))
  return Denoiser({"inner": denoiser.params, "scale": jnp.asarray(scale, jnp.float32)}, spec)


@dataclasses.dataclass(frozen=True)
class CFG:
  """`guidance=CFG(scale)` for `sample`: classifier-free guidance at a fixed scale."""

  scale: float

  def __call__(self, denoiser: Denoiser) -> Denoiser:
    return classifier_free_guidance(denoiser, self.scale)


jax.tree_util.register_dataclass(CFG, data_fields=["scale"], meta_fields=[])
