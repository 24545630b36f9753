"""The sampling driver every solver runs in: one `lax.scan` over a precomputed coefficient table.

    x = sample(key, denoiser, schedule, solver, shape, steps=50, cond=labels, guidance=CFG(3.0))

The schedule and solver build a `[steps]` table of coefficients in numpy before tracing; the scan
body is the same arithmetic for every step (no `lax.cond` on the step index, no host sync). Step i
draws its noise from `fold_in(loop_key, i)`; the initial noise comes from a key split off first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, check_call
from jaxinf.diffusion.solvers import DDPM


def sample(key: jax.Array, denoiser: Denoiser, schedule: schedules.NoiseSchedule, solver,
           shape: tuple[int, ...], *, steps: int, cond: Any = None, guidance=None,
           x_init: jax.Array | None = None, return_trajectory: bool = False):
  """Draws `shape[0]` samples with `solver` over `steps` timesteps of `schedule`.

  guidance: a callable Denoiser -> Denoiser such as `CFG(scale)`, applied before sampling.
  x_init: the starting point x_T (default: standard normal from `key`).
  return_trajectory: also return `[steps, *shape]` — x after each step.
  All arguments are validated here, before anything is traced.
  """
  args, static = _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init,
                          return_trajectory)
  return _scan(key, *args, **static)


def compile_sample(denoiser: Denoiser, schedule: schedules.NoiseSchedule, solver,
                   shape: tuple[int, ...], *, steps: int, cond: Any = None, guidance=None,
                   x_init: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """Ahead-of-time compiled `sample`: returns `run(key) -> samples` (the same computation as
  `sample(key, ...)` with these arguments), so compilation and sampling can be timed apart."""
  args, static = _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init, False)
  compiled = _scan.lower(jax.random.key(0), *args, **static).compile()
  return lambda key: compiled(key, *args)


def _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init, return_trajectory):
  if not isinstance(schedule, schedules.NoiseSchedule):
    raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
  if not all(hasattr(solver, a) for a in ("table", "step", "init_state")):
    raise TypeError(f"solver: expected a solver (DDPM, DDIM, ...), got {type(solver).__name__}")
  schedules.check_steps(steps, schedule.num_train_timesteps)
  shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else shape
  check_call(denoiser, shape, cond)
  if isinstance(solver, DDPM) and solver.variance_type == "learned_range" \
      and not denoiser.spec.learned_sigma:
    raise ValueError("solver: variance_type='learned_range' needs a denoiser with learned_sigma")
  if x_init is not None and tuple(x_init.shape) != shape:
    raise ValueError(f"x_init: expected shape {shape}, got {tuple(x_init.shape)}")
  if guidance is not None:
    denoiser = guidance(denoiser)
  table = {k: jnp.asarray(v) for k, v in solver.table(schedule, steps).items()}
  static = dict(solver=solver, shape=shape, return_trajectory=return_trajectory)
  return (denoiser, table, cond, x_init), static


def split_variance(denoiser: Denoiser, out: jax.Array):
  """(prediction, variance values or None) from a model output."""
  if not denoiser.spec.learned_sigma:
    return out, None
  c = out.shape[-1] // 2
  return out[..., :c], out[..., c:]


def denoise_step(denoiser: Denoiser, solver, x, c, cond, noise, state):
  """One step of the reverse process: evaluate the model at `c["t"]`, apply the step rule."""
  t = jnp.broadcast_to(c["t"], (x.shape[0],))
  out, var = split_variance(denoiser, denoiser(x, t, cond))
  return solver.step(x, out, var, c, noise, state, denoiser.spec.prediction_type)


def step_noise(loop_key: jax.Array, i, solver, shape) -> jax.Array | None:
  return jax.random.normal(jax.random.fold_in(loop_key, i), shape) if solver.stochastic else None


@functools.partial(jax.jit, static_argnames=("solver", "shape", "return_trajectory"))
def _scan(key, denoiser, table, cond, x_init, *, solver, shape, return_trajectory):
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape) if x_init is None else x_init.astype(jnp.float32)
  steps = table["t"].shape[0]

  def body(carry, inputs):
    x, state = carry
    i, c = inputs
    x, state = denoise_step(denoiser, solver, x, c, cond, step_noise(loop_key, i, solver, shape),
                            state)
    return (x, state), (x if return_trajectory else None)

  (x, _), traj = jax.lax.scan(body, (x, solver.init_state(x)), (jnp.arange(steps), table))
  return (x, traj) if return_trajectory else x
