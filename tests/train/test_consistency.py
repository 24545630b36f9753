"""Consistency distillation against closed forms: the flow-as-VP teacher, its DDIM step, the
boundary condition, the exact consistency function of Gaussian data and LCM sampling of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec, gaussian_denoiser
from jaxinf.diffusion.sample import sample
from jaxinf.diffusion.solvers import _consistency_scalings
from jaxinf.train import consistency as cd
from jaxinf.train.step import StepContext

VP = schedules.NoiseSchedule()
FLOW = schedules.FlowSchedule()
MU = np.array([0.5, -1.0])
COV = np.array([[0.6, 0.2], [0.2, 0.3]])


def test_flow_as_vp_is_the_vp_posterior_mean():
  """The rescaled flow's x0 prediction equals the exact VP posterior mean E[x0 | x_t]."""
  flow_vp = cd.flow_as_vp_denoiser(gaussian_denoiser(MU, COV, FLOW, "flow"), FLOW, VP)
  exact = gaussian_denoiser(MU, COV, VP, "sample")
  x = jax.random.normal(jax.random.key(0), (6, 2)) * 1.5
  t = jnp.array([0.0, 19.0, 250.0, 500.0, 800.0, 999.0])
  np.testing.assert_allclose(flow_vp(x, t, None), exact(x, t, None), atol=2e-5, rtol=1e-5)


def test_ddim_step_of_the_wrapped_flow_is_a_flow_euler_step():
  flow = gaussian_denoiser(MU, COV, FLOW, "flow")
  flow_vp = cd.flow_as_vp_denoiser(flow, FLOW, VP)
  x_t = jax.random.normal(jax.random.key(0), (4, 2))
  t, t_prev = jnp.array([999, 619, 119, 19]), jnp.array([979, 599, 99, 0])
  got = cd.guided_ddim_step(flow_vp.spec.apply, flow_vp.params, x_t, t, t_prev, None, schedule=VP,
                            guidance_scale=1.0, null_cond=None)
  abar = VP.alphas_cumprod
  a, s = np.sqrt(abar), np.sqrt(1 - abar)
  r, r_prev = (a + s)[t][:, None], (a + s)[t_prev][:, None]
  sig, sig_prev = (s / (a + s))[t][:, None], (s / (a + s))[t_prev][:, None]
  x_s = np.asarray(x_t) / r
  v = np.asarray(flow(jnp.asarray(x_s, jnp.float32), jnp.asarray(sig[:, 0] * 1000, jnp.float32),
                      None))
  np.testing.assert_allclose(got, (x_s + (sig_prev - sig) * v) * r_prev, atol=1e-5, rtol=1e-5)


def test_boundary_condition_is_exact():
  """f(x, 0) = x whatever the network says (c_skip(0) = 1, c_out(0) = 0)."""
  garbage = lambda p, x, t, y: 1e3 * jnp.sin(x * 7.0) + p
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  f = cd.consistency_function(garbage, 3.0, x, jnp.zeros(5, jnp.int32), None, schedule=VP,
                              timestep_scaling=10.0)
  np.testing.assert_array_equal(f, x)


def exact_consistency_x0_apply(timestep_scaling):
  """An x0-predictor whose consistency function c_skip x + c_out x0 is the exact PF-ODE map to
  t = 0 for x0 ~ N(MU, COV): per eigen-direction the increasing affine map between the marginals,
  N(a mu, a^2 lam + s^2) -> N(mu, lam) (at t = 0 itself, f = x by the boundary condition)."""
  lam, u = np.linalg.eigh(COV)
  abar = jnp.asarray(VP.alphas_cumprod, jnp.float32)
  c_skip, c_out = (jnp.asarray(c, jnp.float32) for c in _consistency_scalings(
      np.arange(VP.num_train_timesteps), timestep_scaling))
  mu, u, lam = (jnp.asarray(v, jnp.float32) for v in (MU, u, lam))

  def apply(params, x, t, y):
    ti = jnp.round(t).astype(jnp.int32)
    a, s = jnp.sqrt(abar[ti])[:, None], jnp.sqrt(1 - abar[ti])[:, None]
    scale = jnp.sqrt(lam[None] / (a**2 * lam[None] + s**2))
    f_star = mu + ((x - a * mu) @ u * scale) @ u.T
    c_o = jnp.where(c_out[ti] > 0, c_out[ti], 1.0)[:, None]  # t = 0: anything, c_out = 0
    return (f_star - c_skip[ti][:, None] * x) / c_o

  return apply


def test_consistency_loss_of_the_exact_consistency_function():
  """With the exact Gaussian teacher, the exact consistency function (as student and target) has a
  loss set only by the one DDIM step's discretisation (teacher and f* disagree by O(K^2)), far
  below that of the posterior-mean x0 predictor, which is not a consistency function."""
  cfg = cd.LCMConfig(guidance_scale=1.0, huber_c=1e-3)
  teacher = gaussian_denoiser(MU, COV, VP, "sample")
  x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, 20_000), jnp.float32)
  exact = exact_consistency_x0_apply(cfg.timestep_scaling)
  losses = {}
  for name, apply, params in (("exact", exact, None),
                              ("posterior_mean", teacher.spec.apply, teacher.params)):
    loss_fn = cd.consistency_distillation_loss(apply, teacher.spec.apply, schedule=VP, cfg=cfg,
                                               null_cond=None)
    losses[name] = float(loss_fn(params, jax.random.key(1), StepContext(params, jnp.int32(0)),
                                 (x0, None), teacher.params))
  assert losses["exact"] < 0.1 * losses["posterior_mean"], losses
  assert losses["exact"] < 5e-3, losses


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_solver_samples_the_exact_consistency_function(steps):
  """The `LCM` solver applies the same c_skip/c_out: driven by the exact consistency function it
  draws N(MU, COV) in one step or several (re-noising keeps the marginals exact)."""
  cfg = cd.LCMConfig()
  den = Denoiser(None, DenoiserSpec(apply=exact_consistency_x0_apply(cfg.timestep_scaling),
                                    prediction_type="sample"))
  n = 40_000
  x = np.asarray(sample(jax.random.key(0), den, VP, cfg.solver(), (n, 2), steps=steps),
                 np.float64)
  # standard errors: mean sqrt(0.6 / n) ~ 0.004, covariance entries ~ 0.6 sqrt(2 / n) ~ 0.005;
  # the last timestep 999 has abar ~ 4e-5, so starting at unit noise misses a mu-term of ~0.006
  np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
  np.testing.assert_allclose(np.cov(x.T), COV, atol=0.03)


def test_bad_input():
  with pytest.raises(ValueError, match="num_ddim_timesteps"):
    cd.LCMConfig(num_ddim_timesteps=0)
  with pytest.raises(ValueError, match="huber_c"):
    cd.LCMConfig(huber_c=0.0)
  with pytest.raises(ValueError, match="flow"):
    cd.flow_as_vp_denoiser(gaussian_denoiser(MU, COV, VP, "epsilon"), FLOW, VP)
  with pytest.raises(TypeError, match="schedule"):
    cd.flow_as_vp_denoiser(gaussian_denoiser(MU, COV, FLOW, "flow"), FLOW, FLOW)
  with pytest.raises(ValueError, match="num_ddim_timesteps"):
    cd.consistency_distillation_loss(None, None, schedule=VP, cfg=cd.LCMConfig(
        num_ddim_timesteps=2000), null_cond=None)


def test_segment_edges_are_the_trailing_ddim_grid():
  t = jnp.array([999, 750, 749, 500, 499, 250, 249, 19, 0])
  np.testing.assert_array_equal(cd.segment_edge(t, 1000, 4),
                                [749, 749, 499, 499, 249, 249, -1, -1, -1])
  from jaxinf.diffusion.solvers import DDIM
  ts = DDIM(spacing="trailing").timesteps(VP, 4)
  np.testing.assert_array_equal(cd.segment_edge(jnp.asarray(ts), 1000, 4), np.append(ts[1:], -1))
  x = jax.random.normal(jax.random.key(0), (3, 2))
  edge = jnp.array([749, 249, 499])
  # DDIM from an edge to itself is the identity, whatever x0 says (the boundary condition)
  np.testing.assert_allclose(cd.ddim_to(x, 5.0 + x**3, edge, edge, schedule=VP), x, atol=1e-5)


def exact_segment_x0_apply(segments):
  """An x0-predictor whose DDIM jump to t's segment edge is the exact PF-ODE map there for
  x0 ~ N(MU, COV): per eigen-direction x_e = a_e mu + sqrt((a_e^2 lam + s_e^2) /
  (a_t^2 lam + s_t^2)) (x_t - a_t mu); x0 solves a_e x0 + s_e (x_t - a_t x0) / s_t = x_e."""
  lam, u = np.linalg.eigh(COV)
  abar = jnp.asarray(VP.alphas_cumprod, jnp.float32)
  mu, u, lam = (jnp.asarray(v, jnp.float32) for v in (MU, u, lam))

  def apply(params, x, t, y):
    ti = jnp.round(t).astype(jnp.int32)
    e = cd.segment_edge(ti, VP.num_train_timesteps, segments)
    ab_e = jnp.where(e >= 0, abar[jnp.maximum(e, 0)], 1.0)[:, None]
    a, s = jnp.sqrt(abar[ti])[:, None], jnp.sqrt(1 - abar[ti])[:, None]
    a_e, s_e = jnp.sqrt(ab_e), jnp.sqrt(1 - ab_e)
    scale = jnp.sqrt((a_e**2 * lam[None] + s_e**2) / (a**2 * lam[None] + s**2))
    x_e = a_e * mu + ((x - a * mu) @ u * scale) @ u.T
    return (x_e - s_e / s * x) / (a_e - s_e * a / s)

  return apply


def test_multistep_consistency_of_the_exact_segment_map():
  """MLCM with S = 4 segments: the exact segment map has a loss set by one teacher DDIM step's
  discretisation, far below the posterior mean's, and trailing DDIM with 4 steps samples it
  exactly: N(MU, COV)."""
  from jaxinf.diffusion.solvers import DDIM
  cfg = cd.LCMConfig(guidance_scale=1.0)
  teacher = gaussian_denoiser(MU, COV, VP, "sample")
  exact = exact_segment_x0_apply(4)
  x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, 20_000), jnp.float32)
  losses = {}
  for name, apply, params in (("exact", exact, None),
                              ("posterior_mean", teacher.spec.apply, teacher.params)):
    loss_fn = cd.multistep_consistency_loss(apply, teacher.spec.apply, schedule=VP, cfg=cfg,
                                            segments=4, null_cond=None)
    losses[name] = float(loss_fn(params, jax.random.key(1), StepContext(params, jnp.int32(0)),
                                 (x0, None), teacher.params))
  assert losses["exact"] < 0.1 * losses["posterior_mean"], losses
  den = Denoiser(None, DenoiserSpec(apply=exact, prediction_type="sample"))
  x = np.asarray(sample(jax.random.key(0), den, VP, DDIM(spacing="trailing"), (40_000, 2),
                        steps=4), np.float64)
  # standard errors as in the LCM test above (~0.005); abar_999 ~ 4e-5 adds ~0.006 to the mean
  np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
  np.testing.assert_allclose(np.cov(x.T), COV, atol=0.03)
  with pytest.raises(ValueError, match="segments"):
    cd.multistep_consistency_loss(None, None, schedule=VP, cfg=cfg, segments=3, null_cond=None)
