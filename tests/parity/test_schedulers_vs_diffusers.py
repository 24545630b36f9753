"""Every jaxinf solver against the diffusers scheduler of the same name, step by step.

The same model function (`model_fn`, plain arithmetic so torch and XLA round it alike) drives both,
from the same start and with the same per-step noise (diffusers' `randn_tensor` is replaced by a
replay of the array jaxinf receives as `sample(..., noise=...)`); every intermediate sample must
agree to 1e-5 in fp32.

Precision of the reference: diffusers computes alphas_cumprod as a float32 cumprod, jaxinf in float64
(then casts each table column to float32). Where abar is tiny — the cosine schedule's last steps,
sigma_max ~ 1e4 — the float32 cumprod is off by ~1e-4 relative and the trajectories by as much
(measured: DPM-Solver++ with Karras sigmas on squaredcos_cap_v2, 4e-4). So diffusers runs here with
its alphas_cumprod recomputed in float64 from its own betas and its sigma table cast to float64
(`upcast_buffers`); its per-step arithmetic on the samples stays float32, as jaxinf's does.
`test_float32_reference_agrees_where_abar_is_moderate` checks that without the upcast the two still
agree on schedules where the cumprod rounding is harmless.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxinf.diffusion import schedules, solvers  # noqa: E402
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec  # noqa: E402
from jaxinf.diffusion.sample import sample  # noqa: E402

pytestmark = pytest.mark.parity

SHAPE = (2, 2, 3)  # [B, C, L]: diffusers thresholding needs a channel axis
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def model_fn(x, t):
  """A fixed nonlinear 'denoiser' of x [B, D] and a float timestep t (broadcast over x): only
  +, -, *, / so that torch and XLA produce the same fp32 numbers."""
  return 0.6 * x * (t + 50.0) / (t + 500.0) + 0.3 * x / (1.0 + x * x)


def _jax_apply(params, x, t, cond):
  del params, cond
  return model_fn(x, t.reshape((-1,) + (1,) * (x.ndim - 1)))


def run_jaxinf(schedule, solver, prediction_type, steps, x_init, noise):
  den = Denoiser({}, DenoiserSpec(_jax_apply, prediction_type=prediction_type))
  _, traj = sample(jax.random.key(0), den, schedule, solver, SHAPE, steps=steps,
                   x_init=jnp.asarray(x_init), noise=None if noise is None else jnp.asarray(noise),
                   return_trajectory=True)
  return np.asarray(traj)


def run_diffusers(scheduler, steps, x_init, noise, monkeypatch, step_kwargs=None, set_kwargs=None,
                  float64=False):
  """diffusers' own loop (as in its pipelines): scale_model_input, model, step."""
  module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
  current = [0]
  if noise is not None:
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(noise[current[0]].copy()))
  if float64:
    upcast_buffers(scheduler)
  scheduler.set_timesteps(steps, **(set_kwargs or {}))
  if float64 and isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
    scheduler.sigmas = scheduler.sigmas.double()
  # Start at row 0 even when the first timestep repeats (Karras grids rounded to integers can):
  # diffusers would otherwise look the step up by value and start at the second copy.
  if hasattr(scheduler, "set_begin_index"):
    scheduler.set_begin_index(0)
  x = torch.from_numpy(x_init.copy()) * getattr(scheduler, "init_noise_sigma", 1.0)
  x = x.to(torch.float32)
  traj = []
  for i, t in enumerate(scheduler.timesteps):
    current[0] = i
    x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
    out = model_fn(x_in, t.to(torch.float32))
    x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
    traj.append(x.numpy().copy())
  return np.stack(traj)


def upcast_buffers(scheduler):
  """Recomputes a VP scheduler's alphas_cumprod (and what its __init__ derives from it) in float64
  from its own betas, so that its coefficients carry no float32 cumprod rounding."""
  if not hasattr(scheduler, "betas"):
    return  # flow matching: sigmas are the schedule, no cumprod
  betas = scheduler.betas.double()
  abar = torch.cumprod(1.0 - betas, dim=0)
  if float(scheduler.alphas_cumprod[-1]) == 2**-24:  # its zero-terminal-SNR floor
    abar[-1] = 2**-24
  scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod = betas, 1.0 - betas, abar
  if hasattr(scheduler, "final_alpha_cumprod") and not scheduler.config.set_alpha_to_one:
    scheduler.final_alpha_cumprod = abar[0]  # else a float32 abar_0 makes a variance < 0
  if hasattr(scheduler, "sigma_t"):  # DPM-Solver / UniPC
    scheduler.alpha_t = abar.sqrt()
    scheduler.sigma_t = (1 - abar).sqrt()
    scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()


def draws(seed, rows, stochastic):
  rng = np.random.default_rng(seed)
  x_init = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal((rows, *SHAPE)).astype(np.float32) if stochastic else None
  return x_init, noise


def check(case, monkeypatch, float64=True):
  schedule, solver, pred, steps, make_scheduler, step_kwargs, set_kwargs = case
  rows = len(solver.table(schedule, steps)["t"])
  x_init, noise = draws(steps, rows, solver.stochastic)
  ours = run_jaxinf(schedule, solver, pred, steps, x_init, noise)
  ref = run_diffusers(make_scheduler(), steps, x_init, noise, monkeypatch, step_kwargs, set_kwargs,
                      float64)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The grid: beta schedule x spacing x prediction type x steps, sampled.

PREDS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
STEPS = (1, 2, 3, 7, 10, 20, 25, 50)


def grid(n, seed, preds=PREDS, spacings=SPACINGS, betas=tuple(BETAS), steps=STEPS):
  """n configurations sampled without replacement from the product, always including the
  extremes of `steps`."""
  combos = list(itertools.product(betas, spacings, preds, steps))
  rng = np.random.default_rng(seed)
  picked = [combos[i] for i in rng.choice(len(combos), n, replace=False)]
  picked[0] = picked[0][:3] + (min(steps),)
  picked[1] = picked[1][:3] + (max(steps),)
  return picked


def vp(beta, **kw):
  lo, hi = BETAS[beta]
  return schedules.NoiseSchedule(beta, beta_start=lo, beta_end=hi, **kw), dict(
      beta_schedule=beta, beta_start=lo, beta_end=hi, **kw)



def case(name, schedule, solver, pred, steps, make, step_kwargs=None, set_kwargs=None):
  return pytest.param((schedule, solver, pred, steps, make, step_kwargs, set_kwargs), id=name)


def vp_cases(label, jax_cls, diff_cls, variants, n=5, preds=PREDS, spacings=SPACINGS,
             spacing_key="timestep_spacing", jax_spacing="spacing", step_kwargs=None, seed=0,
             betas=tuple(BETAS), steps=STEPS, diffusers_defaults=None):
  """Cases for a VP solver: each variant is (name, jaxinf options, diffusers options)."""
  out = []
  for k, (name, jopts, dopts) in enumerate(variants):
    for beta, spacing, pred, n_steps in grid(n, seed + k, preds, spacings, betas, steps):
      sched, cfg = vp(beta)
      zsnr = dopts.get("rescale_betas_zero_snr", False)
      sched, cfg = vp(beta, rescale_betas_zero_snr=zsnr) if zsnr else (sched, cfg)
      jkw = dict(jopts)
      if jax_spacing:
        jkw[jax_spacing] = spacing
      dkw = {**cfg, **(diffusers_defaults or {}), **{k2: v for k2, v in dopts.items() if k2 != "rescale_betas_zero_snr"},
             "prediction_type": pred}
      if spacing_key:
        dkw[spacing_key] = spacing
      make = lambda dkw=dkw: getattr(diffusers, diff_cls)(**dkw)
      out.append(case(f"{label}{name}-{beta}-{spacing if jax_spacing else ''}-{pred}-{n_steps}",
                      sched, jax_cls(**jkw), pred, n_steps, make, step_kwargs))
  return out


def same(**kw):
  return (kw, kw)


DPM = vp_cases("dpm++", solvers.DPMSolverPP, "DPMSolverMultistepScheduler", [
    ("2m-midpoint", *same()),
    ("2m-heun", *same(solver_type="heun")),
    ("1", *same(solver_order=1)),
    ("sde-2m", *same(algorithm_type="sde-dpmsolver++")),
    ("sde-2m-heun", *same(algorithm_type="sde-dpmsolver++", solver_type="heun")),
    ("karras", *same(use_karras_sigmas=True)),
    ("euler-at-final", *same(euler_at_final=True)),
    ("sigma-min-no-lower-final", *same(lower_order_final=False, final_sigmas_type="sigma_min")),
    ("thresholding", *same(thresholding=True, dynamic_thresholding_ratio=0.9,
                           sample_max_value=3.0)),
    ("offset", *same(steps_offset=1)),
])
DPM += vp_cases("dpm++", solvers.DPMSolverPP, "DPMSolverMultistepScheduler", [
    ("zsnr", {}, dict(rescale_betas_zero_snr=True))], preds=("v_prediction",), n=3, seed=50)

UNIPC = vp_cases("unipc", solvers.UniPC, "UniPCMultistepScheduler", [
    ("2-bh2", *same()),
    # bh1 with a zero final sigma is 0 * inf = nan in diffusers' last step; jaxinf's table takes
    # the limit there, so the comparison uses the sigma_min end
    ("2-bh1", *same(solver_type="bh1", final_sigmas_type="sigma_min")),
    ("1", *same(solver_order=1)),
    ("karras", *same(use_karras_sigmas=True)),
    ("no-corrector-at-1-2", *same(disable_corrector=(1, 2))),
    ("thresholding", *same(thresholding=True, dynamic_thresholding_ratio=0.9,
                           sample_max_value=3.0)),
], seed=10)
UNIPC += vp_cases("unipc", solvers.UniPC, "UniPCMultistepScheduler", [
    ("zsnr", {}, dict(rescale_betas_zero_snr=True))], preds=("v_prediction",), n=3, seed=60)

# Euler/Heun keep x at the VE scale, |x| ~ sigma_max |z|, and a step with a large sigma cancels x
# in `x + d * dt`. XLA's CPU backend contracts that into one fused multiply-add (measured: the jitted
# result equals the singly-rounded exact value in 10000 of 10000 cases), torch rounds the product and
# the sum apart, so the two differ by ~ulp(sigma_max |z|): 2e-3 on squaredcos_cap_v2 (sigma_max
# 2.0e4), 4e-4 under zero-terminal SNR (4096), 1.5e-5 on linear (157) — all measured failures of
# this test, none on scaled_linear (14.6). The Euler/Heun grid therefore runs on scaled_linear, the
# schedule they are used with; DPM-Solver++/UniPC (VP-scaled x) cover the other schedules.
EDM_BETAS = ("scaled_linear",)
EULER = vp_cases("euler", solvers.Euler, "EulerDiscreteScheduler", [
    ("", *same()), ("karras", *same(use_karras_sigmas=True)), ("offset", *same(steps_offset=1))],
    n=6, seed=20, betas=EDM_BETAS)
HEUN = vp_cases("heun", solvers.Heun, "HeunDiscreteScheduler", [
    ("", *same()), ("karras", *same(use_karras_sigmas=True)),
    ("clip", *same(clip_sample=True, clip_sample_range=2.0))], n=6, seed=30, betas=EDM_BETAS)

NO_CLIP = dict(clip_sample=False)  # diffusers' DDPM/DDIM clip by default, jaxinf's don't
DDPM = vp_cases("ddpm", solvers.DDPM, "DDPMScheduler", [
    ("", *same()), ("fixed_large", dict(variance_type="fixed_large"),
                    dict(variance_type="fixed_large")),
    ("clip", *same(clip_sample=True, clip_sample_range=1.5)),
    ("thresholding", *same(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)),
], n=4, seed=40, diffusers_defaults=NO_CLIP)
DDIM = vp_cases("ddim", solvers.DDIM, "DDIMScheduler", [
    ("", *same()), ("no-alpha-to-one", *same(set_alpha_to_one=False, steps_offset=1)),
    ("clip", *same(clip_sample=True, clip_sample_range=1.5)),
    ("zsnr", {}, dict(rescale_betas_zero_snr=True)),
], n=4, seed=45, diffusers_defaults=NO_CLIP)
DDIM += vp_cases("ddim-eta", solvers.DDIM, "DDIMScheduler", [("0.7", dict(eta=0.7), {})], n=4,
                 seed=48, step_kwargs=dict(eta=0.7), diffusers_defaults=NO_CLIP)

LCM_STEPS = (1, 2, 4, 8, 25)
LCM = vp_cases("lcm", solvers.LCM, "LCMScheduler", [
    ("", *same()), ("orig-25", *same(original_inference_steps=25, timestep_scaling=5.0)),
    ("thresholding", *same(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)),
], n=4, seed=80, spacings=("leading",), spacing_key=None, jax_spacing=None,
    steps=LCM_STEPS)
TCD = []
for gamma in (0.0, 0.3, 1.0):
  TCD += vp_cases(f"tcd-gamma{gamma}", solvers.TCD, "TCDScheduler", [("", dict(gamma=gamma), {})],
                  n=3, seed=90 + int(10 * gamma), spacings=("leading",), spacing_key=None,
                  jax_spacing=None, steps=LCM_STEPS, step_kwargs=dict(eta=gamma))


def flow_cases():
  out = []
  for shift, mu, steps in [(1.0, None, 1), (3.0, None, 10), (1.0, None, 28), (1.0, 0.8, 4),
                           (1.0, 1.15, 50), (7.0, None, 2)]:
    sched = schedules.FlowSchedule(shift=shift, mu=mu)
    dyn = dict(use_dynamic_shifting=True) if mu is not None else {}
    set_kw = dict(mu=mu) if mu is not None else None
    make = lambda shift=shift, dyn=dyn: diffusers.FlowMatchEulerDiscreteScheduler(shift=shift,
                                                                                    **dyn)
    out.append(case(f"flow-euler-shift{shift}-mu{mu}-{steps}", sched, solvers.FlowEuler(), "flow",
                    steps, make, None, set_kw))
    if mu is None:
      make = lambda shift=shift: diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
      out.append(case(f"flow-heun-shift{shift}-{steps}", sched, solvers.FlowHeun(), "flow", steps,
                      make))
  make = lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
  out.append(case("flow-euler-stochastic-8", schedules.FlowSchedule(shift=3.0),
                  solvers.FlowEuler(stochastic_sampling=True), "flow", 8, make))
  return out


ALL = DPM + UNIPC + EULER + HEUN + DDPM + DDIM + LCM + TCD + flow_cases()


@pytest.mark.parametrize("case", ALL)
def test_trajectory_matches_diffusers(case, monkeypatch):
  check(case, monkeypatch)


# Without the float64 upcast: on scaled_linear (abar_{T-1} = 4.7e-3, sigma_max = 14.6) the
# float32 cumprod's rounding stays below what a 1e-5 trajectory check sees, so diffusers' own
# float32 buffers must agree with jaxinf's float64-built tables as they are. (The docstring's
# 4e-4 case is squaredcos_cap_v2, sigma_max ~ 2e4.)
MODERATE = [c for c in DPM[:10] + UNIPC[:6] + DDIM[:4] + LCM[:2] + TCD[:2]
            if c.values[0][0].beta_schedule == "scaled_linear"
            and not c.values[0][0].rescale_betas_zero_snr]


@pytest.mark.parametrize("case", MODERATE)
def test_float32_reference_agrees_where_abar_is_moderate(case, monkeypatch):
  check(case, monkeypatch, float64=False)


# ------------------------------------------------------------------------------------------------
# steps == num_train_timesteps (every training timestep), on a 50-step schedule. diffusers runs it
# for every single-step-grid solver and spacing, and for DPM-Solver++ / UniPC with `trailing` only:
# their linspace / leading grids place steps + 1 integer points in [0, T - 1] and at steps = T
# repeat a timestep (diffusers then returns NaN, linspace, or fails, leading). jaxinf visits
# every timestep T-1 .. 0 there instead, which is the trailing grid: `test_full_grid_is_trailing`.

FULL_T = 50


def full_grid_cases():
  out = []
  sched = schedules.NoiseSchedule("linear", FULL_T)
  cfg = dict(num_train_timesteps=FULL_T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
  for label, cls, dname, spacings, extra in [
      ("dpm++", solvers.DPMSolverPP, "DPMSolverMultistepScheduler", ("trailing",), {}),
      ("unipc", solvers.UniPC, "UniPCMultistepScheduler", ("trailing",), {}),
      ("ddim", solvers.DDIM, "DDIMScheduler", SPACINGS, dict(clip_sample=False)),
      ("ddpm", solvers.DDPM, "DDPMScheduler", SPACINGS, dict(clip_sample=False)),
      ("euler", solvers.Euler, "EulerDiscreteScheduler", SPACINGS, {}),
      ("heun", solvers.Heun, "HeunDiscreteScheduler", SPACINGS, {})]:
    for spacing in spacings:
      make = lambda dname=dname, spacing=spacing, extra=extra: getattr(diffusers, dname)(
          **cfg, **extra, timestep_spacing=spacing, prediction_type="epsilon")
      out.append(case(f"{label}-{spacing}-T{FULL_T}-steps{FULL_T}", sched, cls(spacing=spacing),
                      "epsilon", FULL_T, make))
  return out


@pytest.mark.parametrize("case", full_grid_cases())
def test_trajectory_matches_diffusers_at_steps_equal_train_timesteps(case, monkeypatch):
  check(case, monkeypatch)


@pytest.mark.parametrize("cls", [solvers.DPMSolverPP, solvers.UniPC])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_full_grid_is_trailing(cls, spacing):
  """At steps = T, where diffusers' linspace / leading grids repeat a timestep, jaxinf's table is
  the trailing one (every timestep once), which diffusers itself runs (the cases above)."""
  sched = schedules.NoiseSchedule("linear", FULL_T)
  ours = cls(spacing=spacing).table(sched, FULL_T)
  trailing = cls(spacing="trailing").table(sched, FULL_T)
  assert ours.keys() == trailing.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], trailing[k])
  ref = getattr(diffusers, "DPMSolverMultistepScheduler" if cls is solvers.DPMSolverPP
                else "UniPCMultistepScheduler")(num_train_timesteps=FULL_T,
                                                 timestep_spacing="trailing")
  ref.set_timesteps(FULL_T)
  np.testing.assert_array_equal(ours["t"], ref.timesteps.numpy())
