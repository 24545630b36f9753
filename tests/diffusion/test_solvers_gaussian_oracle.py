"""Every solver driven by the exact denoiser of Gaussian data reproduces that Gaussian.

For x0 ~ N(mu, Sigma) the posterior mean E[x0 | x_t] is closed-form at every noise level
(`gaussian_denoiser`, exact at fractional timesteps too), so a correct solver's samples must have
mean mu and covariance Sigma up to (a) sampling noise, bounded here with z-scores from the
sampling distribution of the mean and of a Gaussian sample covariance, and (b) the solver's own
discretisation error. The start is drawn from the exact marginal at the solver's first noise level
(VP `sqrt(abar) x0 + sqrt(1 - abar) eps`, EDM `x0 + sigma eps`, flow `(1 - s) x0 + s eps`), so the
terminal-SNR mismatch of the schedule does not enter.

Step counts. Each case's discretisation bias was measured first, in units of this test's standard
errors (N = 20,000): exactly for the deterministic solvers — with a linear denoiser the whole
sampler is an affine map x_T -> x_0, recovered from 4 runs, which pushes the start law forward
without Monte Carlo — and with 200k samples for the stochastic ones. The steps below keep it at
or under about 0.6 standard errors (most far less), e.g. covariance bias at 20 / 50 steps: DPM-Solver++
2M 2.9 / 0.5 (linear), UniPC bh2 2.7 / 0.15 (linear); Heun (Karras) 5.4 / 1.2 at 25 / 50 and 0.3 at
100; first-order Euler / DPM-Solver-1 / flow Euler fall as 1/steps and need ~1000.

Not tested here, with reasons:
- Euler/Heun on `squaredcos_cap_v2`: sigma_max = 2e4 at the VE scale; fp32 rounding of
  x ~ sigma_max z leaves ~1 standard error of bias that more steps don't remove (float64 Heun on the
  same grid converges at second order: 0.4% at 200 steps, 0.09% at 400).
- TCD with gamma > 0 and LCM: their re-noising starts from a long deterministic jump (TCD: t to
  (1 - gamma) t_prev; LCM: to x0 itself) whose error does not shrink with more steps (measured:
  TCD gamma = 0.1 at 250 and 1000 steps both ~6-7 standard errors). With the exact posterior mean
  in place of a distilled consistency model they do not target N(mu, Sigma); TCD with gamma = 0
  (a DDIM on the distillation grid) does, and is tested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import gaussian_denoiser
from jaxinf.diffusion.sample import sample

MU = np.array([1.0, -0.5, 0.3])
COV = np.array([[1.0, 0.4, 0.1], [0.4, 0.8, 0.2], [0.1, 0.2, 0.5]])
N = 20_000
Z_BOUND = 4.5


def z_scores(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
  """Largest |z| of the sample mean and of the sample covariance entries under N(mu, cov)."""
  n = x.shape[0]
  z_mean = np.abs(x.mean(0) - mu) / np.sqrt(np.diag(cov) / n)
  # Var of a sample covariance entry of a Gaussian: (S_ii S_jj + S_ij^2) / n
  se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  z_cov = np.abs(np.cov(x.T) - cov) / se_cov
  return float(z_mean.max()), float(z_cov.max())


def start_law(schedule, solver, steps: int) -> tuple[float, float, float]:
  """(a, s, scale): the solver's first state is x = a x0 + s eps, and the driver multiplies
  `x_init` by `scale` (its initial noise scale). Read from the solver's own table, so the start
  sits exactly at the noise level of its first model call."""
  table = solver.table(schedule, steps)
  scale = float(solver.init_noise_scale(schedule, steps))
  if isinstance(schedule, schedules.FlowSchedule):
    s = float(table["sigma"][0])
    return 1.0 - s, s, scale
  if "alpha_bar" in table:  # DDPM, DDIM
    abar = float(table["alpha_bar"][0])
    return np.sqrt(abar), np.sqrt(1.0 - abar), scale
  if "alpha" in table:  # DPM-Solver++, UniPC, LCM, TCD: VP alpha_t, sigma_t
    return float(table["alpha"][0]), float(table["sigma"][0]), scale
  return 1.0, float(table["sigma"][0]), scale  # Euler, Heun: VE x = x0 + sigma eps


def run(schedule, solver, steps, prediction_type, *, cov_model=COV, seed=0):
  den = gaussian_denoiser(MU, cov_model, schedule, prediction_type)
  a, s, scale = start_law(schedule, solver, steps)
  x_init = np.random.default_rng(seed).multivariate_normal(
      a * MU, a * a * cov_model + s * s * np.eye(3), N) / scale
  x = sample(jax.random.key(seed), den, schedule, solver, (N, 3), steps=steps,
             x_init=jnp.asarray(x_init, jnp.float32))
  return np.asarray(x, np.float64)


CASES = [
    (beta, pred, name, solver, steps)
    for beta in schedules.BETA_SCHEDULES
    for pred in schedules.PREDICTION_TYPES
    for name, solver, steps in (("ddpm", solvers.DDPM(), 1000),
                                ("ddim", solvers.DDIM(spacing="trailing"), 500))
] + [
    ("linear", "epsilon", "ddpm-fixed_large-250", solvers.DDPM("fixed_large"), 250),
    ("linear", "v_prediction", "ddim-eta1", solvers.DDIM(eta=1.0, spacing="linspace"), 1000),
    ("squaredcos_cap_v2", "sample", "ddim-eta0.5", solvers.DDIM(eta=0.5, spacing="leading"), 500),
    # DPM-Solver++ (measured covariance bias in standard errors in the comments)
    ("linear", "epsilon", "dpm++2m", solvers.DPMSolverPP(), 50),  # 0.48
    ("scaled_linear", "v_prediction", "dpm++2m", solvers.DPMSolverPP(), 50),  # 0.05
    ("squaredcos_cap_v2", "sample", "dpm++2m", solvers.DPMSolverPP(), 50),  # 0.28
    ("linear", "v_prediction", "dpm++2m-heun", solvers.DPMSolverPP(solver_type="heun"), 100),  # 0.32
    ("squaredcos_cap_v2", "epsilon", "dpm++2m-heun", solvers.DPMSolverPP(solver_type="heun"),
     50),  # 0.24
    ("linear", "sample", "dpm++1", solvers.DPMSolverPP(solver_order=1), 1000),  # ~0.45
    ("scaled_linear", "epsilon", "dpm++sde",
     solvers.DPMSolverPP(algorithm_type="sde-dpmsolver++"), 200),  # <= 0.56 incl. MC noise
    ("squaredcos_cap_v2", "v_prediction", "dpm++sde-heun",
     solvers.DPMSolverPP(algorithm_type="sde-dpmsolver++", solver_type="heun"), 200),
    # UniPC
    ("linear", "v_prediction", "unipc-bh2", solvers.UniPC(), 50),  # 0.15
    ("scaled_linear", "sample", "unipc-bh2", solvers.UniPC(), 50),  # 0.31
    ("squaredcos_cap_v2", "epsilon", "unipc-bh2", solvers.UniPC(), 50),  # 0.05
    ("linear", "epsilon", "unipc-bh1", solvers.UniPC(solver_type="bh1"), 100),  # 0.05
    ("scaled_linear", "epsilon", "unipc-1", solvers.UniPC(solver_order=1), 400),  # ~0.12
    # Euler / Heun on Karras sigmas: fractional model timesteps
    ("scaled_linear", "epsilon", "euler-karras", solvers.Euler(use_karras_sigmas=True), 1000),
    ("linear", "v_prediction", "euler-karras", solvers.Euler(use_karras_sigmas=True), 1000),
    ("scaled_linear", "sample", "heun-karras", solvers.Heun(use_karras_sigmas=True), 100),  # 0.14
    ("linear", "epsilon", "heun-karras", solvers.Heun(use_karras_sigmas=True), 100),  # 0.28
    # TCD with gamma = 0: DDIM on the distillation grid
    ("scaled_linear", "epsilon", "tcd-gamma0",
     solvers.TCD(gamma=0.0, original_inference_steps=1000), 1000),  # 0.28
]

# rectified flow, x = (1 - s) x0 + s eps: (name, schedule, solver, steps)
FLOW_CASES = [
    ("euler-shift1", schedules.FlowSchedule(), solvers.FlowEuler(), 1000),  # ~0.27
    ("euler-shift3", schedules.FlowSchedule(shift=3.0), solvers.FlowEuler(), 1000),  # ~0.44
    ("heun-shift1", schedules.FlowSchedule(), solvers.FlowHeun(), 25),  # 0.05
    ("heun-shift3", schedules.FlowSchedule(shift=3.0), solvers.FlowHeun(), 50),  # 0.13
    ("heun-mu1.15", schedules.FlowSchedule(mu=1.15), solvers.FlowHeun(), 50),
]


@pytest.mark.parametrize("beta,pred,name,solver,steps", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_solver_reproduces_gaussian(beta, pred, name, solver, steps):
  x = run(schedules.NoiseSchedule(beta), solver, steps, pred)
  z_mean, z_cov = z_scores(x, MU, COV)
  assert z_mean < Z_BOUND, f"{name}: mean off by {z_mean:.2f} standard errors"
  assert z_cov < Z_BOUND, f"{name}: covariance off by {z_cov:.2f} standard errors"


@pytest.mark.parametrize("name,schedule,solver,steps", FLOW_CASES, ids=[c[0] for c in FLOW_CASES])
def test_flow_solver_reproduces_gaussian(name, schedule, solver, steps):
  x = run(schedule, solver, steps, "flow")
  z_mean, z_cov = z_scores(x, MU, COV)
  assert z_mean < Z_BOUND, f"{name}: mean off by {z_mean:.2f} standard errors"
  assert z_cov < Z_BOUND, f"{name}: covariance off by {z_cov:.2f} standard errors"


def test_bound_has_power():
  """The same check rejects a denoiser for a 10% larger covariance, and too few steps: a 10-step
  DDIM, a 5-step DPM-Solver++ 2M, a 5-step flow Heun (shift 3)."""
  sched = schedules.NoiseSchedule("linear")
  x = run(sched, solvers.DDIM(spacing="trailing"), 500, "epsilon", cov_model=1.1 * COV)
  assert z_scores(x, MU, COV)[1] > Z_BOUND
  x = run(sched, solvers.DDIM(spacing="trailing"), 10, "epsilon")
  assert z_scores(x, MU, COV)[1] > Z_BOUND
  x = run(sched, solvers.DPMSolverPP(), 5, "epsilon")
  assert z_scores(x, MU, COV)[1] > Z_BOUND
  flow = schedules.FlowSchedule(shift=3.0)
  x = run(flow, solvers.FlowHeun(), 50, "flow", cov_model=1.1 * COV)
  assert z_scores(x, MU, COV)[1] > Z_BOUND
  x = run(flow, solvers.FlowHeun(), 5, "flow")
  assert z_scores(x, MU, COV)[1] > Z_BOUND


def _posterior_target(x, a, s, prediction_type):
  """float64 E[target | x_t = x] for x_t = a x0 + s eps, straight from the Gaussian formulas."""
  m = a * a * COV + s * s * np.eye(3)
  x0 = MU + (x - a * MU) @ np.linalg.solve(m, a * COV)  # (a Sigma M^-1)^T = M^-1 a Sigma
  eps = (x - a * x0) / s
  return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0,
          "flow": eps - x0}[prediction_type]


@pytest.mark.parametrize("beta", schedules.BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_gaussian_denoiser_is_exact_between_integer_timesteps(beta, prediction_type):
  """At a fractional t the denoiser uses the noise level the Karras-sigma solvers meant:
  `sigma_to_t(sigma)` maps back to that sigma, and the output is the float64 posterior there."""
  sched = schedules.NoiseSchedule(beta)
  log_sigmas = np.log(sched.sigmas)
  # Karras-like levels strictly inside the schedule's range, where sigma_to_t is invertible
  sigma = np.geomspace(1.01 * sched.sigmas[0], 0.99 * sched.sigmas[-1], 7)
  t = schedules.sigma_to_t(sigma, log_sigmas)
  assert np.any(t != np.round(t))
  x = np.random.default_rng(0).standard_normal((len(t), 3))
  den = gaussian_denoiser(MU, COV, sched, prediction_type)
  got = np.asarray(den(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), None))
  a = 1.0 / np.sqrt(1.0 + sigma**2)
  for i in range(len(t)):
    want = _posterior_target(x[i], a[i], sigma[i] * a[i], prediction_type)
    np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=2e-5)


def test_gaussian_denoiser_is_exact_at_integer_timesteps_under_zero_terminal_snr():
  """At t = T - 1 under zero-terminal SNR, abar = 0 exactly: eps = x_t, x0 = mu."""
  sched = schedules.NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True)
  x = np.random.default_rng(1).standard_normal((2, 3))
  t = jnp.array([999.0, 999.0])
  eps = gaussian_denoiser(MU, COV, sched, "epsilon")(jnp.asarray(x, jnp.float32), t, None)
  x0 = gaussian_denoiser(MU, COV, sched, "sample")(jnp.asarray(x, jnp.float32), t, None)
  np.testing.assert_allclose(eps, x, rtol=1e-6)
  np.testing.assert_allclose(x0, np.broadcast_to(MU, (2, 3)), rtol=1e-6)


def test_flow_gaussian_denoiser_predicts_the_velocity():
  sched = schedules.FlowSchedule()
  s = np.array([0.001, 0.25, 0.5, 0.999, 1.0])
  x = np.random.default_rng(2).standard_normal((len(s), 3))
  den = gaussian_denoiser(MU, COV, sched, "flow")
  got = np.asarray(den(jnp.asarray(x, jnp.float32), jnp.asarray(s * 1000, jnp.float32), None))
  for i in range(len(s)):
    np.testing.assert_allclose(got[i], _posterior_target(x[i], 1 - s[i], s[i], "flow"),
                               rtol=2e-5, atol=2e-5)
