"""Solver step rules: one frozen dataclass per solver, each with

- `timesteps(schedule, steps)`: the training timesteps visited, decreasing;
- `table(schedule, steps)`: every per-step coefficient, computed once in float64 numpy and handed to
  the scan as `[steps]` arrays — the loop body never branches on the step index;
- `step(x, model_output, variance_values, c, noise, state, prediction_type)`: the same arithmetic
  for every step, given that step's row `c` of the table.

Formulas and option names follow diffusers' DDPMScheduler / DDIMScheduler so that trajectories
can be compared with them step by step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
Table = dict[str, np.ndarray]


def _check_common(solver) -> None:
  schedules._check_choice("spacing", solver.spacing, schedules.TIMESTEP_SPACINGS)
  if not isinstance(solver.steps_offset, int) or solver.steps_offset < 0:
    raise ValueError(f"steps_offset: expected an int >= 0, got {solver.steps_offset!r}")
  if not solver.clip_sample_range > 0:
    raise ValueError(f"clip_sample_range: expected > 0, got {solver.clip_sample_range}")


def _clip_x0(solver, x0: jax.Array) -> jax.Array:
  if solver.clip_sample:
    return jnp.clip(x0, -solver.clip_sample_range, solver.clip_sample_range)
  return x0


@dataclasses.dataclass(frozen=True)
class DDPM:
  """Ancestral sampling (Ho et al. 2020, Algorithm 2) on a possibly respaced timestep grid.

  Between visited timesteps t > t' the step uses the respaced beta `1 - abar_t / abar_t'`
  (Nichol & Dhariwal 2021, Sec. 4): posterior mean (eq. 7 of Ho et al.) from the predicted x0, and
  variance `fixed_small` (the posterior variance beta-tilde), `fixed_large` (beta) or
  `learned_range` (improved DDPM eq. 15: the model's v in [-1, 1] interpolates the log variance).
  No noise is added at t = 0.
  """

  variance_type: str = "fixed_small"
  spacing: str = "leading"
  steps_offset: int = 0
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  stochastic = True

  def __post_init__(self):
    schedules._check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
    _check_common(self)

  def timesteps(self, schedule: schedules.NoiseSchedule, steps: int) -> np.ndarray:
    return schedules.spaced_timesteps(
        schedule.num_train_timesteps, steps, self.spacing, self.steps_offset)

  def table(self, schedule: schedules.NoiseSchedule, steps: int) -> Table:
    ts = self.timesteps(schedule, steps)
    abar = schedule.alphas_cumprod
    abar_t = abar[ts]
    # the previous timestep is the next one visited; after the last, abar = 1 (x_{-1} = x_0).
    abar_prev = np.append(abar[ts[1:]], 1.0)
    beta_t = 1.0 - abar_t / abar_prev
    var_small = np.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
    return _f32(
        t=ts, alpha_bar=abar_t,
        coef_x0=np.sqrt(abar_prev) * beta_t / (1.0 - abar_t),
        coef_xt=np.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t),
        log_var_small=np.log(var_small), log_beta=np.log(beta_t),
        noise_mask=(ts > 0).astype(np.float64))

  def init_state(self, x: jax.Array) -> Any:
    return ()

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    x0, _ = schedules.predict_x0_eps(model_output, x, c["alpha_bar"], prediction_type)
    x0 = _clip_x0(self, x0)
    mean = c["coef_x0"] * x0 + c["coef_xt"] * x
    if self.variance_type == "fixed_small":
      log_var = c["log_var_small"]
    elif self.variance_type == "fixed_large":
      log_var = c["log_beta"]
    else:
      frac = (variance_values.astype(jnp.float32) + 1.0) / 2.0
      log_var = frac * c["log_beta"] + (1.0 - frac) * c["log_var_small"]
    return mean + c["noise_mask"] * jnp.exp(0.5 * log_var) * noise, state


@dataclasses.dataclass(frozen=True)
class DDIM:
  """DDIM (Song et al. 2021, eq. 12) with stochasticity eta >= 0 (eq. 16; eta = 1 is DDPM's
  posterior variance, eta = 0 the deterministic sampler).

  As in diffusers, the previous timestep is `t - T // steps` and `set_alpha_to_one` decides
  whether the step past t = 0 lands on abar = 1 or on abar_0.
  """

  eta: float = 0.0
  spacing: str = "leading"
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.eta, (int, float)) and np.isfinite(self.eta) and self.eta >= 0):
      raise ValueError(f"eta: expected a finite number >= 0, got {self.eta!r}")
    _check_common(self)

  @property
  def stochastic(self) -> bool:
    return self.eta > 0

  def timesteps(self, schedule: schedules.NoiseSchedule, steps: int) -> np.ndarray:
    return schedules.spaced_timesteps(
        schedule.num_train_timesteps, steps, self.spacing, self.steps_offset)

  def table(self, schedule: schedules.NoiseSchedule, steps: int) -> Table:
    ts = self.timesteps(schedule, steps)
    abar = schedule.alphas_cumprod
    prev = ts - schedule.num_train_timesteps // steps
    final = 1.0 if self.set_alpha_to_one else abar[0]
    abar_t = abar[ts]
    abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = self.eta * np.sqrt(var)
    dir_sq = 1.0 - abar_prev - std**2
    if dir_sq.min() < -1e-12:
      eta_max = float(np.min(np.sqrt((1.0 - abar_prev) / np.maximum(var, 1e-300))))
      raise ValueError(
          f"eta: {self.eta} makes the noise variance exceed 1 - abar_prev at some step of this "
          f"schedule with {steps} steps; the largest eta it allows is {eta_max:.4g}")
    return _f32(t=ts, alpha_bar=abar_t, sqrt_alpha_bar_prev=np.sqrt(abar_prev),
                coef_eps=np.sqrt(np.maximum(dir_sq, 0.0)), std=std)

  def init_state(self, x: jax.Array) -> Any:
    return ()

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values  # DDIM uses its own variance
    x0, eps = schedules.predict_x0_eps(model_output, x, c["alpha_bar"], prediction_type)
    x0 = _clip_x0(self, x0)
    x_prev = c["sqrt_alpha_bar_prev"] * x0 + c["coef_eps"] * eps
    if noise is not None:
      x_prev = x_prev + c["std"] * noise
    return x_prev, state


def _f32(**columns: np.ndarray) -> Table:
  return {k: np.asarray(v, np.float32) for k, v in columns.items()}


SOLVERS = {"ddpm": DDPM, "ddim": DDIM}


def make_solver(name: str, **options: Any):
  """A solver by name (`ddpm`, `ddim`) with its options; unknown names or options raise."""
  if name not in SOLVERS:
    raise ValueError(f"name: unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
  cls = SOLVERS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"options: {cls.__name__} has no option(s) {unknown}; known: {sorted(fields)}")
  return cls(**options)
