"""Variance-preserving noise schedules, timestep spacings and prediction-type conversions.

Notation (Ho et al. 2020): `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `abar_t = prod_{s<=t}
(1 - beta_s)` for training timesteps `t = 0 .. T-1`. Tables are computed once, in float64 numpy,
outside any compiled loop; option names follow diffusers' scheduler configs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}: unknown value {value!r}; expected one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A discrete VP schedule over `num_train_timesteps` training steps.

  - `linear`: betas evenly spaced in [beta_start, beta_end] (DDPM).
  - `scaled_linear`: sqrt(betas) evenly spaced (latent diffusion / Stable Diffusion).
  - `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal 2021, eq. 17, with
    abar(t) = cos²((t/T + 0.008)/1.008 · π/2) and betas capped at 0.999.
  """

  beta_schedule: str = "linear"
  num_train_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def __post_init__(self):
    _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
    if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
      raise ValueError(
          f"num_train_timesteps: expected a positive int, got {self.num_train_timesteps!r}")
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(
          f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got "
          f"{self.beta_start}, {self.beta_end}")

  @property
  def betas(self) -> np.ndarray:
    n = self.num_train_timesteps
    if self.beta_schedule == "linear":
      return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
    if self.beta_schedule == "scaled_linear":
      return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """abar_t for t = 0 .. T-1, float64."""
    return np.cumprod(1.0 - self.betas)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> np.ndarray:
  """The `steps` training timesteps a sampler visits, in decreasing order (diffusers' conventions).

  - `leading`: `arange(steps) * (T // steps)`, reversed, plus `steps_offset` (DDIM paper, SD).
  - `trailing`: `round(arange(T, 0, -T/steps)) - 1` (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Table 2) — always starts at T-1.
  - `linspace`: `round(linspace(0, T-1, steps))`, reversed.
  """
  _check_choice("spacing", spacing, TIMESTEP_SPACINGS)
  check_steps(steps, num_train_timesteps)
  t_max = num_train_timesteps
  if spacing == "leading":
    ratio = t_max // steps
    ts = (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(t_max, 0, -t_max / steps)).astype(np.int64) - 1
  else:
    ts = np.linspace(0, t_max - 1, steps).round()[::-1].astype(np.int64)
  if ts.min() < 0 or ts.max() >= t_max:
    raise ValueError(
        f"steps_offset: timesteps {ts.min()}..{ts.max()} fall outside [0, {t_max}) "
        f"with steps_offset={steps_offset}")
  return ts


def check_steps(steps, num_train_timesteps: int) -> None:
  """steps must be an int in [1, num_train_timesteps]."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
    raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
  if not 1 <= steps <= num_train_timesteps:
    raise ValueError(
        f"steps: expected 1 <= steps <= num_train_timesteps ({num_train_timesteps}), got {steps}")


def check_prediction_type(prediction_type: str) -> None:
  _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def predict_x0_eps(model_output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) implied by a model output at noise level `alpha_bar`, in fp32.

  epsilon: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar).
  sample:  eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
  v_prediction (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1-abar) x0):
           x0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(abar) v + sqrt(1-abar) x_t.
  """
  check_prediction_type(prediction_type)
  out = model_output.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  a = jnp.sqrt(alpha_bar)
  s = jnp.sqrt(1.0 - alpha_bar)
  if prediction_type == "epsilon":
    return (x_t - s * out) / a, out
  if prediction_type == "sample":
    return out, (x_t - a * out) / s
  return a * x_t - s * out, a * out + s * x_t


def training_target(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array,
                    prediction_type: str) -> jax.Array:
  """What a model of `prediction_type` is trained to output for `x_t = sqrt(abar) x0 + ... eps`."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return eps
  if prediction_type == "sample":
    return x0
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def add_noise(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """q(x_t | x_0) sample: sqrt(abar) x0 + sqrt(1 - abar) eps."""
  return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * eps
