"""Every public entry point of `jaxinf.diffusion` refuses bad input by name, before tracing.

Walks issue 12's classes for this layer with parametrized cases, each through
`tests/bad_input.py`'s `raises_before_tracing` (error type, message names the argument, no frame
inside JAX's tracing machinery): wrong types (a float in `shape`, an integer / complex / bool
`x_init`, an int or a batch of keys where one PRNG key is expected), out-of-range and non-finite
values (NaN/inf guidance scale, steps), unknown option names; solvers' constructors, schedules,
guidance, the feature cache and the denoiser spec. The denoiser is closed-form (no network), so
nothing here compiles unless a check is missing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bad_input import raises_before_tracing
from jaxinf.diffusion import cache as cache_lib
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec, gaussian_denoiser
from jaxinf.diffusion.guidance import CFG, classifier_free_guidance, expert_denoiser
from jaxinf.diffusion.sample import compile_sample, sample

SHAPE = (2, 3)
SCHED = schedules.NoiseSchedule("linear", 50)


def _apply(params, x, t, cond):
  del params, t, cond
  return 0.5 * x


DEN = Denoiser({}, DenoiserSpec(_apply))
COND_DEN = Denoiser({}, DenoiserSpec(_apply, num_classes=4, null_cond=4))


def call(**kw):
  args = dict(key=jax.random.key(0), denoiser=DEN, schedule=SCHED, solver=solvers.DDIM(),
              shape=SHAPE, steps=4)
  args.update(kw)
  return sample(**args)


@pytest.fixture(autouse=True)
def _never_trace(monkeypatch):
  """Every case must be refused before the loop is traced: the loops fail the test if reached."""
  from jaxinf.diffusion import sample as sample_module

  def boom(*a, **k):
    raise AssertionError("reached the compiled loop: the bad argument was not refused")

  monkeypatch.setattr(sample_module, "_scan", boom)
  monkeypatch.setattr(cache_lib, "_cached_scan", boom)


SAMPLE_CASES = [
    # key: an int, a batch of typed keys, a batch of raw keys, a float array
    ("key-int", dict(key=0), TypeError, "key"),
    ("key-batch", dict(key=jax.random.split(jax.random.key(0), 4)), ValueError, "key"),
    ("key-raw-batch", dict(key=jax.random.split(jax.random.PRNGKey(0), 4)), ValueError, "key"),
    ("key-float", dict(key=jnp.zeros(2)), TypeError, "key"),
    ("key-none", dict(key=None), TypeError, "key"),
    # shape
    ("shape-float", dict(shape=(2, 3.0)), TypeError, "shape"),
    ("shape-float-batch", dict(shape=(2.5, 3)), TypeError, "shape"),
    ("shape-bool", dict(shape=(True, 3)), TypeError, "shape"),
    ("shape-zero", dict(shape=(0, 3)), ValueError, "shape"),
    ("shape-negative", dict(shape=(2, -3)), ValueError, "shape"),
    ("shape-1d", dict(shape=(2,)), ValueError, "shape"),
    ("shape-int", dict(shape=6), ValueError, "shape"),
    ("shape-str", dict(shape="2,3"), ValueError, "shape"),
    # x_init: dtype, shape, type
    ("x_init-int", dict(x_init=jnp.zeros(SHAPE, jnp.int32)), TypeError, "x_init"),
    ("x_init-complex", dict(x_init=np.zeros(SHAPE, np.complex64)), TypeError, "x_init"),
    ("x_init-bool", dict(x_init=np.zeros(SHAPE, bool)), TypeError, "x_init"),
    ("x_init-shape", dict(x_init=jnp.zeros((3, 3))), ValueError, "x_init"),
    ("x_init-list", dict(x_init=[[0.0] * 3] * 2), TypeError, "x_init"),
    # noise replay
    ("noise-int", dict(solver=solvers.DDPM(), noise=np.zeros((4, *SHAPE), np.int32)), TypeError,
     "noise"),
    ("noise-shape", dict(solver=solvers.DDPM(), noise=np.zeros((3, *SHAPE), np.float32)),
     ValueError, "noise"),
    ("noise-deterministic", dict(noise=np.zeros((4, *SHAPE), np.float32)), ValueError, "noise"),
    # steps
    ("steps-0", dict(steps=0), ValueError, "steps"),
    ("steps-over-T", dict(steps=51), ValueError, "steps"),
    ("steps-float", dict(steps=4.0), TypeError, "steps"),
    ("steps-bool", dict(steps=True), TypeError, "steps"),
    ("steps-none", dict(steps=None), TypeError, "steps"),
    # the rest of the request
    ("schedule", dict(schedule="linear"), TypeError, "schedule"),
    ("schedule-flow-for-vp-solver", dict(schedule=schedules.FlowSchedule(50)), TypeError,
     "schedule"),
    ("solver", dict(solver="ddim"), TypeError, "solver"),
    ("denoiser", dict(denoiser=_apply), TypeError, "denoiser"),
    ("guidance-not-callable", dict(guidance=3.0), TypeError, "guidance"),
    ("guidance-returns-junk", dict(guidance=lambda d: 3.0), TypeError, "guidance"),
    ("cond-missing", dict(denoiser=COND_DEN), ValueError, "cond"),
    ("cond-float", dict(denoiser=COND_DEN, cond=jnp.zeros(2)), TypeError, "cond"),
    ("cond-range", dict(denoiser=COND_DEN, cond=jnp.array([0, 9])), ValueError, "cond"),
    ("return_trajectory", dict(return_trajectory="yes"), TypeError, "return_trajectory"),
    ("check_finite", dict(check_finite=1), TypeError, "check_finite"),
    ("cache-type", dict(cache=(True, False)), TypeError, "cache"),
    ("cache-with-check_finite", dict(cache=cache_lib.fixed_interval(4, 2), check_finite=True),
     ValueError, "cache"),
    ("cache-no-hooks", dict(cache=cache_lib.fixed_interval(4, 2)), ValueError, "denoiser"),
    # unknown option names: Python's own TypeError names them
    ("unknown-option", dict(stpes=4), TypeError, "stpes"),
    ("unknown-option-2", dict(guidance_scale=3.0), TypeError, "guidance_scale"),
]


@pytest.mark.parametrize("kw,error,name", [c[1:] for c in SAMPLE_CASES],
                         ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses(kw, error, name):
  with raises_before_tracing(error, name):
    call(**kw)


def test_compile_sample_refuses_like_sample():
  with raises_before_tracing(TypeError, "shape"):
    compile_sample(DEN, SCHED, solvers.DDIM(), (2, 3.0), steps=4)
  with raises_before_tracing(TypeError, "x_init"):
    compile_sample(DEN, SCHED, solvers.DDIM(), SHAPE, steps=4, x_init=np.zeros(SHAPE, np.int8))


def test_check_finite_needs_concrete_arguments():
  """check_finite reports on the host after the scan; under an outer jit it cannot, and says so
  (raised at the start of `sample`, which here is itself being traced: no helper for that)."""
  with pytest.raises(ValueError, match="check_finite"):
    jax.jit(lambda k: call(key=k, check_finite=True))(jax.random.key(0))


SOLVER_CASES = [
    ("make-unknown-name", lambda: solvers.make_solver("euler_a"), ValueError, "name"),
    ("make-unknown-option", lambda: solvers.make_solver("ddim", etaa=1.0), (TypeError, ValueError),
     "etaa"),
    ("ddim-eta-nan", lambda: solvers.DDIM(eta=float("nan")), ValueError, "eta"),
    ("ddim-eta-neg", lambda: solvers.DDIM(eta=-0.1), ValueError, "eta"),
    ("ddim-eta-str", lambda: solvers.DDIM(eta="1"), TypeError, "eta"),
    ("ddim-spacing", lambda: solvers.DDIM(spacing="uniform"), ValueError, "spacing"),
    ("ddim-offset", lambda: solvers.DDIM(steps_offset=-1), ValueError, "steps_offset"),
    ("ddim-offset-float", lambda: solvers.DDIM(steps_offset=1.0), ValueError, "steps_offset"),
    ("ddpm-variance", lambda: solvers.DDPM(variance_type="learned"), ValueError, "variance_type"),
    ("ddpm-clip-range", lambda: solvers.DDPM(clip_sample_range=0.0), ValueError,
     "clip_sample_range"),
    ("ddpm-threshold-ratio", lambda: solvers.DDPM(dynamic_thresholding_ratio=2.0), ValueError,
     "dynamic_thresholding_ratio"),
    ("ddpm-bool-as-int", lambda: solvers.DDPM(clip_sample=1), (TypeError, ValueError),
     "clip_sample"),
    ("dpm-order", lambda: solvers.DPMSolverPP(solver_order=3), ValueError, "solver_order"),
    ("dpm-algorithm", lambda: solvers.DPMSolverPP(algorithm_type="dpmsolver"), ValueError,
     "algorithm_type"),
    ("dpm-solver-type", lambda: solvers.DPMSolverPP(solver_type="euler"), ValueError,
     "solver_type"),
    ("dpm-final-sigmas", lambda: solvers.DPMSolverPP(final_sigmas_type="one"), ValueError,
     "final_sigmas_type"),
    ("dpm-spacing", lambda: solvers.DPMSolverPP(spacing="log"), ValueError, "spacing"),
    ("unipc-corrector", lambda: solvers.UniPC(disable_corrector=[1]), ValueError,
     "disable_corrector"),
    ("unipc-type", lambda: solvers.UniPC(solver_type="bh3"), ValueError, "solver_type"),
    ("euler-clip", lambda: solvers.Euler(clip_sample=True), ValueError, "clip_sample"),
    ("heun-spacing", lambda: solvers.Heun(spacing=None), ValueError, "spacing"),
    ("lcm-scaling", lambda: solvers.LCM(timestep_scaling=0.0), ValueError, "timestep_scaling"),
    ("lcm-orig", lambda: solvers.LCM(original_inference_steps=0), ValueError,
     "original_inference_steps"),
    ("tcd-gamma", lambda: solvers.TCD(gamma=1.5), ValueError, "gamma"),
    ("tcd-gamma-nan", lambda: solvers.TCD(gamma=float("nan")), ValueError, "gamma"),
    ("table-steps-0", lambda: solvers.DDIM().table(SCHED, 0), ValueError, "steps"),
    ("table-steps-float", lambda: solvers.UniPC().table(SCHED, 2.0), TypeError, "steps"),
    ("table-steps-over", lambda: solvers.DPMSolverPP().table(SCHED, 51), ValueError, "steps"),
    ("lcm-steps-over-orig", lambda: solvers.LCM(original_inference_steps=10).table(SCHED, 11),
     ValueError, "steps"),
    ("offset-past-T", lambda: solvers.DDIM(steps_offset=5).table(SCHED, 50), ValueError,
     "steps_offset"),
    ("ddim-eta-too-large", lambda: solvers.DDIM(eta=5.0).table(SCHED, 10), ValueError, "eta"),
]

SCHEDULE_CASES = [
    ("beta-schedule", lambda: schedules.NoiseSchedule("cosine"), ValueError, "beta_schedule"),
    ("T-0", lambda: schedules.NoiseSchedule(num_train_timesteps=0), ValueError,
     "num_train_timesteps"),
    ("T-float", lambda: schedules.NoiseSchedule(num_train_timesteps=1000.0), ValueError,
     "num_train_timesteps"),
    ("beta-order", lambda: schedules.NoiseSchedule(beta_start=0.02, beta_end=1e-4), ValueError,
     "beta_start"),
    ("beta-one", lambda: schedules.NoiseSchedule(beta_end=1.0), ValueError, "beta_end"),
    ("beta-nan", lambda: schedules.NoiseSchedule(beta_start=float("nan")), ValueError,
     "beta_start"),
    ("beta-str", lambda: schedules.NoiseSchedule(beta_end="0.02"), TypeError, "beta_end"),
    ("zsnr-int", lambda: schedules.NoiseSchedule(rescale_betas_zero_snr=1), (TypeError, ValueError),
     "rescale_betas_zero_snr"),
    ("flow-shift-0", lambda: schedules.FlowSchedule(shift=0.0), ValueError, "shift"),
    ("flow-shift-inf", lambda: schedules.FlowSchedule(shift=float("inf")), ValueError, "shift"),
    ("flow-mu-nan", lambda: schedules.FlowSchedule(mu=float("nan")), ValueError, "mu"),
    ("flow-mu-and-shift", lambda: schedules.FlowSchedule(shift=2.0, mu=0.5), ValueError, "shift"),
    ("flow-T-1", lambda: schedules.FlowSchedule(1), ValueError, "num_train_timesteps"),
    ("spaced-spacing", lambda: schedules.spaced_timesteps(50, 4, "uniform"), ValueError,
     "spacing"),
    ("spaced-steps", lambda: schedules.spaced_timesteps(50, 0), ValueError, "steps"),
    ("shift-mu-len", lambda: schedules.dynamic_shift_mu(0), ValueError, "image_seq_len"),
    ("karras-n", lambda: schedules.karras_sigmas(0.1, 10.0, 0), ValueError, "n"),
    ("karras-sigma-min", lambda: schedules.karras_sigmas(0.0, 10.0, 5), ValueError, "sigma_min"),
    ("karras-order", lambda: schedules.karras_sigmas(10.0, 0.1, 5), ValueError, "sigma_min"),
    ("karras-rho", lambda: schedules.karras_sigmas(0.1, 10.0, 5, rho=float("nan")), ValueError,
     "rho"),
    ("prediction-type", lambda: schedules.predict_x0_eps(jnp.zeros(2), jnp.zeros(2), 0.5, "eps"),
     ValueError, "prediction_type"),
]

GUIDANCE_CASES = [
    ("cfg-nan", lambda: CFG(float("nan")), ValueError, "scale"),
    ("cfg-inf", lambda: CFG(float("-inf")), ValueError, "scale"),
    ("cfg-complex", lambda: CFG(1j), TypeError, "scale"),
    ("cfg-str", lambda: CFG("3"), TypeError, "scale"),
    ("cfg-bool", lambda: CFG(True), TypeError, "scale"),
    ("cfg-nan-array", lambda: CFG(jnp.array([1.0, jnp.nan])), ValueError, "scale"),
    ("cfg-rescale-nan", lambda: CFG(3.0, rescale=float("nan")), ValueError, "rescale"),
    ("cfg-rescale-range", lambda: CFG(3.0, rescale=2.0)(COND_DEN), ValueError, "rescale"),
    ("cfg-interval", lambda: CFG(3.0, interval=5.0), ValueError, "interval"),
    ("cfg-interval-order", lambda: CFG(3.0, interval=(2.0, 1.0), schedule=SCHED)(COND_DEN),
     ValueError, "interval"),
    ("cfg-interval-no-schedule", lambda: CFG(3.0, interval=(0.1, 1.0))(COND_DEN), ValueError,
     "schedule"),
    ("cfg-channels", lambda: CFG(3.0, guided_channels=0)(COND_DEN), ValueError, "guided_channels"),
    ("cfg-channels-float", lambda: CFG(3.0, guided_channels=1.5)(COND_DEN), TypeError,
     "guided_channels"),
    ("cfg-no-null-class", lambda: CFG(3.0)(DEN), ValueError, "denoiser"),
    ("cfg-not-denoiser", lambda: classifier_free_guidance(_apply, 3.0), TypeError, "denoiser"),
    ("cfg-fn-nan", lambda: classifier_free_guidance(COND_DEN, float("nan")), ValueError, "scale"),
    ("experts-one", lambda: expert_denoiser([DEN], [], SCHED), ValueError, "experts"),
    ("experts-boundary-nan", lambda: expert_denoiser([DEN, DEN], [float("nan")], SCHED),
     ValueError, "boundaries"),
    ("experts-boundary-str", lambda: expert_denoiser([DEN, DEN], ["1"], SCHED), ValueError,
     "boundaries"),
    ("experts-boundary-count", lambda: expert_denoiser([DEN, DEN], [1.0, 2.0], SCHED), ValueError,
     "boundaries"),
]

DENOISER_CASES = [
    ("spec-apply", lambda: DenoiserSpec(apply=3), TypeError, "apply"),
    ("spec-prediction", lambda: DenoiserSpec(_apply, prediction_type="x0"), ValueError,
     "prediction_type"),
    ("spec-learned-sigma", lambda: DenoiserSpec(_apply, learned_sigma="yes"), TypeError,
     "learned_sigma"),
    ("spec-classes", lambda: DenoiserSpec(_apply, num_classes=0), ValueError, "num_classes"),
    ("spec-null", lambda: DenoiserSpec(_apply, null_cond=-1), ValueError, "null_cond"),
    ("spec-sample-shape", lambda: DenoiserSpec(_apply, sample_shape=(3.0,)), ValueError,
     "sample_shape"),
    ("gaussian-cov-shape", lambda: gaussian_denoiser(np.zeros(2), np.eye(3), SCHED), ValueError,
     "cov"),
    ("gaussian-cov-asym", lambda: gaussian_denoiser(np.zeros(2), np.array([[1, 0.5], [0, 1.0]]),
                                                    SCHED), ValueError, "cov"),
    ("gaussian-schedule", lambda: gaussian_denoiser(np.zeros(2), np.eye(2), None), TypeError,
     "schedule"),
]

CACHE_CASES = [
    ("refresh-empty", lambda: cache_lib.FeatureCache(()), ValueError, "refresh"),
    ("refresh-first", lambda: cache_lib.FeatureCache((False, True)), ValueError, "refresh"),
    ("refresh-ints", lambda: cache_lib.FeatureCache((1, 0)), ValueError, "refresh"),
    ("interval-0", lambda: cache_lib.fixed_interval(4, 0), ValueError, "interval"),
    ("rows-0", lambda: cache_lib.fixed_interval(0, 2), ValueError, "rows"),
    ("rows-mismatch", lambda: cache_lib.sample_cached(
        jax.random.key(0), DEN, SCHED, solvers.DDIM(), SHAPE, steps=4,
        cache=cache_lib.fixed_interval(5, 2)), ValueError, "denoiser|cache"),
    ("cached-key", lambda: cache_lib.sample_cached(
        0, DEN, SCHED, solvers.DDIM(), SHAPE, steps=4, cache=cache_lib.fixed_interval(4, 2)),
     TypeError, "key"),
    ("masked-key", lambda: cache_lib.sample_masked(
        jax.random.split(jax.random.key(0), 2), DEN, SCHED, solvers.DDIM(), SHAPE, steps=4,
        flags=np.ones(4, bool)), ValueError, "key"),
    ("learn-budget", lambda: cache_lib.learn_schedule(
        jax.random.key(0), DEN, SCHED, solvers.DDIM(), SHAPE, steps=4, num_refresh=0), ValueError,
     "num_refresh"),
]

CONSTRUCTOR_CASES = SOLVER_CASES + SCHEDULE_CASES + GUIDANCE_CASES + DENOISER_CASES + CACHE_CASES


@pytest.mark.parametrize("make,error,name", [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructors_refuse(make, error, name):
  with raises_before_tracing(error, name):
    make()


def test_cfg_survives_pytree_round_trips():
  """CFG's own checks must not fire on the placeholders pytree utilities pass through __init__."""
  cfg = CFG(2.0, rescale=0.5)
  assert jax.tree.map(lambda v: None, cfg).scale is None
  assert float(jax.jit(lambda c: c.scale * 2)(cfg)) == 4.0
