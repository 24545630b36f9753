"""`sample(..., check_finite=True)`: the first non-finite value is reported by row, t and source.

Each source of a NaN/inf gets a case whose expected row is worked out independently of the
checker (from the solver's own timesteps, or from where the NaN was planted): the starting noise,
a replayed per-step noise draw, the denoiser output (NaN weights; a denoiser that breaks only
below a timestep), and the sampler state (a finite but huge output that overflows the step rule).
With the check off the NaN passes through unreported (the documented policy), the loop has no
finiteness test in it, and with it on a finite run returns exactly the unchecked result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion import sample as sample_module
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec
from jaxinf.diffusion.sample import NonFiniteSampleError, sample

SHAPE = (4, 3)
SCHED = schedules.NoiseSchedule("linear", 100)
STEPS = 10


def _scaled(params, x, t, cond):
  del cond
  return params["w"] * x * (t[:, None] + 1.0) / 200.0


def _broken_below(params, x, t, cond):
  """Finite at t >= params['t_bad'], NaN below."""
  del cond
  return jnp.where(t[:, None] >= params["t_bad"], 0.3 * x, jnp.nan)


def _huge(params, x, t, cond):
  del params, t, cond
  return jnp.full_like(x, 3e38)


def den(apply=_scaled, **params):
  params = {k: jnp.float32(v) for k, v in ({"w": 1.0} | params).items()}
  return Denoiser(params, DenoiserSpec(apply))


def run(denoiser=None, solver=None, **kw):
  return sample(jax.random.key(0), denoiser or den(), SCHED, solver or solvers.DDIM(), SHAPE,
                steps=STEPS, check_finite=True, **kw)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_starting_noise(value):
  x_init = np.zeros(SHAPE, np.float32)
  x_init[2, 1] = value
  with pytest.raises(NonFiniteSampleError, match=r"in the starting noise .*before the first step"):
    run(x_init=jnp.asarray(x_init))


@pytest.mark.parametrize("row", [0, 3, STEPS - 1])
def test_replayed_per_step_noise(row):
  solver = solvers.DDPM()
  noise = np.random.default_rng(0).standard_normal((STEPS, *SHAPE)).astype(np.float32)
  noise[row, 0, 0] = np.nan
  t = int(solver.timesteps(SCHED, STEPS)[row])
  with pytest.raises(NonFiniteSampleError,
                     match=rf"first at step {row} of {STEPS} \(t={t}\) in the per-step noise"):
    run(solver=solver, noise=jnp.asarray(noise))


def test_nan_weight_shows_in_the_first_denoiser_output():
  t = int(solvers.DDIM().timesteps(SCHED, STEPS)[0])
  with pytest.raises(NonFiniteSampleError,
                     match=rf"first at step 0 of {STEPS} \(t={t}\) in the denoiser output"):
    run(den(w=np.nan))


@pytest.mark.parametrize("solver", [solvers.DDIM(), solvers.DPMSolverPP(), solvers.UniPC()],
                         ids=lambda s: type(s).__name__)
def test_denoiser_that_breaks_below_a_timestep(solver):
  ts = solver.timesteps(SCHED, STEPS)
  t_bad = 45.0
  row = int(np.argmax(ts < t_bad))  # the first row whose model call sees t < t_bad
  assert 0 < row < STEPS
  with pytest.raises(NonFiniteSampleError,
                     match=rf"first at step {row} of {STEPS} \(t={int(ts[row])}\) in the denoiser"):
    run(den(_broken_below, t_bad=t_bad), solver)


def test_heun_names_the_table_row():
  solver = solvers.Heun()
  rows = 2 * STEPS - 1
  with pytest.raises(NonFiniteSampleError, match=rf"table row 0 of {rows} \({STEPS} steps\)"):
    run(den(w=np.nan), solver)


def test_overflow_in_the_step_rule_is_the_state():
  """A finite output of 3e38 makes DDIM's x0 = (x - s out) / a overflow at the first (noisiest)
  row: the denoiser output is finite, the state is not."""
  with pytest.raises(NonFiniteSampleError, match=r"first at step 0 .* in the sampler state"):
    run(den(_huge))


def test_off_means_unreported_and_unchecked():
  x = sample(jax.random.key(0), den(w=np.nan), SCHED, solvers.DDIM(), SHAPE, steps=STEPS)
  assert np.isnan(np.asarray(x)).all()
  table = solvers.DDIM().table(SCHED, STEPS)
  args = (jax.random.key(0), den(), {k: jnp.asarray(v) for k, v in table.items()}, None, None,
          None, jnp.float32(1.0))
  off = str(jax.make_jaxpr(lambda *a: sample_module._scan(
      *a, solver=solvers.DDIM(), shape=SHAPE, return_trajectory=False))(*args))
  on = str(jax.make_jaxpr(lambda *a: sample_module._scan(
      *a, solver=solvers.DDIM(), shape=SHAPE, return_trajectory=False, check_finite=True))(*args))
  assert "is_finite" not in off and "is_finite" in on


@pytest.mark.parametrize("solver", [solvers.DDPM(), solvers.Heun()], ids=lambda s: type(s).__name__)
def test_finite_run_is_unchanged(solver):
  base = sample(jax.random.key(3), den(), SCHED, solver, SHAPE, steps=STEPS,
                return_trajectory=True)
  checked = sample(jax.random.key(3), den(), SCHED, solver, SHAPE, steps=STEPS,
                   return_trajectory=True, check_finite=True)
  for a, b in zip(base, checked):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
