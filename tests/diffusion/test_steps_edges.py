"""Every solver and spacing at the edges of the step range: steps in {1, 2, T-1, T}.

`steps` may be anything in [1, num_train_timesteps]. At steps = T, DPM-Solver++'s and UniPC's
linspace / leading grids (diffusers' rules: steps + 1 integer points in [0, T-1], the last one
dropped) repeat a timestep, and the coefficient table used to get a zero step h and then
infinities (all-NaN samples). jaxinf visits every timestep T-1 .. 0 there instead (the trailing grid;
parity with diffusers' trailing run: tests/parity/test_schedulers_vs_diffusers.py). Here:

- every table is finite, with the right number of rows and strictly decreasing noise levels
  (T = 50 and T = 1000; numpy only, no tracing);
- at steps = T on T = 50, DPM-Solver++ and UniPC under every spacing, driven by the exact
  denoiser of Gaussian data from the exact marginal, reproduce that Gaussian (z-score bound);
- a table that is not finite (an extreme schedule) is refused by name when built;
- Euler/Heun's starting noise scale on a short schedule: diffusers' convention, measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import gaussian_denoiser
from jaxinf.diffusion.sample import sample

SPACED = ("ddpm", "ddim", "dpmsolver++", "unipc", "euler", "heun")  # take `spacing`


def variants(name):
  """(id, solver) for every spacing (and the sigma options of the multistep solvers)."""
  cls = solvers.SOLVERS[name]
  if name not in SPACED:
    return [(name, cls())]
  out = [(f"{name}-{sp}", cls(spacing=sp)) for sp in schedules.TIMESTEP_SPACINGS]
  if name in ("dpmsolver++", "unipc"):
    out += [(f"{name}-{sp}-sigma_min", cls(spacing=sp, final_sigmas_type="sigma_min"))
            for sp in schedules.TIMESTEP_SPACINGS]
  if name in ("dpmsolver++", "unipc", "euler", "heun"):
    out += [(f"{name}-karras", cls(use_karras_sigmas=True))]
  return out


CASES = [v for name in solvers.SOLVERS for v in variants(name)]


def schedule_for(solver, t_max):
  if isinstance(solver, (solvers.FlowEuler, solvers.FlowHeun)):
    return schedules.FlowSchedule(t_max)
  return schedules.NoiseSchedule("linear", t_max)


@pytest.mark.parametrize("t_max", [50, 1000])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_table_is_finite_at_every_step_edge(case, t_max):
  _, solver = case
  sched = schedule_for(solver, t_max)
  for steps in (1, 2, t_max - 1, t_max):
    if isinstance(solver, (solvers.LCM, solvers.TCD)):
      solver = type(solver)(original_inference_steps=t_max)  # at most that many steps
    table = solver.table(sched, steps)
    rows = 2 * steps - 1 if isinstance(solver, (solvers.Heun, solvers.FlowHeun)) else steps
    for k, col in table.items():
      assert col.shape == (rows,), (k, steps)
      assert np.all(np.isfinite(col)), (k, steps)
    ts = solver.timesteps(sched, steps)
    assert len(ts) == steps
    karras = getattr(solver, "use_karras_sigmas", False)
    if not karras:  # rounded Karras timesteps may repeat (diffusers too); their sigmas don't
      assert np.all(np.diff(ts) < 0), f"repeated or increasing timestep at steps={steps}: {ts}"
    if "sigma" in table and rows == steps:
      assert np.all(np.diff(table["sigma"]) <= 0), steps


@pytest.mark.parametrize("cls", [solvers.DPMSolverPP, solvers.UniPC])
@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
def test_full_grid_reproduces_the_gaussian(cls, spacing):
  """steps = T = 50: samples of N(mu, s^2) from the exact marginal at the first noise level come
  out N(mu, s^2) (each of the mean and the variance within 4.5 standard errors)."""
  t_max, n, mu, var = 50, 20_000, 0.7, 0.49
  sched = schedules.NoiseSchedule("linear", t_max)
  solver = cls(spacing=spacing)
  table = solver.table(sched, t_max)
  a, s = float(table["alpha"][0]), float(table["sigma"][0])
  x_init = np.random.default_rng(0).normal(a * mu, np.sqrt(a * a * var + s * s), (n, 1))
  den = gaussian_denoiser(np.array([mu]), np.array([[var]]), sched)
  x = np.asarray(sample(jax.random.key(0), den, sched, solver, (n, 1), steps=t_max,
                        x_init=jnp.asarray(x_init, jnp.float32), check_finite=True), np.float64)
  assert np.all(np.isfinite(x))
  z_mean = abs(x.mean() - mu) / np.sqrt(var / n)
  z_var = abs(x.var() - var) / (var * np.sqrt(2.0 / n))
  assert z_mean < 4.5 and z_var < 4.5, (z_mean, z_var)


def test_non_finite_table_is_refused_by_name():
  """A schedule whose abar underflows to 0 (beta_end = 0.999 over 1000 steps) makes infinite
  sigmas; each solver's table then names itself, the column, steps and the spacing."""
  sched = schedules.NoiseSchedule("linear", 1000, beta_end=0.999)
  for solver in (solvers.DDIM(), solvers.DDPM(), solvers.DPMSolverPP(), solvers.UniPC(),
                 solvers.Euler(), solvers.Heun()):
    with pytest.warns(RuntimeWarning), pytest.raises(solvers.NonFiniteTableError) as info:
      solver.table(sched, 1000)
    message = str(info.value)
    for part in (type(solver).__name__, "steps=1000", f"spacing={solver.spacing!r}"):
      assert part in message, message


def test_fp32_overflow_of_a_finite_float64_column_is_refused():
  with pytest.raises(solvers.NonFiniteTableError, match="'c'.*row 1"):
    solvers.DDIM()._finish(2, t=np.array([1.0, 0.0]), c=np.array([1.0, 1e39]))


@pytest.mark.parametrize("cls,name", [(solvers.Euler, "EulerDiscreteScheduler"),
                                      (solvers.Heun, "HeunDiscreteScheduler")])
@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
def test_euler_heun_start_scale_is_diffusers_convention(cls, name, spacing):
  """Euler/Heun on a short schedule: sample std 0.63 instead of 1 is diffusers' convention, not a bug.

  Euler/Heun keep x at the VE scale x = x0 + sigma eps, whose exact marginal at the first level
  has variance var(x0) + sigma_max^2. diffusers starts from `init_noise_sigma` times unit noise,
  with init_noise_sigma = sigma_max for linspace / trailing spacing (right only when sigma_max >> 1,
  e.g. 157 on the standard T = 1000 linear schedule) and sqrt(sigma_max^2 + 1) for leading. On a
  T = 50 linear schedule sigma_max = 0.80, so for unit-variance data the start has std 0.80
  instead of 1.28 and the (linear, for Gaussian data) ODE carries that ratio to the end: std
  0.80 / 1.28 = 0.62. jaxinf matches diffusers (`init_noise_scale` = `init_noise_sigma`, and the
  same run through diffusers' own scheduler gives the same std); pass `x_init` drawn from the exact
  marginal (as tests/diffusion/test_solvers_gaussian_oracle.py does) to avoid it.
  """
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  t_max, n, steps = 50, 20_000, 25
  sched = schedules.NoiseSchedule("linear", t_max)
  solver = cls(spacing=spacing)
  ref = getattr(diffusers, name)(num_train_timesteps=t_max, beta_schedule="linear",
                                 beta_start=1e-4, beta_end=0.02, timestep_spacing=spacing)
  ref.set_timesteps(steps)
  scale = solver.init_noise_scale(sched, steps)
  np.testing.assert_allclose(scale, float(ref.init_noise_sigma), rtol=1e-6)
  sigma_max = float(solver.table(sched, steps)["sigma"][0])
  expected = scale / np.sqrt(sigma_max**2 + 1.0)  # std of the output for unit-variance data
  if spacing == "leading":
    np.testing.assert_allclose(expected, 1.0, rtol=1e-5)
  else:
    assert expected < 0.7  # the mismatch this test is about

  z = np.random.default_rng(1).standard_normal((n, 1)).astype(np.float32)
  den = gaussian_denoiser(np.zeros(1), np.eye(1), sched)
  ours = np.asarray(sample(jax.random.key(0), den, sched, solver, (n, 1), steps=steps,
                           x_init=jnp.asarray(z)), np.float64)
  # diffusers' own loop with the same exact denoiser: eps_hat = E[eps | x] = s x / (1 + s^2) for
  # N(0, 1) data at VE level s, written in the model's input x / sqrt(1 + s^2)
  x = torch.from_numpy(z.astype(np.float64)) * ref.init_noise_sigma
  for t in ref.timesteps:
    x_in = ref.scale_model_input(x, t)
    s = float(ref.sigmas[ref.step_index])
    x = ref.step(s / np.sqrt(1.0 + s * s) * x_in, t, x).prev_sample
  theirs = x.numpy()
  se = expected / np.sqrt(2.0 * n)  # standard error of a sample std
  assert abs(ours.std() - expected) < 4.5 * se, (ours.std(), expected)
  assert abs(theirs.std() - expected) < 4.5 * se, (theirs.std(), expected)
  np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)
