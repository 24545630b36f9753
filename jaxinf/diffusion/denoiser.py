"""The denoiser contract: `denoise(params, x_t, t, cond) -> model_output` plus its static facts.

A `Denoiser` is a pytree whose only leaves are `params`, so it passes through `jax.jit` as an
argument (weights are traced, never baked in as constants) while the `DenoiserSpec` — the pure
`apply` function, the prediction type, the shape it was built for — is static and hashable.
Guidance and caching wrap a denoiser and return a denoiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
  """Static description of a denoiser.

  apply: `(params, x_t [B, ...], t [B] float, cond) -> [B, ..., C or 2C]`.
  prediction_type: `epsilon`, `v_prediction` or `sample` on a VP schedule, or `flow` (the velocity
    eps - x0 of a rectified flow) — what the output means.
  learned_sigma: the output carries a second half of channels in [-1, 1] that interpolates the log
    variance between the posterior and beta (improved DDPM, eq. 15).
  sample_shape: the per-sample shape the model was built for (checked before tracing), or None.
  num_classes: labels must lie in [0, num_classes) (plus `null_cond`), or None if unconditional.
  null_cond: the label meaning "no condition", used by classifier-free guidance, or None.
  """

  apply: Callable[..., jax.Array]
  prediction_type: str = "epsilon"
  learned_sigma: bool = False
  sample_shape: tuple[int, ...] | None = None
  num_classes: int | None = None
  null_cond: int | None = None

  def __post_init__(self):
    schedules.check_prediction_type(self.prediction_type, schedules.ALL_PREDICTION_TYPES)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  params: Any
  spec: DenoiserSpec

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
    return self.spec.apply(self.params, x_t, t, cond)


jax.tree_util.register_dataclass(Denoiser, data_fields=["params"], meta_fields=["spec"])


def check_call(denoiser: Denoiser, shape: tuple[int, ...], cond: Any) -> None:
  """Validates a sampling request against the denoiser before anything is traced."""
  if not isinstance(denoiser, Denoiser):
    raise TypeError(f"denoiser: expected a jaxinf Denoiser, got {type(denoiser).__name__}")
  spec = denoiser.spec
  if (not isinstance(shape, tuple) or len(shape) < 2
      or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
    raise ValueError(f"shape: expected a tuple of positive ints [B, ...], got {shape!r}")
  if spec.sample_shape is not None and tuple(shape[1:]) != tuple(spec.sample_shape):
    raise ValueError(
        f"shape: the denoiser was built for samples of shape {tuple(spec.sample_shape)}, "
        f"got {tuple(shape[1:])} (batch shape {shape})")
  if spec.num_classes is None:
    if cond is not None and spec.null_cond is None:
      pass  # an unconditional model may still take a condition it ignores; nothing to check
    return
  if cond is None:
    raise ValueError("cond: this denoiser is class-conditional; pass labels of shape [B]")
  if tuple(np.shape(cond)) != (shape[0],):
    raise ValueError(f"cond: expected labels of shape [{shape[0]}], got {tuple(np.shape(cond))}")
  if not jnp.issubdtype(jnp.result_type(cond), jnp.integer):
    raise TypeError(f"cond: expected integer class labels, got dtype {jnp.result_type(cond)}")
  if isinstance(cond, jax.core.Tracer):
    return
  values = np.asarray(cond)
  hi = spec.num_classes + (1 if spec.null_cond is not None else 0)
  if values.min() < 0 or values.max() >= hi:
    raise ValueError(
        f"cond: class labels must lie in [0, {spec.num_classes})"
        f"{' or be the null class ' + str(spec.null_cond) if spec.null_cond is not None else ''}, "
        f"got values in [{values.min()}, {values.max()}]")


def dit_denoiser(apply: Callable[..., jax.Array], params: Any, cfg, *,
                 prediction_type: str = "epsilon") -> Denoiser:
  """Wraps a functional DiT (`jaxinf.models.functional.to_functional(DiT(...))`) as a Denoiser."""
  return Denoiser(params, DenoiserSpec(
      apply=apply, prediction_type=prediction_type, learned_sigma=cfg.learn_sigma,
      sample_shape=cfg.sample_shape, num_classes=cfg.num_classes, null_cond=cfg.null_class))


@dataclasses.dataclass(frozen=True)
class _GaussianPosteriorApply:
  prediction_type: str

  def __call__(self, params, x_t, t, cond):
    del cond
    idx = jnp.round(t).astype(jnp.int32)
    abar = params["alphas_cumprod"][idx].reshape((-1,) + (1,) * (x_t.ndim - 1))
    flat = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
    mu = params["mean"]
    # E[x0 | x_t] = mu + gain_t (x_t - sqrt(abar_t) mu), gain_t = sqrt(abar) Σ (abar Σ + (1-abar) I)^-1
    resid = flat - jnp.sqrt(abar.reshape(-1, 1)) * mu[None]
    x0 = (mu[None] + jnp.einsum("bij,bj->bi", params["gain"][idx], resid)).reshape(x_t.shape)
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return schedules.training_target(x0, eps, abar, self.prediction_type)


def gaussian_denoiser(mean, cov, schedule: schedules.NoiseSchedule,
                      prediction_type: str = "epsilon") -> Denoiser:
  """The exact (Bayes-optimal) denoiser for data `x0 ~ N(mean, cov)` under `schedule`.

  For Gaussian data the posterior mean is closed-form, so any sampler driven by this denoiser
  should reproduce N(mean, cov) up to its own discretisation error: an oracle for solver tests.
  Samples are flattened to vectors of `len(mean)` entries; the per-timestep gain matrices are
  precomputed in float64.
  """
  mean = np.asarray(mean, np.float64)
  cov = np.asarray(cov, np.float64)
  if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
    raise ValueError(f"cov: expected shape {(mean.shape[0],) * 2} for mean of shape "
                     f"{mean.shape}, got {cov.shape}")
  abar = schedule.alphas_cumprod
  eye = np.eye(mean.shape[0])
  marginal = abar[:, None, None] * cov[None] + (1.0 - abar)[:, None, None] * eye[None]
  # gain = sqrt(abar) Σ M^-1, computed as the transpose of solve(M, sqrt(abar) Σ) (both symmetric)
  gain = np.swapaxes(np.linalg.solve(marginal, np.sqrt(abar)[:, None, None] * cov[None]), 1, 2)
  params = {"mean": jnp.asarray(mean, jnp.float32), "gain": jnp.asarray(gain, jnp.float32),
            "alphas_cumprod": jnp.asarray(abar, jnp.float32)}
  return Denoiser(params, DenoiserSpec(apply=_GaussianPosteriorApply(prediction_type),
                                       prediction_type=prediction_type))
