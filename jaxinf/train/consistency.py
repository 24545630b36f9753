"""Latent-consistency-style distillation (LCM, Luo et al. 2023, Algorithm 1) of a flow teacher,
sampled by the existing `LCM` solver (multistep consistency sampling with re-noising).

**The teacher on a VP schedule.** A rectified flow x_s = (1 - s) x0 + s eps is a variance-
preserving diffusion x_t = alpha_t x0 + sigma_t eps rescaled: with r = alpha_t + sigma_t,
x_t / r = (1 - s) x0 + s eps for s = sigma_t / r. `FlowAsVP` therefore wraps a velocity model as an
x0-predictor (prediction type `sample`) at any VP timestep t, x0 = x_s - s v(x_s, s T), and one
DDIM step (Song et al. 2021, eq. 12, eta = 0) of the wrapped model is exactly one flow-Euler step
(both keep the predicted (x0, eps) and re-mix them at the next level), so the "DDIM teacher" of LCM
is the flow teacher's own Euler step.

**Consistency function** (Song et al. 2023, Sec. 3; LCM eq. 4): f(x, t) = c_skip(t) x +
c_out(t) x0_theta(x, t), with c_skip = s_d^2 / ((k t)^2 + s_d^2), c_out = k t / sqrt((k t)^2 + s_d^2),
s_d = 0.5 and k = `timestep_scaling` — the same scalings the `LCM` solver applies, so f(x, 0) = x
holds exactly (the boundary condition) and the solver samples the student as trained.

**Loss** (LCM Algorithm 1 with a fixed guidance scale): on the skip grid t_n = (n + 1) K - 1 of
`num_ddim_timesteps` points (K = T / num_ddim_timesteps), draw x_{t_{n}} ~ q(x_t | x0), take one
DDIM step of the *guided* teacher (classifier-free guidance w, the augmented PF-ODE) to
t_{n-1} = max(t_n - K, 0), and minimise the pseudo-Huber distance
d(f_theta(x_{t_n}, t_n), sg f_theta-(x_hat_{t_{n-1}}, t_{n-1})) with theta- the EMA of theta (the
target network). The student starts from the teacher's weights and is sampled without guidance.
Simplified from LCM: w is fixed (LCM samples w in [w_min, w_max] and feeds it to the student by a
w-embedding, which the DiT here does not have).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.solvers import LCM, _consistency_scalings
from jaxinf.train.step import StepContext


@dataclasses.dataclass(frozen=True)
class FlowAsVP:
  """`apply(params, x_t, t, cond) -> x0` on `schedule` (VP) from a flow velocity model
  `flow_apply(params, x_s, s * flow_timesteps, cond)`. Fractional t interpolates abar linearly."""

  flow_apply: Callable
  flow_timesteps: int
  schedule: schedules.NoiseSchedule

  def __call__(self, params, x_t, t, cond):
    abar_table = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)
    abar = jnp.interp(t.astype(jnp.float32), jnp.arange(abar_table.shape[0], dtype=jnp.float32),
                      abar_table)
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    r = alpha + sigma
    s = sigma / r
    sb = s.reshape((-1,) + (1,) * (x_t.ndim - 1))
    x_s = x_t / r.reshape(sb.shape)
    v = self.flow_apply(params, x_s, s * self.flow_timesteps, cond).astype(jnp.float32)
    return x_s - sb * v


def flow_as_vp_denoiser(flow: Denoiser, flow_schedule: schedules.FlowSchedule,
                        schedule: schedules.NoiseSchedule = schedules.NoiseSchedule()) -> Denoiser:
  """The flow denoiser seen on a VP schedule: an x0 (`sample`) predictor, same params and labels."""
  if not isinstance(flow, Denoiser) or flow.spec.prediction_type != "flow":
    raise ValueError("flow: expected a Denoiser with prediction_type 'flow'")
  if not isinstance(flow_schedule, schedules.FlowSchedule):
    raise TypeError(f"flow_schedule: expected a FlowSchedule, got {type(flow_schedule).__name__}")
  if not isinstance(schedule, schedules.NoiseSchedule):
    raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
  spec = dataclasses.replace(
      flow.spec, apply=FlowAsVP(flow.spec.apply, flow_schedule.num_train_timesteps, schedule),
      prediction_type="sample", features=None)
  return Denoiser(flow.params, spec)


@dataclasses.dataclass(frozen=True)
class LCMConfig:
  """num_ddim_timesteps: the skip grid (LCM's N, diffusers' `original_inference_steps`);
  timestep_scaling: k of the boundary scalings (LCM's 10); guidance_scale: the teacher's fixed CFG
  w (1: none); huber_c: the pseudo-Huber constant (LCM's 0.001)."""

  num_ddim_timesteps: int = 50
  timestep_scaling: float = 10.0
  guidance_scale: float = 1.5
  huber_c: float = 0.001

  def __post_init__(self):
    n = self.num_ddim_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"num_ddim_timesteps: expected a positive int, got {n!r}")
    if not (np.isfinite(self.timestep_scaling) and self.timestep_scaling > 0):
      raise ValueError(f"timestep_scaling: expected a finite number > 0, got "
                       f"{self.timestep_scaling!r}")
    if not self.huber_c > 0:
      raise ValueError(f"huber_c: expected > 0, got {self.huber_c}")

  def solver(self) -> LCM:
    """The `LCM` solver that samples a student distilled with this config."""
    return LCM(original_inference_steps=self.num_ddim_timesteps,
               timestep_scaling=self.timestep_scaling)


def consistency_function(x0_apply: Callable, params, x_t: jax.Array, t: jax.Array, cond, *,
                         schedule: schedules.NoiseSchedule, timestep_scaling: float) -> jax.Array:
  """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t) at integer timesteps t `[B]` (LCM eq. 4),
  with the `LCM` solver's own scalings: f(x, 0) = x exactly."""
  c_skip, c_out = (jnp.asarray(c, jnp.float32)[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
                   for c in _consistency_scalings(np.arange(schedule.num_train_timesteps),
                                                  timestep_scaling))
  x0 = x0_apply(params, x_t, t.astype(jnp.float32), cond).astype(jnp.float32)
  return c_skip * x_t + c_out * x0


def guided_ddim_step(x0_apply: Callable, params, x_t: jax.Array, t: jax.Array, t_prev: jax.Array,
                     cond, *, schedule: schedules.NoiseSchedule, guidance_scale: float,
                     null_cond: int | None) -> jax.Array:
  """One deterministic DDIM step (Song et al. 2021, eq. 12) from t to t_prev of an x0-predictor
  under classifier-free guidance x0_u + w (x0_c - x0_u) (the augmented PF-ODE of LCM, eq. 8)."""
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  bshape = (-1,) + (1,) * (x_t.ndim - 1)
  a, s = jnp.sqrt(abar[t]).reshape(bshape), jnp.sqrt(1.0 - abar[t]).reshape(bshape)
  a_prev = jnp.sqrt(abar[t_prev]).reshape(bshape)
  s_prev = jnp.sqrt(1.0 - abar[t_prev]).reshape(bshape)
  tf = t.astype(jnp.float32)
  if null_cond is None or guidance_scale == 1.0:
    x0 = x0_apply(params, x_t, tf, cond)
  else:
    both = x0_apply(params, jnp.concatenate([x_t, x_t]), jnp.concatenate([tf, tf]),
                    jnp.concatenate([cond, jnp.full_like(cond, null_cond)]))
    x0_c, x0_u = jnp.split(both.astype(jnp.float32), 2)
    x0 = x0_u + guidance_scale * (x0_c - x0_u)
  eps = (x_t - a * x0) / s
  return a_prev * x0 + s_prev * eps


def skip_grid_pair(key: jax.Array, n: int, num_train_timesteps: int, num_ddim_timesteps: int):
  """(t_n, t_{n-1}) `[n]` each: a uniform point of LCM's skip grid (K k - 1 for k = 1..N, K = T/N,
  diffusers' `DDIMSolver` grid) and the point K below it, clamped at 0 (the boundary)."""
  k = num_train_timesteps // num_ddim_timesteps
  idx = jax.random.randint(key, (n,), 0, num_ddim_timesteps)
  t = (idx + 1) * k - 1
  return t, jnp.maximum(t - k, 0)


def consistency_distillation_loss(student_apply: Callable, teacher_apply: Callable, *,
                                  schedule: schedules.NoiseSchedule, cfg: LCMConfig,
                                  null_cond: int | None):
  """LCM's loss (module docstring) for `jaxinf.train.flow.train_regression`: batch = (x0, y),
  frozen = the teacher's params, ctx.ema = the target network. `*_apply` are x0-predictors on
  `schedule` (e.g. `FlowAsVP`)."""
  if schedule.num_train_timesteps // cfg.num_ddim_timesteps < 1:
    raise ValueError(f"num_ddim_timesteps: at most {schedule.num_train_timesteps}, got "
                     f"{cfg.num_ddim_timesteps}")
  f = lambda p, x, t, y: consistency_function(student_apply, p, x, t, y, schedule=schedule,
                                              timestep_scaling=cfg.timestep_scaling)

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    x0, y = batch
    k_t, k_eps = jax.random.split(key)
    t, t_prev = skip_grid_pair(k_t, x0.shape[0], schedule.num_train_timesteps,
                               cfg.num_ddim_timesteps)
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t].reshape(
        (-1,) + (1,) * (x0.ndim - 1))
    x_t = schedules.add_noise(x0, jax.random.normal(k_eps, x0.shape), abar)
    x_prev = guided_ddim_step(teacher_apply, frozen, x_t, t, t_prev, y, schedule=schedule,
                              guidance_scale=cfg.guidance_scale, null_cond=null_cond)
    target = jax.lax.stop_gradient(f(ctx.ema, jax.lax.stop_gradient(x_prev), t_prev, y))
    pred = f(params, x_t, t, y)
    return jnp.mean(jnp.sqrt(jnp.square(pred - target) + cfg.huber_c**2) - cfg.huber_c)

  return loss_fn


# ----------------------------------------------------------------------------------------------
# MLCM: multistep consistency distillation over segments.


def check_segments(segments, num_train_timesteps: int) -> None:
  if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1 \
      or num_train_timesteps % segments:
    raise ValueError(f"segments: expected a positive int dividing num_train_timesteps "
                     f"({num_train_timesteps}), got {segments!r}")


def segment_edge(t: jax.Array, num_train_timesteps: int, segments: int) -> jax.Array:
  """The lower edge of t's segment: the trajectory is cut at j L - 1 (L = T / segments), the
  timesteps of the trailing DDIM grid with `segments` steps; t in (j L - 1, (j + 1) L - 1] maps to
  j L - 1, and -1 stands for the clean end (abar = 1)."""
  seg_len = num_train_timesteps // segments
  j = (t + 1 + seg_len - 1) // seg_len - 1  # ceil((t + 1) / L) - 1
  return j * seg_len - 1


def ddim_to(x_t: jax.Array, x0: jax.Array, t: jax.Array, edge: jax.Array, *,
            schedule: schedules.NoiseSchedule) -> jax.Array:
  """x_t carried to timestep `edge` (-1: clean) by DDIM with the predicted x0: alpha_e x0 +
  sigma_e (x_t - alpha_t x0) / sigma_t, as the `DDIM` solver's step with set_alpha_to_one."""
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  bshape = (-1,) + (1,) * (x_t.ndim - 1)
  abar_e = jnp.where(edge >= 0, abar[jnp.maximum(edge, 0)], 1.0).reshape(bshape)
  abar_t = abar[t].reshape(bshape)
  eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
  return jnp.sqrt(abar_e) * x0 + jnp.sqrt(1.0 - abar_e) * eps


def multistep_consistency_loss(student_apply: Callable, teacher_apply: Callable, *,
                               schedule: schedules.NoiseSchedule, cfg: LCMConfig, segments: int,
                               null_cond: int | None):
  """MLCM (Xie et al. 2024, "MLCM: Multistep Consistency Distillation of Latent Diffusion Model",
  Sec. 3.1): the trajectory is cut into `segments` pieces at the trailing DDIM grid and the
  student is consistent only within a piece: g(x_t, t) = DDIM from t to the piece's lower edge
  with the student's x0 (`ddim_to`), so g is the identity at the edge (the boundary condition
  without c_skip/c_out). One teacher DDIM step from t_n to max(t_{n-1}, edge) (clamped so as not
  to cross the edge) gives the target sg g_ema(x_hat, ., edge); pseudo-Huber distance as LCM.
  The student is sampled by `DDIM(spacing="trailing")` with `steps=segments`, whose steps are
  exactly the jumps between edges. Not included: MLCM's progressive segment reduction and its
  auxiliary losses."""
  t_max = schedule.num_train_timesteps
  check_segments(segments, t_max)

  def g(p, x, t, edge, y):
    x0 = student_apply(p, x, t.astype(jnp.float32), y).astype(jnp.float32)
    return ddim_to(x, x0, t, edge, schedule=schedule)

  def loss_fn(params, key, ctx: StepContext, batch, frozen):
    x0, y = batch
    k_t, k_eps = jax.random.split(key)
    t, t_prev = skip_grid_pair(k_t, x0.shape[0], t_max, cfg.num_ddim_timesteps)
    edge = segment_edge(t, t_max, segments)
    t_prev = jnp.maximum(t_prev, edge)  # edge = -1 (clean) leaves the clamp at 0 in place
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t].reshape(
        (-1,) + (1,) * (x0.ndim - 1))
    x_t = schedules.add_noise(x0, jax.random.normal(k_eps, x0.shape), abar)
    x_prev = guided_ddim_step(teacher_apply, frozen, x_t, t, t_prev, y, schedule=schedule,
                              guidance_scale=cfg.guidance_scale, null_cond=null_cond)
    target = jax.lax.stop_gradient(g(ctx.ema, jax.lax.stop_gradient(x_prev), t_prev, edge, y))
    pred = g(params, x_t, t, edge, y)
    return jnp.mean(jnp.sqrt(jnp.square(pred - target) + cfg.huber_c**2) - cfg.huber_c)

  return loss_fn
