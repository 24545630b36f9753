"""Variance-preserving noise schedules, timestep spacings and prediction-type conversions.

Notation (Ho et al. 2020): `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `abar_t = prod_{s<=t}
(1 - beta_s)` for training timesteps `t = 0 .. T-1`. Tables are computed once, in float64 numpy,
outside any compiled loop; option names follow diffusers' scheduler configs.

`NoiseSchedule(dtype="float32")` builds the training-step buffers (betas, abar, the noise levels)
the way diffusers does, in float32 (see `NoiseSchedule`), for replaying a diffusers run exactly;
`jaxinf.diffusion.from_diffusers` uses it by default.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_bool_fields

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# the precision the schedule's training-step buffers are built in (`NoiseSchedule.dtype`)
TABLE_DTYPES = ("float64", "float32")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# what a denoiser on a variance-preserving schedule may predict
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# a rectified-flow denoiser predicts the velocity dx/dsigma = eps - x0 (Liu et al. 2023; SD3)
FLOW_PREDICTION_TYPES = ("flow",)
ALL_PREDICTION_TYPES = PREDICTION_TYPES + FLOW_PREDICTION_TYPES


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

  `dtype` is the precision of the training-step buffers (`betas`, `alphas_cumprod`, `sigmas`,
  `log_sigmas`), which every solver's table is computed from:

  - `"float64"` (default): exact to float64; the most accurate table.
  - `"float32"`: built as diffusers' schedulers build theirs (diffusers 0.42.1, torch's CPU
    kernels): betas from a float32 `torch.linspace` (start + step·i rounded once, as the fused
    multiply-add of torch's x86-64 kernel), alphas = 1 - betas and the zero-terminal-SNR rescaling
    in float32 arithmetic, abar as torch's float32 `cumprod` (a float64 running product, each
    entry rounded to float32), sigma = sqrt((1 - abar) / abar) and its log in float32. Where abar
    is near 1 or tiny this differs from the float64 table by far more than float32 sampling
    arithmetic does (linear betas: sigma_0 moves by ~1e-4 relative, since 1 - abar_0 = 1e-4 keeps
    only a few bits in float32), so replaying a diffusers run step for step needs it. The buffers
    are still returned as float64 arrays (holding float32 values): the solvers' own arithmetic on
    them stays float64 either way.
  """

  beta_schedule: str = "linear"
  num_train_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  rescale_betas_zero_snr: bool = False
  dtype: str = "float64"

  def __post_init__(self):
    _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
    if not isinstance(self.dtype, str):
      raise TypeError(f"dtype: expected one of {list(TABLE_DTYPES)} (a str), got {self.dtype!r}")
    _check_choice("dtype", self.dtype, TABLE_DTYPES)
    check_bool_fields(self)
    if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
      raise ValueError(
          f"num_train_timesteps: expected a positive int, got {self.num_train_timesteps!r}")
    for name in ("beta_start", "beta_end"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(
          f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got "
          f"{self.beta_start}, {self.beta_end}")

  @property
  def betas(self) -> np.ndarray:
    betas = self._base_betas()
    if not self.rescale_betas_zero_snr:
      return betas
    if self.dtype == "float32":
      return _rescale_zero_terminal_snr_f32(betas)
    return rescale_zero_terminal_snr(betas)

  def _base_betas(self) -> np.ndarray:
    n = self.num_train_timesteps
    if self.dtype == "float32":
      if self.beta_schedule == "linear":
        return _torch_linspace_f32(self.beta_start, self.beta_end, n).astype(np.float64)
      if self.beta_schedule == "scaled_linear":
        root = _torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
        return (root * root).astype(np.float64)
    if self.beta_schedule == "linear":
      return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
    if self.beta_schedule == "scaled_linear":
      return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    # diffusers computes the cosine betas in Python floats and stores them as float32
    return betas.astype(np.float32).astype(np.float64) if self.dtype == "float32" else betas

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """abar_t for t = 0 .. T-1 as float64 (exactly 0 at T-1 under zero-terminal-SNR rescaling);
    float32 values under `dtype="float32"`."""
    if self.dtype == "float32":
      alphas = 1.0 - self.betas.astype(np.float32)
      # torch's CPU cumprod keeps a float64 running product and rounds each entry to float32
      abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)
    else:
      abar = np.cumprod(1.0 - self.betas)
    if self.rescale_betas_zero_snr:
      abar[-1] = 0.0  # cumprod leaves ~1e-17 of rounding where the rescaling means exactly 0
    return abar

  @property
  def sigmas(self) -> np.ndarray:
    """The variance-exploding noise level sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al.
    2022, Table 1, VP column), t = 0 .. T-1. Under zero-terminal SNR sigma_{T-1} is infinite; as
    diffusers does, abar_{T-1} is floored at 2^-24 here so that sigma-space solvers stay finite.
    Computed in float32 (diffusers' arithmetic) under `dtype="float32"`."""
    abar = self.alphas_cumprod.copy()
    if self.rescale_betas_zero_snr:
      abar[-1] = 2.0**-24
    if self.dtype == "float32":
      abar = abar.astype(np.float32)
      return np.sqrt((np.float32(1.0) - abar) / abar).astype(np.float64)
    return np.sqrt((1.0 - abar) / abar)

  @property
  def log_sigmas(self) -> np.ndarray:
    """log sigma_t, the table `sigma_to_t` interpolates in (float32 logs under `dtype="float32"`,
    as diffusers takes `np.log` of its float32 sigmas)."""
    if self.dtype == "float32":
      return np.log(self.sigmas.astype(np.float32)).astype(np.float64)
    return np.log(self.sigmas)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(start, end, n, dtype=torch.float32)` on CPU: step = (end - start) / (n - 1)
  in float32; the first half counts up from start, the second down from end, each entry
  start + step * i rounded once (the fused multiply-add torch's x86-64 kernel compiles to; a
  float64 product of a float32 step and an integer below 2^29 is exact)."""
  lo, hi = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([lo])
  step = (hi - lo) / np.float32(n - 1)
  i = np.arange(n, dtype=np.float64)
  up = np.float64(lo) + np.float64(step) * i
  down = np.float64(hi) - np.float64(step) * (n - 1 - i)
  return np.where(np.arange(n) < n // 2, up, down).astype(np.float32)


def _rescale_zero_terminal_snr_f32(betas: np.ndarray) -> np.ndarray:
  """`rescale_zero_terminal_snr` in float32 arithmetic, step for step as diffusers' torch code
  (cumprod as torch's: a float64 running product rounded to float32)."""
  alphas = np.float32(1.0) - betas.astype(np.float32)
  sqrt_abar = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = sqrt_abar - last
  sqrt_abar = sqrt_abar * (first / (first - last))
  abar = sqrt_abar**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Algorithm 1:
  shift and scale sqrt(abar) so that it is unchanged at t = 0 and exactly 0 at t = T-1."""
  sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
  """A rectified-flow / flow-matching schedule: `x_sigma = (1 - sigma) x0 + sigma eps`, sigma in
  (0, 1], model time `t = sigma * num_train_timesteps` (SD3, Esser et al. 2024, Sec. 2).

  Timestep shifting (Esser et al. 2024, eq. 23) moves the grid towards high noise:
  - static: `sigma' = shift sigma / (1 + (shift - 1) sigma)`;
  - dynamic (resolution-dependent, `mu` given, e.g. from `dynamic_shift_mu(image_seq_len)`), the
    exponential form of FLUX: `sigma' = e^mu / (e^mu + (1/sigma - 1))`.
  """

  num_train_timesteps: int = 1000
  shift: float = 1.0
  mu: float | None = None

  def __post_init__(self):
    if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
      raise ValueError(
          f"num_train_timesteps: expected an int >= 2, got {self.num_train_timesteps!r}")
    if not (isinstance(self.shift, (int, float)) and np.isfinite(self.shift) and self.shift > 0):
      raise ValueError(f"shift: expected a finite number > 0, got {self.shift!r}")
    if self.mu is not None:
      if not (isinstance(self.mu, (int, float)) and np.isfinite(self.mu)):
        raise ValueError(f"mu: expected a finite number or None, got {self.mu!r}")
      if self.shift != 1.0:
        raise ValueError(f"shift: a dynamic shift (mu={self.mu}) replaces the static shift; "
                         f"leave shift at 1.0, got {self.shift}")

  def apply_shift(self, sigma: np.ndarray) -> np.ndarray:
    sigma = np.asarray(sigma, np.float64)
    if self.mu is not None:
      return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / sigma - 1.0))
    return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """FLUX's resolution-dependent shift exponent: linear in the number of latent tokens, from
  `base_shift` at `base_seq_len` to `max_shift` at `max_seq_len` (diffusers' `calculate_shift`)."""
  if not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
    raise ValueError(f"image_seq_len: expected a positive int, got {image_seq_len!r}")
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return float(base_shift + slope * (image_seq_len - base_seq_len))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  """EDM's noise levels (Karras et al. 2022, eq. 5): evenly spaced in sigma^(1/rho), decreasing."""
  for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
        not np.isfinite(value) or value <= 0):
      raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
  if sigma_min > sigma_max:
    raise ValueError(f"sigma_min, sigma_max: expected sigma_min <= sigma_max, got {sigma_min}, "
                     f"{sigma_max}")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n: expected an int >= 1, got {n!r}")
  ramp = np.linspace(0.0, 1.0, n)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """The fractional training timestep whose noise level is `sigma`: linear interpolation of log
  sigma between the two neighbouring integer timesteps (clipped to [0, T-1]); the convention
  diffusers uses to feed Karras sigmas to a model trained on integer timesteps."""
  sigma = np.atleast_1d(np.asarray(sigma, np.float64))
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  # index of the last training level at or below each sigma, kept one short of the end
  low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
  return (1.0 - w) * low + w * (low + 1)


def dynamic_threshold(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample, s = the `ratio`
  quantile of |x0| clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


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


def check_prediction_type(prediction_type: str, choices: tuple[str, ...] = PREDICTION_TYPES) -> None:
  _check_choice("prediction_type", prediction_type, choices)


def x0_from_output(model_output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
                   prediction_type: str) -> jax.Array:
  """x0 implied by a model output at `x_t = alpha x0 + sigma eps`, in fp32: the conversion of
  `predict_x0_eps` written with alpha_t, sigma_t (DPM-Solver's notation, Lu et al. 2022b, eq. 3)."""
  check_prediction_type(prediction_type)
  out = model_output.astype(jnp.float32)
  if prediction_type == "epsilon":
    return (x_t - sigma * out) / alpha
  if prediction_type == "sample":
    return out
  return alpha * x_t - sigma * out


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


def predict_x0_eps_as(model_output: jax.Array, x_t: jax.Array, alpha: jax.Array,
                      sigma: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """`predict_x0_eps` given alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) directly."""
  check_prediction_type(prediction_type)
  out = model_output.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  if prediction_type == "epsilon":
    return (x_t - sigma * out) / alpha, out
  if prediction_type == "sample":
    return out, (x_t - alpha * out) / sigma
  return alpha * x_t - sigma * out, alpha * out + sigma * x_t


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
