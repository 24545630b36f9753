"""Reflow and one-step distillation of rectified flows: 2-rectified flow, InstaFlow, SlimFlow.

Convention of `FlowSchedule`: x_s = (1 - s) x0 + s eps, the sampler integrates dx/ds = v from
s = 1 (noise) to s = 0 (data). A one-step model is a velocity model sampled by `FlowEuler` with
`steps=1`: x0 = z - v(z, s = 1).

- **Reflow** (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.3, Algorithm 1): draw noise z,
  push it through the teacher's ODE to x = Phi(z) (`ode_coupling`), and retrain — from the
  teacher's weights — with the flow-matching loss on the straight interpolations
  (1 - s) x + s z of these coupled pairs. Straightness (their eq. 6, `straightness`) measures how
  far the ODE's velocity departs from the straight line between its two ends.
- **InstaFlow** (Liu et al. 2024, "InstaFlow", Sec. 3.3, eq. 4): distil the 2-rectified flow into
  a one-step model by regressing z - v(z, 1) on the 2-RF's own coupled sample (`one_step_loss`);
  the paper uses LPIPS, on 8x8 digits it is the L2 distance here.
- **SlimFlow** (Zhu et al. 2024, "SlimFlow", Sec. 4): a *smaller* student, which cannot start from
  the teacher's weights, is trained with *annealing reflow* (`annealing_reflow_loss`): the noise of
  each teacher pair is mixed with fresh noise, z_beta = sqrt(1 - beta^2) z + beta eps (still
  standard normal), beta decaying from 1 (independent pairs: plain flow matching on the teacher's
  samples) to 0 (reflow on the teacher's coupling). Then *flow-guided distillation*
  (`flow_guided_distillation_loss`): the one-step loss on pairs from the small 2-RF's ODE plus a
  regulariser that matches the one-step output on fresh noise to the 2-RF's own 2-step Euler
  sample (computed online), which covers noise outside the finite pair set.

Every loss here is a `loss_fn(params, key, ctx, batch, frozen)` of
`jaxinf.train.flow.train_regression` (the shared step of `jaxinf.train.step` in the shared loop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.sample import sample
from jaxinf.diffusion.solvers import FlowEuler
from jaxinf.train.flow import FlowTrainConfig, flow_matching_loss
from jaxinf.train.step import StepContext


def _check_flow(denoiser: Denoiser, schedule) -> None:
  if not isinstance(schedule, schedules.FlowSchedule):
    raise TypeError(f"schedule: expected a FlowSchedule, got {type(schedule).__name__}")
  if not isinstance(denoiser, Denoiser) or denoiser.spec.prediction_type != "flow":
    got = denoiser.spec.prediction_type if isinstance(denoiser, Denoiser) else type(denoiser)
    raise ValueError(f"denoiser: expected a flow (velocity) Denoiser, got {got}")


def ode_coupling(key: jax.Array, denoiser: Denoiser, schedule: schedules.FlowSchedule, shape, *,
                 steps: int, cond=None, solver=FlowEuler(), guidance=None,
                 chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """(z, Phi(z)): standard-normal noise and the teacher ODE's image of it (Liu et al. 2023,
  Algorithm 1, "reflow" input), integrated by the `sample` driver with `solver` over `steps`.

  `chunk` rows are sampled per call so that memory stays bounded; every chunk has the same shape,
  so the scan compiles once (the last chunk is padded with repeated rows and trimmed).
  """
  _check_flow(denoiser, schedule)
  if getattr(solver, "stochastic", False):
    raise ValueError("solver: a coupling needs a deterministic ODE solver")
  n = shape[0]
  z = np.asarray(jax.random.normal(key, shape), np.float32)
  cond_np = None if cond is None else np.asarray(cond)
  out = []
  for lo in range(0, n, chunk):
    idx = np.minimum(np.arange(lo, lo + chunk), n - 1)[: min(chunk, n)]
    c = None if cond_np is None else jnp.asarray(cond_np[idx])
    x = sample(jax.random.key(0), denoiser, schedule, solver, (len(idx), *shape[1:]),
               steps=steps, cond=c, guidance=guidance, x_init=jnp.asarray(z[idx]))
    out.append(np.asarray(x)[: n - lo])
  return z, np.concatenate(out)[:n]


def straightness(denoiser: Denoiser, schedule: schedules.FlowSchedule, x_init: jax.Array, *,
                 steps: int, cond=None, guidance=None) -> float:
  """S = int_0^1 E || (x_end - x_start) / (s_end - s_start) - dx/ds ||^2 ds / d (Liu et al. 2023,
  eq. 6, per dimension), on the Euler trajectory of the `sample` driver from `x_init`.

  0 exactly when every trajectory is a straight line traversed at constant speed (then one Euler
  step is exact); the flow's velocity on each Euler interval is the chord slope of that interval.
  """
  _check_flow(denoiser, schedule)
  solver = FlowEuler()
  _, traj = sample(jax.random.key(0), denoiser, schedule, solver, tuple(x_init.shape),
                   steps=steps, cond=cond, guidance=guidance, x_init=x_init,
                   return_trajectory=True)
  xs = jnp.concatenate([x_init[None].astype(jnp.float32), traj])
  dt = jnp.asarray(solver.table(schedule, steps)["dt"])
  bshape = (-1,) + (1,) * x_init.ndim
  v = (xs[1:] - xs[:-1]) / dt.reshape(bshape)
  chord = (xs[-1] - xs[0]) / jnp.sum(dt)
  per_interval = jnp.mean(jnp.square(v - chord[None]), axis=tuple(range(1, v.ndim)))
  return float(jnp.sum(jnp.abs(dt) * per_interval) / jnp.sum(jnp.abs(dt)))


# ----------------------------------------------------------------------------------------------
# Losses. Each has the `loss_fn(params, key, ctx, batch, frozen)` signature of `train_regression`.


def reflow_loss(apply: Callable, *, schedule: schedules.FlowSchedule, cfg: FlowTrainConfig):
  """Flow matching on coupled pairs, batch = (z, x, y): the 2-rectified flow's loss (Liu et al.
  2023, eq. 1 with (X0, X1) drawn from the teacher's coupling). No label dropout: the coupling
  was drawn with the teacher's guidance, which the reflowed model inherits and is sampled without."""

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    del ctx, frozen
    z, x, y = batch
    return flow_matching_loss(apply, params, x, y, key, schedule=schedule, cfg=cfg, eps=z)

  return loss_fn


def one_step_prediction(apply: Callable, params, z: jax.Array, y, schedule) -> jax.Array:
  """x0 = z - v(z, s = 1): one Euler step of the flow from s = 1 to 0 (`FlowEuler`, steps=1)."""
  t = jnp.full((z.shape[0],), float(schedule.num_train_timesteps), jnp.float32)
  return z - apply(params, z, t, y).astype(jnp.float32)


def one_step_loss(apply: Callable, *, schedule: schedules.FlowSchedule):
  """InstaFlow's distillation loss (Liu et al. 2024, eq. 4) with d = L2: batch = (z, x, y),
  || z - v(z, 1) - x ||^2 / d."""

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    del key, ctx, frozen
    z, x, y = batch
    return jnp.mean(jnp.square(one_step_prediction(apply, params, z, y, schedule) - x))

  return loss_fn


def annealing_beta(step: jax.Array, anneal_steps: int) -> jax.Array:
  """SlimFlow's beta(k): 1 at the start (independent noise), linearly down to 0 at `anneal_steps`
  (pure reflow) and 0 after; the paper's schedule shape is not essential to the method."""
  return jnp.clip(1.0 - step.astype(jnp.float32) / anneal_steps, 0.0, 1.0)


def annealing_reflow_loss(apply: Callable, *, schedule: schedules.FlowSchedule,
                          cfg: FlowTrainConfig, anneal_steps: int):
  """SlimFlow's annealing reflow (Zhu et al. 2024, Sec. 4.1), batch = (z, x, y): flow matching on
  (x, z_beta) with z_beta = sqrt(1 - beta^2) z + beta eps, beta = `annealing_beta(step)`."""
  if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 1:
    raise ValueError(f"anneal_steps: expected a positive int, got {anneal_steps!r}")

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    del frozen
    z, x, y = batch
    k_eps, k_loss = jax.random.split(key)
    beta = annealing_beta(ctx.step, anneal_steps)
    z_beta = jnp.sqrt(1.0 - beta**2) * z + beta * jax.random.normal(k_eps, z.shape)
    return flow_matching_loss(apply, params, x, y, k_loss, schedule=schedule, cfg=cfg, eps=z_beta)

  return loss_fn


def two_step_euler(apply: Callable, params, z: jax.Array, y, schedule) -> jax.Array:
  """The 2-RF's 2-step Euler sample, s = 1 -> 1/2 -> 0: the online target of flow-guided
  distillation."""
  t_max = float(schedule.num_train_timesteps)
  b = z.shape[0]
  x_half = z - 0.5 * apply(params, z, jnp.full((b,), t_max), y)
  return x_half - 0.5 * apply(params, x_half, jnp.full((b,), 0.5 * t_max), y)


def flow_guided_distillation_loss(apply: Callable, *, schedule: schedules.FlowSchedule,
                                  guide_weight: float = 1.0):
  """SlimFlow's flow-guided distillation (Zhu et al. 2024, Sec. 4.2), batch = (z, x, y) from the
  small 2-RF's ODE, frozen = the 2-RF's weights:
  || G(z) - x ||^2 + guide_weight || G(eps) - sg(Euler_2(eps)) ||^2, G the one-step model, eps
  fresh noise, Euler_2 the 2-RF's 2-step sample."""
  if not guide_weight >= 0:
    raise ValueError(f"guide_weight: expected >= 0, got {guide_weight}")

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    del ctx
    z, x, y = batch
    eps = jax.random.normal(key, z.shape)
    target = jax.lax.stop_gradient(two_step_euler(apply, frozen, eps, y, schedule))
    distill = jnp.mean(jnp.square(one_step_prediction(apply, params, z, y, schedule) - x))
    guide = jnp.mean(jnp.square(one_step_prediction(apply, params, eps, y, schedule) - target))
    return distill + guide_weight * guide

  return loss_fn


@dataclasses.dataclass(frozen=True)
class CouplingConfig:
  """How a teacher's coupling is drawn: `pairs` noise/sample pairs (balanced over the classes),
  FlowEuler with `solver_steps`, classifier-free guidance `guidance_scale` (1: none)."""

  pairs: int = 2000
  solver_steps: int = 25
  guidance_scale: float = 1.5
  seed: int = 0

  def __post_init__(self):
    for name in ("pairs", "solver_steps"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    g = self.guidance_scale
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < float("inf"):
      raise ValueError(f"guidance_scale: expected a finite number >= 0, got {g!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
