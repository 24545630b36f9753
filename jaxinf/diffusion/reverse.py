"""What every sampling loop shares: a request checked and turned into a coefficient table before
tracing (`prepare`), and the pieces of one step of the reverse process inside the loop.

`sample.py` (one `lax.scan` over the table) and `cache.py` (the feature-cached loops and their
calibration) run the same request the same way:

    run = prepare(denoiser, schedule, solver, shape, steps=steps, cond=cond, guidance=guidance)
    x, loop_key = initial_noise(key, run.x_init, run.init_scale, run.shape)   # inside jit
    # row i of run.table: model_inputs -> the denoiser (or its cached half) -> apply_step

The reverse process is Ho et al. 2020, Algorithm 2 in its general form: from unit noise scaled
by the solver's initial noise scale (diffusers' `init_noise_sigma`), each table row evaluates the
model at that row's timestep and applies the solver's step rule (`solvers.Solver`); row i draws
its noise from `fold_in(loop_key, i)` (DESIGN.md, "Randomness").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, check_call
from jaxinf.diffusion.solvers import Solver


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A checked sampling request, ready for a jitted loop.

  denoiser: the denoiser with guidance applied. table: the solver's per-row coefficients as
  `[rows]` jnp arrays (`table["t"]` the model timesteps). cond: the condition as given.
  x_init: the unit-scale starting noise, or None to draw it. noise: `[rows, *shape]` replayed
  per-row draws, or None to draw them. init_scale: fp32 scalar the start is multiplied by.
  solver, shape: static (hashable) arguments of the loop.
  """

  denoiser: Denoiser
  table: dict[str, jax.Array]
  cond: Any
  x_init: jax.Array | None
  noise: jax.Array | None
  init_scale: jax.Array
  solver: Solver
  shape: tuple[int, ...]

  @property
  def rows(self) -> int:
    """Model evaluations (table rows): `steps`, or 2 steps - 1 for the Heun-type solvers."""
    return int(self.table["t"].shape[0])


def prepare(denoiser: Denoiser, schedule, solver: Solver, shape: tuple[int, ...], *, steps: int,
            cond: Any = None, guidance=None, x_init: jax.Array | None = None,
            noise: jax.Array | None = None) -> Prepared:
  """Checks a sampling request before anything is traced (a bad argument is a ValueError or
  TypeError naming it) and builds the solver's coefficient table in numpy (float64, stored as
  fp32) — the arguments of `sample.sample`, which documents them."""
  if not isinstance(schedule, (schedules.NoiseSchedule, schedules.FlowSchedule)):
    raise TypeError(f"schedule: expected a NoiseSchedule or FlowSchedule, got "
                    f"{type(schedule).__name__}")
  if not isinstance(solver, Solver):
    raise TypeError(f"solver: expected a solver (DDPM, DDIM, ...), got {type(solver).__name__}")
  schedules.check_steps(steps, schedule.num_train_timesteps)
  if isinstance(shape, list):
    shape = tuple(shape)
  if isinstance(shape, tuple) and any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                      for s in shape):
    raise TypeError(f"shape: expected a tuple of ints [B, ...], got {shape!r}")
  shape = tuple(int(s) for s in shape) if isinstance(shape, tuple) else shape
  check_call(denoiser, shape, cond)
  solver.check(schedule, denoiser.spec)
  if x_init is not None:
    x_init = _check_float_array("x_init", x_init, shape)
  table = solver.table(schedule, steps)
  rows = len(table["t"])
  if noise is not None:
    if not solver.stochastic:
      raise ValueError(f"noise: {type(solver).__name__} with these options is deterministic and "
                       f"draws no noise")
    noise = _check_float_array("noise", noise, (rows, *shape), "(one draw per table row)")
    noise = jnp.asarray(noise, jnp.float32)
  init_scale = solver.init_noise_scale(schedule, steps)
  if guidance is not None:
    if not callable(guidance):
      raise TypeError(f"guidance: expected a callable Denoiser -> Denoiser such as CFG(scale), got "
                      f"{type(guidance).__name__}")
    denoiser = guidance(denoiser)
    if not isinstance(denoiser, Denoiser):
      raise TypeError(f"guidance: expected it to return a Denoiser, got "
                      f"{type(denoiser).__name__}")
  return Prepared(denoiser=denoiser, table={k: jnp.asarray(v) for k, v in table.items()},
                  cond=cond, x_init=x_init, noise=noise, init_scale=jnp.float32(init_scale),
                  solver=solver, shape=shape)


def _check_float_array(name: str, value, shape: tuple[int, ...], why: str = ""):
  """A real floating array of exactly `shape` (numpy, jax, or a tracer); integer, bool and complex
  arrays are refused rather than cast."""
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise TypeError(f"{name}: expected a float array of shape {shape}, got {type(value).__name__}")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a real floating dtype (float32, bfloat16, ...), got "
                    f"{value.dtype}")
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}{' ' + why if why else ''}, got "
                     f"{tuple(value.shape)}")
  return value


# --- inside the loop ----------------------------------------------------------------------------

def initial_noise(key: jax.Array, x_init: jax.Array | None, init_scale: jax.Array,
                  shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(x at the first row, the loop key): a key is split off first for the starting noise (or
  `x_init` replaces it), which is scaled by the solver's initial noise scale."""
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape) if x_init is None else x_init.astype(jnp.float32)
  return x * init_scale, loop_key  # exact for the VP solvers' scale of 1


def step_noise(loop_key: jax.Array, i, solver: Solver, shape) -> jax.Array | None:
  """Row i's standard-normal draw, `fold_in(loop_key, i)`; None for a deterministic solver."""
  return jax.random.normal(jax.random.fold_in(loop_key, i), shape) if solver.stochastic else None


def split_variance(denoiser: Denoiser, out: jax.Array):
  """(prediction, variance values or None) from a model output: a learned-sigma model's second
  half of channels interpolates the log variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15)."""
  if not denoiser.spec.learned_sigma:
    return out, None
  c = out.shape[-1] // 2
  return out[..., :c], out[..., c:]


def model_inputs(solver: Solver, x: jax.Array, c: dict) -> tuple[jax.Array, jax.Array]:
  """(what the model sees, timesteps `[B]`) at table row `c`."""
  return solver.model_input(x, c), jnp.broadcast_to(c["t"], (x.shape[0],))


def apply_step(denoiser: Denoiser, solver: Solver, x, c, out, noise, state):
  """The solver's step rule on a model output `out` at row `c`: (x at the next row, state)."""
  pred, var = split_variance(denoiser, out)
  return solver.step(x, pred, var, c, noise, state, denoiser.spec.prediction_type)


def denoise_step(denoiser: Denoiser, solver: Solver, x, c, cond, noise, state):
  """One step of the reverse process: evaluate the model at `c["t"]` on the solver's model input,
  apply the step rule."""
  x_in, t = model_inputs(solver, x, c)
  return apply_step(denoiser, solver, x, c, denoiser(x_in, t, cond), noise, state)
