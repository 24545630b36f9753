"""The diffusion loss against closed forms for Gaussian data and its exact denoiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import gaussian_denoiser
from jaxinf.train.diffusion import _normal_kl, diffusion_loss, vlb_terms

MU = np.array([0.5, -1.0])
COV = np.array([[0.6, 0.2], [0.2, 0.3]])


def expected_mmse(schedule, prediction_type):
  """E_t E||target - E[target | x_t]||^2 / d for x0 ~ N(MU, COV), t uniform.

  With M_t = abar COV + (1 - abar) I and C_t = Cov(x0 | x_t) = COV - abar COV M_t^-1 COV:
  Cov(eps | x_t) = abar/(1-abar) C_t and Cov(v | x_t) = C_t / (1 - abar).
  """
  d = len(MU)
  total = 0.0
  for abar in schedule.alphas_cumprod:
    m = abar * COV + (1 - abar) * np.eye(d)
    c = COV - abar * COV @ np.linalg.solve(m, COV)
    factor = {"sample": 1.0, "epsilon": abar / (1 - abar), "v_prediction": 1 / (1 - abar)}
    total += factor[prediction_type] * np.trace(c) / d
  return total / schedule.num_train_timesteps


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_loss_of_the_exact_denoiser_is_the_mmse(prediction_type):
  sched = schedules.NoiseSchedule("squaredcos_cap_v2")
  den = gaussian_denoiser(MU, COV, sched, prediction_type)
  n = 200_000
  x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, n), jnp.float32)
  apply = lambda params, x, t, y: den.spec.apply(params, x, t, y)
  # per-sample losses give the Monte Carlo standard error
  keys = jax.random.split(jax.random.key(0), 50)
  losses = np.array([float(diffusion_loss(apply, den.params, x0[i::50], None, k, schedule=sched,
                                          prediction_type=prediction_type, learned_sigma=False))
                     for i, k in enumerate(keys)])
  se = losses.std(ddof=1) / np.sqrt(len(losses))
  assert abs(losses.mean() - expected_mmse(sched, prediction_type)) < 5 * se


def test_vlb_is_zero_for_the_true_posterior():
  """With the true x0 and v = -1 (the posterior variance) the KL terms vanish; v = +1 (beta_t)
  gives the closed-form KL between the two Gaussians."""
  sched = schedules.NoiseSchedule()
  x0 = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
  x_t = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
  t = jnp.array([1, 10, 500, 999])
  zero = vlb_terms(sched, x0, x_t, t, x0, -jnp.ones_like(x0))
  np.testing.assert_allclose(zero, 0.0, atol=1e-6)
  betas, abar = sched.betas, sched.alphas_cumprod
  abar_prev = np.concatenate([[1.0], abar[:-1]])[np.asarray(t)]
  post = betas[np.asarray(t)] * (1 - abar_prev) / (1 - abar[np.asarray(t)])
  # KL(N(m, s1) || N(m, s2)) = 0.5 (s1/s2 - 1 - log(s1/s2)), in bits
  ratio = post / betas[np.asarray(t)]
  expected = 0.5 * (ratio - 1 - np.log(ratio)) / np.log(2)
  got = vlb_terms(sched, x0, x_t, t, x0, jnp.ones_like(x0))
  # atol: the KL of two nearly equal variances cancels O(1) terms in fp32 (~1e-7 each)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(_normal_kl(0.0, 0.0, 1.0, 0.0), 0.5)
