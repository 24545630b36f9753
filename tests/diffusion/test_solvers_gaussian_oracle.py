"""DDPM and DDIM driven by the exact denoiser of Gaussian data reproduce that Gaussian.

For x0 ~ N(mu, Sigma) the posterior mean E[x0 | x_t] is closed-form, so a correct solver's samples
must have mean mu and covariance Sigma up to (a) sampling noise, bounded here with z-scores from
the sampling distribution of the mean and of a Gaussian sample covariance, and (b) the solver's own
discretisation error, which the step counts below keep to about 1% (measured with 200k samples;
first-order convergence as steps double). The start x_T is drawn from the exact marginal q(x_T), so
the terminal-SNR mismatch of the schedule does not enter.
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


def run(schedule, solver, steps, prediction_type, *, cov_model=COV, seed=0):
  den = gaussian_denoiser(MU, cov_model, schedule, prediction_type)
  abar = schedule.alphas_cumprod[solver.timesteps(schedule, steps)[0]]
  x_init = np.random.default_rng(seed).multivariate_normal(
      np.sqrt(abar) * MU, abar * cov_model + (1 - abar) * np.eye(3), N)
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
]


@pytest.mark.parametrize("beta,pred,name,solver,steps", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_solver_reproduces_gaussian(beta, pred, name, solver, steps):
  x = run(schedules.NoiseSchedule(beta), solver, steps, pred)
  z_mean, z_cov = z_scores(x, MU, COV)
  assert z_mean < Z_BOUND, f"{name}: mean off by {z_mean:.2f} standard errors"
  assert z_cov < Z_BOUND, f"{name}: covariance off by {z_cov:.2f} standard errors"


def test_bound_has_power():
  """The same check rejects a denoiser for a 10% larger covariance, and a 10-step DDIM."""
  sched = schedules.NoiseSchedule("linear")
  x = run(sched, solvers.DDIM(spacing="trailing"), 500, "epsilon", cov_model=1.1 * COV)
  assert z_scores(x, MU, COV)[1] > Z_BOUND
  x = run(sched, solvers.DDIM(spacing="trailing"), 10, "epsilon")
  assert z_scores(x, MU, COV)[1] > Z_BOUND
