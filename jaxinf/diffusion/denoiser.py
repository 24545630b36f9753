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
class FeatureApply:
  """The two halves of a cacheable denoiser (see `DenoiserSpec.features`)."""

  with_features: Callable[..., tuple[jax.Array, Any]]
  from_features: Callable[..., jax.Array]


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
  features: for feature caching (`jaxinf.diffusion.cache`), a `FeatureApply` pair of pure
    functions `with_features(params, x_t, t, cond) -> (out, features)` and
    `from_features(params, x_t, t, cond, features) -> out`, or None if the model has no cache.
  """

  apply: Callable[..., jax.Array]
  prediction_type: str = "epsilon"
  learned_sigma: bool = False
  sample_shape: tuple[int, ...] | None = None
  num_classes: int | None = None
  null_cond: int | None = None
  features: "FeatureApply | None" = None

  def __post_init__(self):
    if not callable(self.apply):
      raise TypeError(f"apply: expected a callable (params, x_t, t, cond) -> output, got "
                      f"{type(self.apply).__name__}")
    schedules.check_prediction_type(self.prediction_type, schedules.ALL_PREDICTION_TYPES)
    if not isinstance(self.learned_sigma, (bool, np.bool_)):
      raise TypeError(f"learned_sigma: expected a bool, got {self.learned_sigma!r}")
    if self.sample_shape is not None and (
        not isinstance(self.sample_shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
            for d in self.sample_shape)):
      raise ValueError(f"sample_shape: expected None or a tuple of positive ints, got "
                       f"{self.sample_shape!r}")
    for name in ("num_classes", "null_cond"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                or value < (1 if name == "num_classes" else 0)):
        raise ValueError(f"{name}: expected None or an int >= "
                         f"{1 if name == 'num_classes' else 0}, got {value!r}")


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
                 prediction_type: str = "epsilon",
                 features: FeatureApply | None = None) -> Denoiser:
  """Wraps a functional DiT (`jaxinf.models.functional.to_functional(DiT(...))`) as a Denoiser;
  `features` (from `dit_feature_apply`) makes it usable with feature caching."""
  return Denoiser(params, DenoiserSpec(
      apply=apply, prediction_type=prediction_type, learned_sigma=cfg.learn_sigma,
      sample_shape=cfg.sample_shape, num_classes=cfg.num_classes, null_cond=cfg.null_class,
      features=features))


def dit_feature_apply(module) -> FeatureApply:
  """The DiT's `forward_with_features` / `forward_from_features` as pure functions of the same
  params as `to_functional(module)`. Build once per model: jit caches on their identity."""
  from jaxinf.models.functional import to_functional
  return FeatureApply(to_functional(module, "forward_with_features")[0],
                      to_functional(module, "forward_from_features")[0])


@dataclasses.dataclass(frozen=True)
class _GaussianPosteriorApply:
  """E[target | x_t] for x0 ~ N(mean, U diag(lam) U^T) and x_t = a x0 + s eps at any real t.

  With Sigma = U diag(lam) U^T the posterior mean is
  E[x0 | x_t] = mean + a U diag(lam / (a^2 lam + s^2)) U^T (x_t - a mean),
  closed-form for any (a, s), so fractional timesteps cost nothing extra.
  """

  prediction_type: str
  flow: bool
  num_train_timesteps: int

  def signal_noise(self, params, t):
    """(a, s) at model time t: the inverse of the t <-> sigma map the solvers use."""
    t = t.astype(jnp.float32)
    if self.flow:
      s = t / self.num_train_timesteps  # t = sigma T (FlowSchedule)
      return 1.0 - s, s
    # VP: log sigma interpolated linearly between integer timesteps — the inverse of
    # `schedules.sigma_to_t`, diffusers' map from Karras sigmas to model timesteps; exact at
    # integer t. a = 1 / sqrt(1 + sigma^2) and s = sigma a avoid forming 1 - abar (which
    # cancels near t = 0).
    log_sigmas = params["log_sigmas"]
    lo = jnp.clip(jnp.floor(t), 0, log_sigmas.shape[0] - 2)
    w = t - lo
    lo = lo.astype(jnp.int32)
    sigma = jnp.exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1])
    a = jax.lax.rsqrt(1.0 + sigma * sigma)
    # at integer t, the float64 table itself: keeps abar = 0 exact at the last step under
    # zero-terminal SNR (the sigma table floors it at 2^-24, as diffusers does)
    idx = jnp.clip(jnp.round(t), 0, log_sigmas.shape[0] - 1).astype(jnp.int32)
    on_grid = t == jnp.round(t)
    return (jnp.where(on_grid, params["alpha"][idx], a),
            jnp.where(on_grid, params["sigma"][idx], sigma * a))

  def __call__(self, params, x_t, t, cond):
    del cond
    a, s = self.signal_noise(params, t)
    flat = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
    mu, u, lam = params["mean"], params["eigvecs"], params["eigvals"]
    a_, s_ = a[:, None], s[:, None]
    resid = (flat - a_ * mu[None]) @ u  # in the eigenbasis
    denom = a_**2 * lam[None] + s_**2
    x0 = mu[None] + (a_ * lam[None] / denom * resid) @ u.T
    # E[eps | x_t] = (x_t - a x0) / s, with the subtraction done in closed form: near t = 0 it
    # would cancel x_t against a x0 and lose ~1/s of fp32 precision
    eps = (s_ / denom * resid) @ u.T
    if self.flow:
      out = eps - x0  # the rectified-flow velocity dx/dsigma
    elif self.prediction_type == "epsilon":
      out = eps
    elif self.prediction_type == "sample":
      out = x0
    else:
      out = a_ * eps - s_ * x0  # v (Salimans & Ho 2022)
    return out.reshape(x_t.shape)


def gaussian_denoiser(mean, cov, schedule: "schedules.NoiseSchedule | schedules.FlowSchedule",
                      prediction_type: str = "epsilon") -> Denoiser:
  """The exact (Bayes-optimal) denoiser for data `x0 ~ N(mean, cov)` under `schedule`.

  For Gaussian data the posterior mean is closed-form, so any sampler driven by this denoiser
  should reproduce N(mean, cov) up to its own discretisation error: an oracle for solver tests.
  Samples are flattened to vectors of `len(mean)` entries.

  It is exact at every real timestep, not only at the integer ones: on a `NoiseSchedule` the model
  time t maps to sigma by interpolating log sigma between integer timesteps (the inverse of
  `schedules.sigma_to_t`, which the Karras-sigma solvers use to time their model calls); on a
  `FlowSchedule` (`x_t = (1 - s) x0 + s eps`, t = s T, Esser et al. 2024) it predicts the
  velocity `eps - x0` and `prediction_type` must be "flow".
  """
  mean = np.asarray(mean, np.float64)
  cov = np.asarray(cov, np.float64)
  if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
    raise ValueError(f"cov: expected shape {(mean.shape[0],) * 2} for mean of shape "
                     f"{mean.shape}, got {cov.shape}")
  if not np.allclose(cov, cov.T):
    raise ValueError("cov: expected a symmetric matrix")
  lam, u = np.linalg.eigh(cov)
  if lam.min() < 0:
    raise ValueError(f"cov: expected a positive semi-definite matrix, smallest eigenvalue {lam.min()}")
  params = {"mean": jnp.asarray(mean, jnp.float32), "eigvecs": jnp.asarray(u, jnp.float32),
            "eigvals": jnp.asarray(lam, jnp.float32)}
  if isinstance(schedule, schedules.FlowSchedule):
    schedules.check_prediction_type(prediction_type, schedules.FLOW_PREDICTION_TYPES)
    flow = True
  elif isinstance(schedule, schedules.NoiseSchedule):
    schedules.check_prediction_type(prediction_type)
    flow = False
    abar = schedule.alphas_cumprod
    params.update(log_sigmas=jnp.asarray(np.log(schedule.sigmas), jnp.float32),
                  alpha=jnp.asarray(np.sqrt(abar), jnp.float32),
                  sigma=jnp.asarray(np.sqrt(1.0 - abar), jnp.float32))
  else:
    raise TypeError(f"schedule: expected a NoiseSchedule or FlowSchedule, got "
                    f"{type(schedule).__name__}")
  apply = _GaussianPosteriorApply(prediction_type, flow, schedule.num_train_timesteps)
  return Denoiser(params, DenoiserSpec(apply=apply, prediction_type=prediction_type))
