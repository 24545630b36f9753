"""The sampling driver every solver runs in: one `lax.scan` over a precomputed coefficient table.

    x = sample(key, denoiser, schedule, solver, shape, steps=50, cond=labels, guidance=CFG(3.0))

The schedule and solver build a `[steps]` table of coefficients in numpy before tracing
(`reverse.prepare`); the scan body is the same arithmetic for every step (no `lax.cond` on the
step index, no host sync) and the same for every solver: the contract `solvers.Solver` states it,
and the driver knows no solver by name. Step i draws its noise from `fold_in(loop_key, i)` unless
an explicit `noise` array replays given draws; the initial noise comes from a key split off first
and is scaled by the solver's initial noise scale (diffusers' `init_noise_sigma`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.diffusion.cache import sample_cached
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.reverse import denoise_step, initial_noise, prepare, step_noise


def sample(key: jax.Array, denoiser: Denoiser, schedule, solver, shape: tuple[int, ...], *,
           steps: int, cond: Any = None, guidance=None, x_init: jax.Array | None = None,
           return_trajectory: bool = False, noise: jax.Array | None = None, cache=None):
  """Draws `shape[0]` samples with `solver` over `steps` timesteps of `schedule` (a
  `NoiseSchedule`, or a `FlowSchedule` for the flow solvers).

  guidance: a callable Denoiser -> Denoiser such as `CFG(scale)`, applied before sampling.
  x_init: the unit-scale starting noise (default: standard normal from `key`); like diffusers'
    pipelines, the driver multiplies it by `solver.init_noise_scale` (1 for VP solvers).
  return_trajectory: also return `[rows, *shape]` — x after each table row (one row per step;
    Heun-type solvers interleave 2 steps - 1 rows).
  noise: `[rows, *shape]` per-row standard-normal draws for a stochastic solver, replacing the
    `fold_in` draws, so a trajectory can be replayed against another library's noise.
  cache: a `jaxinf.diffusion.cache.FeatureCache` refresh schedule: reuse the denoiser's block
    features between refresh steps (the denoiser needs feature hooks; see that module).
  All arguments are validated here, before anything is traced.
  """
  if cache is not None:
    if return_trajectory or noise is not None:
      raise ValueError("cache: cannot be combined with return_trajectory or noise")
    return sample_cached(key, denoiser, schedule, solver, shape, steps=steps, cache=cache,
                         cond=cond, guidance=guidance, x_init=x_init)
  run = prepare(denoiser, schedule, solver, shape, steps=steps, cond=cond, guidance=guidance,
                x_init=x_init, noise=noise)
  return _scan(key, *_dynamic(run), solver=run.solver, shape=run.shape,
               return_trajectory=return_trajectory)


def compile_sample(denoiser: Denoiser, schedule, solver,
                   shape: tuple[int, ...], *, steps: int, cond: Any = None, guidance=None,
                   x_init: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """Ahead-of-time compiled `sample`: returns `run(key) -> samples` (the same computation as
  `sample(key, ...)` with these arguments), so compilation and sampling can be timed apart."""
  run = prepare(denoiser, schedule, solver, shape, steps=steps, cond=cond, guidance=guidance,
                x_init=x_init)
  args = _dynamic(run)
  compiled = _scan.lower(jax.random.key(0), *args, solver=run.solver, shape=run.shape,
                         return_trajectory=False).compile()
  return lambda key: compiled(key, *args)


def _dynamic(run):
  """The traced arguments of `_scan`, in its order."""
  return run.denoiser, run.table, run.cond, run.x_init, run.noise, run.init_scale


@functools.partial(jax.jit, static_argnames=("solver", "shape", "return_trajectory"))
def _scan(key, denoiser, table, cond, x_init, noise, init_scale, *, solver, shape,
          return_trajectory):
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  steps = table["t"].shape[0]

  def body(carry, inputs):
    x, state = carry
    i, c, z = inputs
    if z is None:
      z = step_noise(loop_key, i, solver, shape)
    x, state = denoise_step(denoiser, solver, x, c, cond, z, state)
    return (x, state), (x if return_trajectory else None)

  (x, _), traj = jax.lax.scan(body, (x, solver.init_state(x)), (jnp.arange(steps), table, noise))
  return (x, traj) if return_trajectory else x
