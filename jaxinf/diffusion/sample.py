"""The sampling driver every solver runs in: one `lax.scan` over a precomputed coefficient table.

    x = sample(key, denoiser, schedule, solver, shape, steps=50, cond=labels, guidance=CFG(3.0))

The schedule and solver build a `[steps]` table of coefficients in numpy before tracing; the scan
body is the same arithmetic for every step (no `lax.cond` on the step index, no host sync). Step i
draws its noise from `fold_in(loop_key, i)` unless an explicit `noise` array replays given draws;
the initial noise comes from a key split off first and is scaled by the solver's initial noise
scale (diffusers' `init_noise_sigma`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, check_call
from jaxinf.diffusion.solvers import DDPM


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
    from jaxinf.diffusion.cache import sample_cached  # cache builds on this module
    return sample_cached(key, denoiser, schedule, solver, shape, steps=steps, cache=cache,
                         cond=cond, guidance=guidance, x_init=x_init)
  args, static = _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init,
                          return_trajectory, noise)
  return _scan(key, *args, **static)


def compile_sample(denoiser: Denoiser, schedule, solver,
                   shape: tuple[int, ...], *, steps: int, cond: Any = None, guidance=None,
                   x_init: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """Ahead-of-time compiled `sample`: returns `run(key) -> samples` (the same computation as
  `sample(key, ...)` with these arguments), so compilation and sampling can be timed apart."""
  args, static = _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init, False,
                          None)
  compiled = _scan.lower(jax.random.key(0), *args, **static).compile()
  return lambda key: compiled(key, *args)


def _prepare(denoiser, schedule, solver, shape, steps, cond, guidance, x_init, return_trajectory,
             noise):
  if not isinstance(schedule, (schedules.NoiseSchedule, schedules.FlowSchedule)):
    raise TypeError(f"schedule: expected a NoiseSchedule or FlowSchedule, got "
                    f"{type(schedule).__name__}")
  if not all(hasattr(solver, a) for a in ("table", "step", "init_state")):
    raise TypeError(f"solver: expected a solver (DDPM, DDIM, ...), got {type(solver).__name__}")
  schedules.check_steps(steps, schedule.num_train_timesteps)
  shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else shape
  check_call(denoiser, shape, cond)
  if hasattr(solver, "check"):
    solver.check(schedule, denoiser.spec.prediction_type)
  elif not isinstance(schedule, schedules.NoiseSchedule):
    raise TypeError(f"schedule: {type(solver).__name__} needs a NoiseSchedule")
  if isinstance(solver, DDPM) and solver.variance_type == "learned_range" \
      and not denoiser.spec.learned_sigma:
    raise ValueError("solver: variance_type='learned_range' needs a denoiser with learned_sigma")
  if x_init is not None and tuple(x_init.shape) != shape:
    raise ValueError(f"x_init: expected shape {shape}, got {tuple(x_init.shape)}")
  table = solver.table(schedule, steps)
  rows = len(table["t"])
  if noise is not None:
    if not solver.stochastic:
      raise ValueError(f"noise: {type(solver).__name__} with these options is deterministic and "
                       f"draws no noise")
    if tuple(np.shape(noise)) != (rows, *shape):
      raise ValueError(f"noise: expected shape {(rows, *shape)} (one draw per table row), got "
                       f"{tuple(np.shape(noise))}")
    noise = jnp.asarray(noise, jnp.float32)
  init_scale = getattr(solver, "init_noise_scale", lambda s, n: 1.0)(schedule, steps)
  if guidance is not None:
    denoiser = guidance(denoiser)
  table = {k: jnp.asarray(v) for k, v in table.items()}
  static = dict(solver=solver, shape=shape, return_trajectory=return_trajectory)
  return (denoiser, table, cond, x_init, noise, jnp.float32(init_scale)), static


def split_variance(denoiser: Denoiser, out: jax.Array):
  """(prediction, variance values or None) from a model output."""
  if not denoiser.spec.learned_sigma:
    return out, None
  c = out.shape[-1] // 2
  return out[..., :c], out[..., c:]


def denoise_step(denoiser: Denoiser, solver, x, c, cond, noise, state):
  """One step of the reverse process: evaluate the model at `c["t"]` on the solver's model input
  (x itself unless the solver scales it), apply the step rule."""
  t = jnp.broadcast_to(c["t"], (x.shape[0],))
  x_in = solver.model_input(x, c) if hasattr(solver, "model_input") else x
  out, var = split_variance(denoiser, denoiser(x_in, t, cond))
  return solver.step(x, out, var, c, noise, state, denoiser.spec.prediction_type)


def step_noise(loop_key: jax.Array, i, solver, shape) -> jax.Array | None:
  return jax.random.normal(jax.random.fold_in(loop_key, i), shape) if solver.stochastic else None


@functools.partial(jax.jit, static_argnames=("solver", "shape", "return_trajectory"))
def _scan(key, denoiser, table, cond, x_init, noise, init_scale, *, solver, shape,
          return_trajectory):
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape) if x_init is None else x_init.astype(jnp.float32)
  x = x * init_scale  # exact for the VP solvers' scale of 1
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
