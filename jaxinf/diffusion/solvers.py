"""Solver step rules: one frozen dataclass per solver, each meeting the `Solver` protocol below
(the contract the sampling driver relies on, and the only thing it knows about a solver):

- `table(schedule, steps)`: every per-step coefficient, computed once in float64 numpy and handed to
  the scan as `[rows]` arrays — the loop body never branches on the step index;
- `step(x, model_output, variance_values, c, noise, state, prediction_type)`: the same arithmetic
  for every step, given that step's row `c` of the table;
- `init_state(x)`: the fixed-shape state the step carries from row to row;

with defaults in `_Solver` for what most solvers don't change (`model_input`, `init_noise_scale`,
`init_state`, `check`).

A table row is one model evaluation. Two-stage methods (Heun) interleave their stages as rows, as
diffusers does, so a table may have more rows than `steps`; a 0/1 column says which stage a row is.
Multistep history (DPM-Solver++, UniPC) lives in the fixed-shape `state`.

Formulas and option names follow diffusers' schedulers of the same name so that trajectories
can be compared with them step by step (`tests/parity/test_schedulers_vs_diffusers.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_bool_fields, strict_config
from jaxinf.diffusion import schedules

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
Table = dict[str, np.ndarray]


def _check_common(solver) -> None:
  schedules._check_choice("spacing", solver.spacing, schedules.TIMESTEP_SPACINGS)
  if not isinstance(solver.steps_offset, int) or solver.steps_offset < 0:
    raise ValueError(f"steps_offset: expected an int >= 0, got {solver.steps_offset!r}")
  _check_x0_options(solver)


def _check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
  """A real number (not a bool) in [lo, hi] (or (lo, hi] with lo_open)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name}: expected a number, got {value!r}")
  if not (np.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi):
    raise ValueError(f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got "
                     f"{value!r}")


def _check_original_steps(solver) -> None:
  steps = solver.original_inference_steps
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"original_inference_steps: expected a positive int (the step count the "
                     f"consistency model was distilled with), got {steps!r}")


def _check_x0_options(solver) -> None:
  check_bool_fields(solver)
  if not getattr(solver, "clip_sample_range", 1.0) > 0:
    raise ValueError(f"clip_sample_range: expected > 0, got {solver.clip_sample_range}")
  ratio = getattr(solver, "dynamic_thresholding_ratio", 0.995)
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"dynamic_thresholding_ratio: expected a value in (0, 1], got {ratio}")
  # below 1 is allowed: s is then clamped to exactly sample_max_value (diffusers' behaviour too)
  if not getattr(solver, "sample_max_value", 1.0) > 0.0:
    raise ValueError(f"sample_max_value: expected > 0, got {solver.sample_max_value}")


def _clip_x0(solver, x0: jax.Array) -> jax.Array:
  """diffusers' order: dynamic thresholding if asked for, else `clip_sample`."""
  if getattr(solver, "thresholding", False):
    return schedules.dynamic_threshold(x0, solver.dynamic_thresholding_ratio,
                                       solver.sample_max_value)
  if getattr(solver, "clip_sample", False):
    return jnp.clip(x0, -solver.clip_sample_range, solver.clip_sample_range)
  return x0


def _check_order(name: str, order, allowed: tuple[int, ...]) -> None:
  if isinstance(order, bool) or not isinstance(order, int) or order not in allowed:
    raise ValueError(f"{name}: this solver has orders {list(allowed)}, got {order!r}")


@runtime_checkable
class Solver(Protocol):
  """The contract every solver meets, and all the sampling driver (`sample.py`, `cache.py`) may
  assume. Outside the loop, in numpy, before tracing:

  - `check(schedule, spec)`: refuses (TypeError / ValueError naming the argument) a schedule or a
    denoiser (`denoiser.DenoiserSpec`: its prediction type, learned sigma) the solver can't use;
  - `table(schedule, steps)`: the coefficient table, `{name: [rows] array}` with the model
    timesteps in `"t"`; one row per model evaluation (`steps` rows, or more for multi-stage
    methods, whose stages are interleaved rows with a 0/1 column saying which);
  - `timesteps(schedule, steps)`: the training timesteps visited, decreasing;
  - `init_noise_scale(schedule, steps)`: the start is unit noise times this (diffusers'
    `init_noise_sigma`).

  Inside the loop, traced, the same arithmetic for every row (no branch on the row index):

  - `init_state(x)`: the state carried from row to row (multistep history, a Heun stage), a pytree
    of fixed shapes, `()` when there is none;
  - `model_input(x, c)`: what the model sees at row `c` (Euler/Heun: `x / sqrt(sigma^2 + 1)`);
  - `step(x, model_output, variance_values, c, noise, state, prediction_type) -> (x', state')`:
    the step rule at row `c`, with `state'` of `state`'s structure and shapes. `noise` is the
    row's standard-normal draw, None exactly when `stochastic` is False; `variance_values` the
    learned-sigma half of the model output, or None.

  Solvers are frozen dataclasses: hashable, so the driver passes them to `jax.jit` as static.
  """

  @property
  def stochastic(self) -> bool:
    """Whether `step` takes a fresh noise draw every row."""
    ...

  def check(self, schedule, spec) -> None: ...

  def timesteps(self, schedule, steps: int) -> np.ndarray: ...

  def table(self, schedule, steps: int) -> Table: ...

  def init_noise_scale(self, schedule, steps: int) -> float: ...

  def init_state(self, x: jax.Array) -> Any: ...

  def model_input(self, x: jax.Array, c: dict) -> jax.Array: ...

  def step(self, x: jax.Array, model_output: jax.Array, variance_values: jax.Array | None,
           c: dict, noise: jax.Array | None, state: Any,
           prediction_type: str) -> tuple[jax.Array, Any]: ...


class _Solver:
  """Defaults of the `Solver` protocol for a variance-preserving solver that sees x as it is and
  carries no state; `schedule_type` and `prediction_types` are what `check` accepts."""

  schedule_type = schedules.NoiseSchedule
  prediction_types = schedules.PREDICTION_TYPES

  def model_input(self, x: jax.Array, c: dict) -> jax.Array:
    return x

  def init_noise_scale(self, schedule, steps: int) -> float:
    return 1.0

  def init_state(self, x: jax.Array) -> Any:
    return ()

  def _finish(self, steps: int, **columns: np.ndarray) -> Table:
    """The table as fp32 columns, every entry checked finite (`NonFiniteTableError` naming the
    solver, the column, the first bad row, `steps` and the spacing)."""
    table = _f32(**columns)
    for name, col in table.items():
      bad = ~np.isfinite(np.asarray(columns[name], np.float64)) | ~np.isfinite(col)
      if bad.any():
        raise NonFiniteTableError(
            f"solver: {type(self).__name__} coefficient table column {name!r} is non-finite at "
            f"row {int(np.argmax(bad))} of {len(col)} (steps={steps}, "
            f"spacing={getattr(self, 'spacing', None)!r}); this solver cannot run this grid")
    return table

  def check(self, schedule, spec) -> None:
    if not isinstance(schedule, self.schedule_type):
      raise TypeError(f"schedule: {type(self).__name__} needs a {self.schedule_type.__name__}, "
                      f"got {type(schedule).__name__}")
    if spec.prediction_type not in self.prediction_types:
      raise ValueError(f"prediction_type: {type(self).__name__} takes a denoiser predicting one of "
                       f"{list(self.prediction_types)}, got {spec.prediction_type!r}")


@dataclasses.dataclass(frozen=True)
class DDPM(_Solver):
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
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0

  stochastic = True

  def __post_init__(self):
    schedules._check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
    _check_common(self)

  def check(self, schedule, spec) -> None:
    super().check(schedule, spec)
    if self.variance_type == "learned_range" and not spec.learned_sigma:
      raise ValueError("solver: variance_type='learned_range' needs a denoiser with learned_sigma")

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
    return self._finish(steps, 
        t=ts, alpha_bar=abar_t,
        coef_x0=np.sqrt(abar_prev) * beta_t / (1.0 - abar_t),
        coef_xt=np.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t),
        log_var_small=np.log(var_small), log_beta=np.log(beta_t),
        noise_mask=(ts > 0).astype(np.float64))

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
class DDIM(_Solver):
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
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0

  def __post_init__(self):
    _check_number("eta", self.eta, 0.0, np.inf)
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
    return self._finish(steps, t=ts, alpha_bar=abar_t, sqrt_alpha_bar_prev=np.sqrt(abar_prev),
                coef_eps=np.sqrt(np.maximum(dir_sq, 0.0)), std=std)

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values  # DDIM uses its own variance
    x0, eps = schedules.predict_x0_eps(model_output, x, c["alpha_bar"], prediction_type)
    x0 = _clip_x0(self, x0)
    x_prev = c["sqrt_alpha_bar_prev"] * x0 + c["coef_eps"] * eps
    if noise is not None:
      x_prev = x_prev + c["std"] * noise
    return x_prev, state


# ----------------------------------------------------------------------------------------------
# Noise-level grids shared by the sigma-space solvers.


def _multistep_grid(schedule: schedules.NoiseSchedule, steps: int, spacing: str, steps_offset: int,
                    use_karras_sigmas: bool, final_sigma: str, round_karras_t: bool):
  """(model timesteps [N], sigmas [N + 1]) for DPM-Solver++ and UniPC, diffusers' conventions.

  These spacings divide the range into `steps + 1` intervals and drop the last point (unlike
  `spaced_timesteps`); the final sigma is 0 (`final_sigma="zero"`) or sigma_0 (`"sigma_min"`).
  At `steps == num_train_timesteps` every spacing visits every training timestep T-1, ..., 0 (the
  only grid without a repeated timestep; diffusers repeats one there and returns NaN).
  Karras sigmas span [sigma_0, sigma_{T-1}] and map back to (rounded) model timesteps.
  """
  t_max = schedule.num_train_timesteps
  schedules.check_steps(steps, t_max)
  if steps == t_max and spacing != "trailing":
    # linspace and leading place steps + 1 integer points in [0, T - 1]; at steps = T that cannot
    # be done without repeating a timestep (diffusers then repeats one, and its sampler returns NaN
    # (linspace) or fails (leading: every point is 0)). The only strictly decreasing grid of T
    # training timesteps is all of them, which is also what `trailing` gives at steps = T.
    ts = np.arange(t_max - 1, -1, -1, dtype=np.int64) + steps_offset
  elif spacing == "linspace":
    ts = np.linspace(0, t_max - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = t_max // (steps + 1)
    ts = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
  else:
    ts = np.arange(t_max, 0, -t_max / steps).round().astype(np.int64) - 1
  if ts.max() >= t_max:
    raise ValueError(f"steps_offset: timesteps reach {ts.max()} >= {t_max} with "
                     f"steps_offset={steps_offset}")
  full = schedule.sigmas
  if use_karras_sigmas:
    sig = schedules.karras_sigmas(full[0], full[-1], steps)
    ts = schedules.sigma_to_t(sig, schedule.log_sigmas)
    if round_karras_t:
      ts = ts.round()
  else:
    sig = np.interp(ts, np.arange(t_max), full)
  last = full[0] if final_sigma == "sigma_min" else 0.0
  # diffusers stores these timesteps as int64, which truncates the unrounded ones
  return np.trunc(ts), np.append(sig, last)


def _alpha_sigma_lambda(sig: np.ndarray):
  """VP alpha_t, sigma_t and log-SNR/2 lambda_t from the VE level sigma (Lu et al. 2022b, Sec. 2);
  lambda is +inf at sigma = 0."""
  alpha = 1.0 / np.sqrt(sig**2 + 1.0)
  sigma_t = sig * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma_t)
  return alpha, sigma_t, lam


def _check_multistep(solver) -> None:
  schedules._check_choice("spacing", solver.spacing, schedules.TIMESTEP_SPACINGS)
  if not isinstance(solver.steps_offset, int) or solver.steps_offset < 0:
    raise ValueError(f"steps_offset: expected an int >= 0, got {solver.steps_offset!r}")
  schedules._check_choice("final_sigmas_type", solver.final_sigmas_type, ("zero", "sigma_min"))
  _check_x0_options(solver)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_Solver):
  """DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models"): exponential integrator of the data-prediction ODE in lambda = log(alpha /
  sigma), as diffusers' DPMSolverMultistepScheduler.

  - order 1 (eq. 8, = DDIM): `x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s`;
  - order 2 multistep "2M" (Algorithm 2): D1 = (x0_s - x0_{s'}) / r, r = h_prev / h, added with
    weight 1/2 (`midpoint`) or the exact phi_2 weight (`heun`);
  - `sde-dpmsolver++` (Sec. 5 / Gonzalez et al. 2023): the SDE form, with the data term scaled by
    1 - e^{-2h} and fresh noise `sigma_t sqrt(1 - e^{-2h}) z` every step.

  The first step is first order (no history); `lower_order_final` drops to first order at the last
  step (and always when the final sigma is zero) for stability at < 15 steps, as diffusers does.
  One table row per step; the previous x0 prediction is the scan state.
  """

  solver_order: int = 2
  algorithm_type: str = "dpmsolver++"
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  euler_at_final: bool = False
  use_karras_sigmas: bool = False
  final_sigmas_type: str = "zero"
  spacing: str = "linspace"
  steps_offset: int = 0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0

  def __post_init__(self):
    _check_order("solver_order", self.solver_order, (1, 2))
    schedules._check_choice("algorithm_type", self.algorithm_type,
                            ("dpmsolver++", "sde-dpmsolver++"))
    schedules._check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
    _check_multistep(self)

  @property
  def stochastic(self) -> bool:
    return self.algorithm_type == "sde-dpmsolver++"

  def timesteps(self, schedule, steps):
    return self._grid(schedule, steps)[0]

  def _grid(self, schedule, steps):
    return _multistep_grid(schedule, steps, self.spacing, self.steps_offset,
                           self.use_karras_sigmas, self.final_sigmas_type,
                           round_karras_t=schedule.beta_schedule != "squaredcos_cap_v2")

  def table(self, schedule, steps):
    ts, sig = self._grid(schedule, steps)
    alpha, sigma_t, lam = _alpha_sigma_lambda(sig)
    n = steps
    i = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      h = lam[1:] - lam[:-1]
      r = np.ones(n)
      r[1:] = h[:-1] / h[1:]
      last_first_order = (self.euler_at_final or (self.lower_order_final and n < 15)
                          or self.final_sigmas_type == "zero")
      second = (self.solver_order == 2) & (i >= 1) & ~((i == n - 1) & last_first_order)
      a_t, s_ratio = alpha[1:], sigma_t[1:] / sigma_t[:-1]
      em = np.exp(-h)
      if self.algorithm_type == "dpmsolver++":
        cx = s_ratio
        c0 = -a_t * (em - 1.0)
        c1 = (-0.5 * a_t * (em - 1.0) if self.solver_type == "midpoint"
              else a_t * ((em - 1.0) / h + 1.0))
        cn = np.zeros(n)
      else:
        em2 = np.exp(-2.0 * h)
        cx = s_ratio * em
        c0 = a_t * (1.0 - em2)
        c1 = (0.5 * a_t * (1.0 - em2) if self.solver_type == "midpoint"
              else a_t * ((1.0 - em2) / (-2.0 * h) + 1.0))
        cn = sigma_t[1:] * np.sqrt(1.0 - em2)
      # D1 = (x0_s - x0_prev) / r enters with weight c1; first-order rows weigh it 0
      c1 = np.where(second, c1 / r, 0.0)
    return self._finish(steps, t=ts, alpha=alpha[:-1], sigma=sigma_t[:-1], cx=cx, c0=c0, c1=c1, cn=cn)

  def init_state(self, x):
    return jnp.zeros(x.shape, jnp.float32)  # the previous step's x0 prediction

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values
    x0 = _clip_x0(self, schedules.x0_from_output(model_output, x, c["alpha"], c["sigma"],
                                                 prediction_type))
    x_next = c["cx"] * x + c["c0"] * x0 + c["c1"] * (x0 - state)
    if noise is not None:
      x_next = x_next + c["cn"] * noise
    return x_next, x0


@dataclasses.dataclass(frozen=True)
class UniPC(_Solver):
  """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
  Diffusion Models"), data prediction, as diffusers' UniPCMultistepScheduler.

  Each step i first corrects the previous predictor output with the new model evaluation (UniC,
  Algorithm 2, order = the previous predictor's order), then predicts x_{i+1} (UniP, Algorithm 1).
  B(h) = e^h - 1 (`bh2`, eq. 8) or h (`bh1`); for order 2 the predictor weight is rho = 1/2 and the
  corrector weights solve the 2x2 system R rho = b of Algorithm 2. Warm-up is first order, and
  `lower_order_final` lowers the order near the end (always, in diffusers). The scan state holds
  the previous corrected sample and the last two x0 predictions.
  """

  solver_order: int = 2
  solver_type: str = "bh2"
  use_karras_sigmas: bool = False
  final_sigmas_type: str = "zero"
  disable_corrector: tuple[int, ...] = ()
  spacing: str = "linspace"
  steps_offset: int = 0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0

  stochastic = False

  def __post_init__(self):
    _check_order("solver_order", self.solver_order, (1, 2))
    schedules._check_choice("solver_type", self.solver_type, ("bh1", "bh2"))
    if not isinstance(self.disable_corrector, tuple) or not all(
        isinstance(k, int) and k >= 0 for k in self.disable_corrector):
      raise ValueError(f"disable_corrector: expected a tuple of step indices >= 0, got "
                       f"{self.disable_corrector!r}")
    _check_multistep(self)

  def timesteps(self, schedule, steps):
    return self._grid(schedule, steps)[0]

  def _grid(self, schedule, steps):
    return _multistep_grid(schedule, steps, self.spacing, self.steps_offset,
                           self.use_karras_sigmas, self.final_sigmas_type, round_karras_t=True)

  def _coefficients(self, alpha, sigma_t, lam, s, t, prev, order):
    """(c_x, c_m0, c_d1, rho) of `x_t = c_x x_s + c_m0 m_s + c_d1 (m_prev - m_s) / r` for the step
    s -> t; `rho` are Algorithm 2's weights (order 2: on D1 and on the new-evaluation difference)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      hh = -(lam[t] - lam[s])
      phi1 = np.expm1(hh)
      b_h = hh if self.solver_type == "bh1" else np.expm1(hh)
      c_x = sigma_t[t] / sigma_t[s]
      c_m0 = -alpha[t] * phi1
      # b_k = h phi_{k+1}(h) k! / B(h) (Algorithm 1)
      phi_k, fact, b = phi1 / hh - 1.0, 1, []
      for k in range(1, 3):
        b.append(phi_k * fact / b_h)
        fact *= k + 1
        phi_k = phi_k / hh - 1.0 / fact
      r = (lam[prev] - lam[s]) / (lam[t] - lam[s]) if order == 2 else 1.0
    return c_x, c_m0, -alpha[t] * b_h, r, b

  def table(self, schedule, steps):
    ts, sig = self._grid(schedule, steps)
    alpha, sigma_t, lam = _alpha_sigma_lambda(sig)
    n = steps
    cols = {k: np.zeros(n) for k in ("px", "pm", "pd", "cx", "cm", "cd", "ce", "use_c")}
    orders = []
    for i in range(n):
      # predictor order: warm-up from the history, lowered near the end (lower_order_final)
      order = min(self.solver_order, n - i, i + 1)
      orders.append(order)
      c_x, c_m0, c_b, r, _ = self._coefficients(alpha, sigma_t, lam, i, i + 1, i - 1, order)
      cols["px"][i], cols["pm"][i] = c_x, c_m0
      if order == 2:  # rho_p = 1/2 on D1 = (m_{i-1} - m_i) / r
        cols["pd"][i] = c_b * 0.5 / r
      if i > 0 and (i - 1) not in self.disable_corrector:
        oc = orders[i - 1]  # the corrector has the order of the predictor it corrects
        c_x, c_m0, c_b, r, b = self._coefficients(alpha, sigma_t, lam, i - 1, i, i - 2, oc)
        if oc == 1:
          rho = [0.5]
        else:  # R rho = b with R = [[1, 1], [r, 1]]
          rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array(b[:2]))
          cols["cd"][i] = c_b * rho[0] / r
        cols["cx"][i], cols["cm"][i], cols["ce"][i] = c_x, c_m0, c_b * rho[-1]
        cols["use_c"][i] = 1.0
    return self._finish(steps, t=ts, alpha=alpha[:-1], sigma=sigma_t[:-1], **cols)

  def init_state(self, x):
    z = jnp.zeros(x.shape, jnp.float32)
    return (z, z, z)  # last corrected sample, x0 predictions m_{i-1}, m_{i-2}

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values, noise
    x_last, m1, m2 = state
    m0 = _clip_x0(self, schedules.x0_from_output(model_output, x, c["alpha"], c["sigma"],
                                                 prediction_type))
    corrected = (c["cx"] * x_last + c["cm"] * m1 + c["cd"] * (m2 - m1) + c["ce"] * (m0 - m1))
    x = jnp.where(c["use_c"] > 0, corrected, x)
    x_next = c["px"] * x + c["pm"] * m0 + c["pd"] * (m1 - m0)
    return x_next, (x, m0, m1)


# ----------------------------------------------------------------------------------------------
# Euler and Heun in sigma space (EDM).


def _check_sigma_solver(solver) -> None:
  schedules._check_choice("spacing", solver.spacing, schedules.TIMESTEP_SPACINGS)
  if not isinstance(solver.steps_offset, int) or solver.steps_offset < 0:
    raise ValueError(f"steps_offset: expected an int >= 0, got {solver.steps_offset!r}")
  _check_x0_options(solver)


def _edm_grid(schedule: schedules.NoiseSchedule, steps: int, spacing: str, steps_offset: int,
              use_karras_sigmas: bool):
  """(model timesteps [N], sigmas [N + 1]) of diffusers' Euler/Heun: float (unrounded) timesteps,
  sigma interpolated linearly in t; Karras sigmas span the chosen timesteps' own range."""
  t_max = schedule.num_train_timesteps
  schedules.check_steps(steps, t_max)
  if spacing == "linspace":
    ts = np.linspace(0, t_max - 1, steps)[::-1].astype(np.float64)
  else:
    ts = schedules.spaced_timesteps(t_max, steps, spacing, steps_offset).astype(np.float64)
  full = schedule.sigmas
  sig = np.interp(ts, np.arange(t_max), full)
  if use_karras_sigmas:
    sig = schedules.karras_sigmas(sig[-1], sig[0], steps)
    ts = schedules.sigma_to_t(sig, schedule.log_sigmas)
  return ts, np.append(sig, 0.0)


def _sigma_x0(model_output, x, c, prediction_type):
  """x0 from a model output in the VE parametrisation x = x0 + sigma eps (EDM, Table 1):
  epsilon: x - sigma eps; v: the VP v-prediction rewritten for the unscaled x; flow: x - sigma v."""
  out = model_output.astype(jnp.float32)
  s = c["sigma"]
  if prediction_type in ("epsilon", "flow"):
    return x - s * out
  if prediction_type == "v_prediction":
    # x0 = alpha (x alpha) - sigma_vp v with alpha = 1 / sqrt(s^2 + 1), sigma_vp = s alpha; the
    # two factors come from the table (float64-exact) rather than from fp32 s, which matters when
    # s ~ 1e4 (the cosine schedule's first step)
    return out * c["v_out"] + x / c["v_div"]
  return out


class _SigmaSolver(_Solver):
  """Shared arithmetic of Euler and Heun on a sigma grid (Karras et al. 2022, Algorithm 1,
  deterministic): d = (x - x0) / sigma, x' = x + d (sigma' - sigma); Heun's second stage averages
  d at both ends (eq. 2nd-order correction), rows interleaved as in diffusers."""

  def model_input(self, x, c):
    return x / c["in_div"] if "in_div" in c else x

  def _rows(self, ts, sig, heun):
    # The grid is rounded to the fp32 sigmas the step sees before dt is taken, so that x moves by
    # exactly d (s' - s) between table sigmas: the first step cancels |x| ~ sigma_max down to
    # O(1), and any other rounding of dt shows as ~ulp(sigma_max) there.
    sig = sig.astype(np.float32).astype(np.float64)
    n = len(ts)
    if not heun:
      return dict(t=ts, sigma=sig[:-1], dt=sig[1:] - sig[:-1], first=np.ones(n))
    # [s0, s1, s1, s2, s2, ..., s_{N-1}, s_{N-1}, 0]: odd rows are the second stage of a step
    rows = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
    t_rows = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    first = (np.arange(2 * n - 1) % 2 == 0).astype(np.float64)
    return dict(t=t_rows, sigma=rows[:-1], dt=rows[1:] - rows[:-1], first=first)

  def init_state(self, x):
    z = jnp.zeros(x.shape, jnp.float32)
    return (z, z, jnp.zeros((), jnp.float32))  # x and d at the first stage, its dt

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values, noise
    x0 = _clip_x0(self, _sigma_x0(model_output, x, c, prediction_type))
    d = (x - x0) / c["sigma"]
    x_saved, d_saved, dt_saved = state
    first = c["first"] > 0
    d_avg = (d_saved + d) / 2
    x_next = jnp.where(first, x + d * c["dt"], x_saved + d_avg * dt_saved)
    state = (jnp.where(first, x, x_saved), jnp.where(first, d, d_saved),
             jnp.where(first, c["dt"], dt_saved))
    return x_next, state


@dataclasses.dataclass(frozen=True)
class _EDMBase(_SigmaSolver):
  use_karras_sigmas: bool = False
  spacing: str = "linspace"
  steps_offset: int = 0
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  stochastic = False
  heun = False

  def __post_init__(self):
    _check_sigma_solver(self)

  def timesteps(self, schedule, steps):
    return _edm_grid(schedule, steps, self.spacing, self.steps_offset, self.use_karras_sigmas)[0]

  def init_noise_scale(self, schedule, steps):
    sig = _edm_grid(schedule, steps, self.spacing, self.steps_offset, self.use_karras_sigmas)[1]
    # diffusers: the largest sigma for linspace/trailing, sqrt(sigma^2 + 1) for leading
    return float(sig.max() if self.spacing in ("linspace", "trailing")
                 else np.sqrt(sig.max() ** 2 + 1.0))

  def table(self, schedule, steps):
    ts, sig = _edm_grid(schedule, steps, self.spacing, self.steps_offset, self.use_karras_sigmas)
    rows = self._rows(ts, sig, self.heun)  # sigma: fp32-rounded
    s = rows["sigma"]
    return self._finish(steps, **rows, in_div=np.sqrt(s**2 + 1.0), v_out=-s / np.sqrt(s**2 + 1.0),
                v_div=s**2 + 1.0)


@dataclasses.dataclass(frozen=True)
class Euler(_EDMBase):
  """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 1 without
  the Heun correction), as diffusers' EulerDiscreteScheduler; `use_karras_sigmas` puts the steps
  on EDM's rho = 7 grid (eq. 5). The model sees x / sqrt(sigma^2 + 1), its VP input."""

  clip_sample: bool = False  # diffusers' Euler has no clipping; kept for the shared x0 hook

  def __post_init__(self):
    if self.clip_sample:
      raise ValueError("clip_sample: EulerDiscreteScheduler does not clip; use Heun or DDIM")
    _check_sigma_solver(self)


@dataclasses.dataclass(frozen=True)
class Heun(_EDMBase):
  """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1), as diffusers'
  HeunDiscreteScheduler: 2 N - 1 model evaluations for N steps (the last step is Euler to 0)."""

  heun = True


# ----------------------------------------------------------------------------------------------
# Flow matching.


def _flow_grid(schedule: schedules.FlowSchedule, steps: int):
  """(model timesteps [N], sigmas [N + 1]) of diffusers' FlowMatch*DiscreteScheduler: N points
  evenly spaced between the (statically shifted) training range's ends, then shifted."""
  t_max = schedule.num_train_timesteps
  schedules.check_steps(steps, t_max)
  # the training range's ends: 1 and 1/T, through the static shift (diffusers shifts them in
  # __init__ and then shifts the grid again; a dynamic shift is applied once)
  if schedule.mu is None:
    ends = schedules.FlowSchedule(t_max, schedule.shift).apply_shift(np.array([1.0, 1.0 / t_max]))
  else:
    ends = np.array([1.0, 1.0 / t_max])
  sig = schedule.apply_shift(np.linspace(ends[0] * t_max, ends[1] * t_max, steps) / t_max)
  return sig * t_max, np.append(sig, 0.0)


@dataclasses.dataclass(frozen=True)
class _FlowBase(_SigmaSolver):
  schedule_type = schedules.FlowSchedule
  prediction_types = schedules.FLOW_PREDICTION_TYPES
  heun = False

  def __post_init__(self):
    check_bool_fields(self)

  def timesteps(self, schedule, steps):
    return _flow_grid(schedule, steps)[0]

  def table(self, schedule, steps):
    ts, sig = _flow_grid(schedule, steps)
    rows = self._rows(ts, sig, self.heun)
    return self._finish(steps, **rows, sigma_next=np.append(rows["sigma"][1:], 0.0))


@dataclasses.dataclass(frozen=True)
class FlowEuler(_FlowBase):
  """Euler on the rectified-flow ODE dx/dsigma = v (Liu et al. 2023; SD3), as diffusers'
  FlowMatchEulerDiscreteScheduler: x' = x + (sigma' - sigma) v. With `stochastic_sampling` the
  step re-noises the x0 estimate instead: x' = (1 - sigma') (x - sigma v) + sigma' z."""

  stochastic_sampling: bool = False

  @property
  def stochastic(self) -> bool:
    return self.stochastic_sampling

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values
    v = model_output.astype(jnp.float32)
    if noise is None:
      return x + c["dt"] * v, state
    x0 = x - c["sigma"] * v
    return (1.0 - c["sigma_next"]) * x0 + c["sigma_next"] * noise, state


@dataclasses.dataclass(frozen=True)
class FlowHeun(_FlowBase):
  """Heun on the rectified-flow ODE, as diffusers' FlowMatchHeunDiscreteScheduler (stages
  interleaved as table rows, 2 N - 1 evaluations)."""

  stochastic = False
  heun = True


# ----------------------------------------------------------------------------------------------
# Consistency-model multistep sampling.


def _lcm_timesteps(t_max: int, steps: int, original_inference_steps: int) -> np.ndarray:
  """diffusers' LCM/TCD grid: the distillation's `original_inference_steps` skip-grid
  (k - 1, 2k - 1, ..., T - 1 with k = T // original), subsampled to `steps` points."""
  if not isinstance(original_inference_steps, int) or not 1 <= original_inference_steps <= t_max:
    raise ValueError(f"original_inference_steps: expected an int in [1, {t_max}], got "
                     f"{original_inference_steps!r}")
  schedules.check_steps(steps, t_max)
  if steps > original_inference_steps:
    raise ValueError(f"steps: a consistency sampler distilled on {original_inference_steps} steps "
                     f"takes at most that many, got {steps}")
  k = t_max // original_inference_steps
  origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
  idx = np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)
  return origin[idx]


def _consistency_scalings(t: np.ndarray, timestep_scaling: float, sigma_data: float = 0.5):
  """The consistency-model boundary condition (Song et al. 2023, Sec. 3; LCM, Luo et al. 2023,
  eq. 4): c_skip = s_d^2 / (t'^2 + s_d^2), c_out = t' / sqrt(t'^2 + s_d^2), t' = scaling * t."""
  ts = np.asarray(t, np.float64) * timestep_scaling
  return sigma_data**2 / (ts**2 + sigma_data**2), ts / np.sqrt(ts**2 + sigma_data**2)


@dataclasses.dataclass(frozen=True)
class LCM(_Solver):
  """Latent consistency model multistep sampling (Luo et al. 2023, Algorithm 3), as diffusers'
  LCMScheduler: each step maps x_t to the consistency estimate c_skip x_t + c_out x0 and re-noises
  it to the next timestep with fresh noise; the last step returns the estimate."""

  original_inference_steps: int = 50
  timestep_scaling: float = 10.0
  set_alpha_to_one: bool = True
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0

  stochastic = True

  def __post_init__(self):
    _check_number("timestep_scaling", self.timestep_scaling, 0.0, np.inf, lo_open=True)
    _check_original_steps(self)
    _check_x0_options(self)

  def timesteps(self, schedule, steps):
    return _lcm_timesteps(schedule.num_train_timesteps, steps, self.original_inference_steps)

  def table(self, schedule, steps):
    ts = self.timesteps(schedule, steps)
    abar = schedule.alphas_cumprod
    c_skip, c_out = _consistency_scalings(ts, self.timestep_scaling)
    abar_prev = np.append(abar[ts[1:]], 1.0)  # the last row returns the estimate, un-noised
    return self._finish(steps, t=ts, alpha=np.sqrt(abar[ts]), sigma=np.sqrt(1.0 - abar[ts]), c_skip=c_skip,
                c_out=c_out, a_prev=np.sqrt(abar_prev), s_prev=np.sqrt(1.0 - abar_prev))

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values
    x0 = _clip_x0(self, schedules.x0_from_output(model_output, x, c["alpha"], c["sigma"],
                                                 prediction_type))
    denoised = c["c_out"] * x0 + c["c_skip"] * x
    return c["a_prev"] * denoised + c["s_prev"] * noise, state


@dataclasses.dataclass(frozen=True)
class TCD(_Solver):
  """Trajectory consistency distillation sampling (Zheng et al. 2024, "Trajectory Consistency
  Distillation", Sec. 4.3, strategic stochastic sampling), as diffusers' TCDScheduler: the model's
  (x0, eps) is carried to the intermediate time s = floor((1 - gamma) t_prev) deterministically,
  then forward-diffused to t_prev with fresh noise. gamma = 0 is deterministic."""

  gamma: float = 0.3
  original_inference_steps: int = 50
  set_alpha_to_one: bool = True

  def __post_init__(self):
    _check_number("gamma", self.gamma, 0.0, 1.0)
    _check_original_steps(self)
    check_bool_fields(self)

  @property
  def stochastic(self) -> bool:
    return self.gamma > 0

  def timesteps(self, schedule, steps):
    return _lcm_timesteps(schedule.num_train_timesteps, steps, self.original_inference_steps)

  def table(self, schedule, steps):
    ts = self.timesteps(schedule, steps)
    abar = schedule.alphas_cumprod
    prev = np.append(ts[1:], 0)
    s = np.floor((1.0 - self.gamma) * prev).astype(np.int64)
    ratio = abar[prev] / abar[s]
    last = np.arange(len(ts)) == len(ts) - 1
    keep = last | (self.gamma == 0)  # no re-noising: the last step, or gamma = 0
    return self._finish(steps, t=ts, alpha=np.sqrt(abar[ts]), sigma=np.sqrt(1.0 - abar[ts]),
                alpha_s=np.sqrt(abar[s]), sigma_s=np.sqrt(1.0 - abar[s]),
                a_ratio=np.where(keep, 1.0, np.sqrt(ratio)),
                n_coef=np.where(keep, 0.0, np.sqrt(np.maximum(1.0 - ratio, 0.0))))

  def step(self, x, model_output, variance_values, c, noise, state, prediction_type):
    del variance_values
    x0, eps = schedules.predict_x0_eps_as(model_output, x, c["alpha"], c["sigma"], prediction_type)
    x_s = c["alpha_s"] * x0 + c["sigma_s"] * eps
    if noise is None:
      return x_s, state
    return c["a_ratio"] * x_s + c["n_coef"] * noise, state


def _f32(**columns: np.ndarray) -> Table:
  return {k: np.asarray(v, np.float32) for k, v in columns.items()}


class NonFiniteTableError(ValueError):
  """A solver's coefficient table has a non-finite entry (in float64, or after the cast to fp32).
  Raised when the table is built, before anything is traced: a table like that would turn every
  sample into NaN or inf."""


SOLVERS = {"ddpm": DDPM, "ddim": DDIM, "dpmsolver++": DPMSolverPP, "unipc": UniPC,
           "euler": Euler, "heun": Heun, "flow_euler": FlowEuler, "flow_heun": FlowHeun,
           "lcm": LCM, "tcd": TCD}


def make_solver(name: str, **options: Any):
  """A solver by name (one of `SOLVERS`) with its options; unknown names or options raise."""
  if name not in SOLVERS:
    raise ValueError(f"name: unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
  cls = SOLVERS[name]
  return strict_config(cls, cls.__name__, options)
