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
import numpy as np

from jaxinf.config import check_key
from jaxinf.diffusion.cache import sample_cached
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.reverse import (apply_step, denoise_step, initial_noise,
                                      model_inputs, prepare, step_noise)


class NonFiniteSampleError(FloatingPointError):
  """`sample(..., check_finite=True)` found a NaN or inf: the message names the first table row
  (and its model timestep) and where it appeared."""


# where a non-finite value can first appear, in the order they are checked within one row
_SOURCES = ("the starting noise x_init", "the denoiser output", "the per-step noise",
            "the sampler state (x after the step rule)")


def sample(key: jax.Array, denoiser: Denoiser, schedule, solver, shape: tuple[int, ...], *,
           steps: int, cond: Any = None, guidance=None, x_init: jax.Array | None = None,
           return_trajectory: bool = False, noise: jax.Array | None = None, cache=None,
           check_finite: bool = False):
  """Draws `shape[0]` samples with `solver` over `steps` timesteps of `schedule` (a
  `NoiseSchedule`, or a `FlowSchedule` for the flow solvers).

  key: one PRNG key (`jax.random.key(seed)`; a legacy `PRNGKey` is accepted). An int or a batch
    of keys is refused: vmap `sample` over keys instead.
  shape: a tuple of ints `[B, ...]`; steps: an int in [1, num_train_timesteps].
  guidance: a callable Denoiser -> Denoiser such as `CFG(scale)`, applied before sampling.
  x_init: the unit-scale starting noise (default: standard normal from `key`), a real floating
    array of `shape` (integer, bool or complex arrays are refused, not cast); like diffusers'
    pipelines, the driver multiplies it by `solver.init_noise_scale` (1 for VP solvers).
  return_trajectory: also return `[rows, *shape]` — x after each table row (one row per step;
    Heun-type solvers interleave 2 steps - 1 rows).
  noise: `[rows, *shape]` per-row standard-normal draws for a stochastic solver, replacing the
    `fold_in` draws, so a trajectory can be replayed against another library's noise.
  cache: a `jaxinf.diffusion.cache.FeatureCache` refresh schedule: reuse the denoiser's block
    features between refresh steps (the denoiser needs feature hooks; see that module).
  check_finite: the non-finite policy. Off (the default), nothing is checked and the compiled
    loop is exactly the unchecked one: a NaN or inf anywhere (starting noise, replayed noise,
    weights, the denoiser's arithmetic) propagates to the output unreported. On, the scan also
    carries the index of the first row at which a non-finite value appeared and where: in the
    starting noise (row -1, before the first step), the denoiser output, the row's noise draw, or
    the state after the step rule. Nothing syncs per step; after the scan the host reads that
    index once and raises `NonFiniteSampleError` (a `FloatingPointError`), e.g. "sample:
    non-finite values first at step 3 of 50 (t=741) in the denoiser output". Needs concrete
    arguments (call `sample` outside `jit`/`vmap` to use it); not combined with `cache`.
  Every solver's coefficient table is checked finite when built (`solvers.NonFiniteTableError`),
  whatever `check_finite` says. All arguments are validated here, before anything is traced.
  """
  check_key(key)
  for name, flag in (("return_trajectory", return_trajectory), ("check_finite", check_finite)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name}: expected a bool, got {flag!r}")
  if check_finite and any(isinstance(v, jax.core.Tracer) for v in
                          jax.tree.leaves((key, x_init, noise, cond, denoiser))):
    raise ValueError("check_finite: reports on the host after the scan, so it needs concrete "
                     "arguments; call sample outside jit/vmap, or leave check_finite off there")
  if cache is not None:
    if return_trajectory or noise is not None or check_finite:
      raise ValueError("cache: cannot be combined with return_trajectory, noise or check_finite")
    return sample_cached(key, denoiser, schedule, solver, shape, steps=steps, cache=cache,
                         cond=cond, guidance=guidance, x_init=x_init)
  run = prepare(denoiser, schedule, solver, shape, steps=steps, cond=cond, guidance=guidance,
                x_init=x_init, noise=noise)
  out = _scan(key, *_dynamic(run), solver=run.solver, shape=run.shape,
              return_trajectory=return_trajectory, check_finite=bool(check_finite))
  if not check_finite:
    return out
  *out, (row, source) = out
  row, source = int(row), int(source)  # the one host sync, after the whole scan
  if source >= 0:
    raise NonFiniteSampleError(_nonfinite_message(run, steps, row, source))
  return tuple(out) if return_trajectory else out[0]


def _nonfinite_message(run, steps: int, row: int, source: int) -> str:
  if row < 0:
    return f"sample: non-finite values in {_SOURCES[source]} (before the first step)"
  rows = run.rows
  where = (f"step {row} of {steps}" if rows == steps
           else f"table row {row} of {rows} ({steps} steps)")
  t = float(np.asarray(run.table["t"])[row])
  t_text = f"{t:g}" if t != int(t) else str(int(t))
  return f"sample: non-finite values first at {where} (t={t_text}) in {_SOURCES[source]}"


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


@functools.partial(jax.jit, static_argnames=("solver", "shape", "return_trajectory",
                                             "check_finite"))
def _scan(key, denoiser, table, cond, x_init, noise, init_scale, *, solver, shape,
          return_trajectory, check_finite=False):
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  steps = table["t"].shape[0]

  def body(carry, inputs):
    x, state, bad = carry
    i, c, z = inputs
    if z is None:
      z = step_noise(loop_key, i, solver, shape)
    if not check_finite:
      x, state = denoise_step(denoiser, solver, x, c, cond, z, state)
      return (x, state, bad), (x if return_trajectory else None)
    x_in, t = model_inputs(solver, x, c)
    out = denoiser(x_in, t, cond)
    x, state = apply_step(denoiser, solver, x, c, out, z, state)
    # the first non-finite source at this row (in _SOURCES order), -1 if none
    flags = [jnp.logical_not(_all_finite(out)),
             jnp.logical_not(_all_finite(z)) if z is not None else jnp.bool_(False),
             jnp.logical_not(_all_finite((x, state)))]
    source = jnp.int32(-1)
    for k in reversed(range(len(flags))):
      source = jnp.where(flags[k], jnp.int32(k + 1), source)
    new = (bad[1] < 0) & (source >= 0)
    bad = (jnp.where(new, i, bad[0]), jnp.where(new, source, bad[1]))
    return (x, state, bad), (x if return_trajectory else None)

  if check_finite:  # (row, source): row -1 is the starting noise
    bad = (jnp.int32(-1), jnp.where(_all_finite(x), jnp.int32(-1), jnp.int32(0)))
  else:
    bad = None
  (x, _, bad), traj = jax.lax.scan(body, (x, solver.init_state(x), bad),
                                   (jnp.arange(steps, dtype=jnp.int32), table, noise))
  out = (x, traj) if return_trajectory else (x,)
  if check_finite:
    return (*out, bad)
  return out if return_trajectory else x


def _all_finite(tree) -> jax.Array:
  """Whether every floating leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
