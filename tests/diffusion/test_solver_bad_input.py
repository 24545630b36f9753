"""Bad input to the solvers of `solvers.py` and to `sample` with them: each is a ValueError or
TypeError naming the argument, raised before anything is traced (the jitted `_scan` is replaced by
a function that fails if reached; `test_a_valid_call_reaches_the_scan` shows that it would be)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.diffusion import sample as sample_module
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import gaussian_denoiser

VP = schedules.NoiseSchedule()
FLOW = schedules.FlowSchedule(shift=3.0)
SHAPE = (2, 3)
STEPS = 4


class Traced(AssertionError):
  pass


@pytest.fixture(autouse=True)
def no_tracing(monkeypatch):
  def boom(*args, **kwargs):
    raise Traced("traced before validating")

  monkeypatch.setattr(sample_module, "_scan", boom)


def den(prediction_type="epsilon", schedule=VP):
  return gaussian_denoiser(np.zeros(3), np.eye(3), schedule, prediction_type)


def call(solver, schedule=VP, denoiser=None, steps=STEPS, **kw):
  denoiser = denoiser if denoiser is not None else den(
      "flow" if isinstance(schedule, schedules.FlowSchedule) else "epsilon", schedule)
  return sample_module.sample(jax.random.key(0), denoiser, schedule, solver, SHAPE, steps=steps,
                              **kw)


def test_a_valid_call_reaches_the_scan():
  with pytest.raises(Traced):
    call(solvers.DPMSolverPP(algorithm_type="sde-dpmsolver++"),
         noise=np.zeros((STEPS, *SHAPE), np.float32))


# -- options, refused when the solver is built ---------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    # orders the solvers don't have (diffusers' DPM-Solver++ and UniPC also have 3)
    (lambda: solvers.DPMSolverPP(solver_order=3), ValueError, "solver_order.*\\[1, 2\\].*3"),
    (lambda: solvers.UniPC(solver_order=3), ValueError, "solver_order.*\\[1, 2\\].*3"),
    (lambda: solvers.DPMSolverPP(solver_order=0), ValueError, "solver_order"),
    (lambda: solvers.UniPC(solver_order=True), ValueError, "solver_order"),
    (lambda: solvers.make_solver("dpmsolver++", solver_order=3), ValueError, "solver_order"),
    # unknown option values
    (lambda: solvers.DPMSolverPP(algorithm_type="dpmsolver"), ValueError, "algorithm_type"),
    (lambda: solvers.DPMSolverPP(algorithm_type="sde-dpmsolver"), ValueError, "algorithm_type"),
    (lambda: solvers.DPMSolverPP(solver_type="bh2"), ValueError, "solver_type"),
    (lambda: solvers.UniPC(solver_type="midpoint"), ValueError, "solver_type"),
    (lambda: solvers.DPMSolverPP(final_sigmas_type="min"), ValueError, "final_sigmas_type"),
    (lambda: solvers.UniPC(final_sigmas_type=0.0), ValueError, "final_sigmas_type"),
    (lambda: solvers.DPMSolverPP(spacing="uniform"), ValueError, "spacing"),
    (lambda: solvers.Euler(spacing="karras"), ValueError, "spacing"),
    (lambda: solvers.Heun(steps_offset=-1), ValueError, "steps_offset"),
    (lambda: solvers.UniPC(disable_corrector=[1]), ValueError, "disable_corrector"),
    (lambda: solvers.UniPC(disable_corrector=(-1,)), ValueError, "disable_corrector"),
    (lambda: solvers.DPMSolverPP(thresholding=True, dynamic_thresholding_ratio=1.5), ValueError,
     "dynamic_thresholding_ratio"),
    (lambda: solvers.Heun(clip_sample=True, clip_sample_range=0.0), ValueError,
     "clip_sample_range"),
    (lambda: solvers.Euler(clip_sample=True), ValueError, "clip_sample"),
    (lambda: solvers.TCD(gamma=1.5), ValueError, "gamma"),
    (lambda: solvers.TCD(gamma=-0.1), ValueError, "gamma"),
    (lambda: solvers.LCM(timestep_scaling=0.0), ValueError, "timestep_scaling"),
    (lambda: solvers.LCM(original_inference_steps=0), ValueError, "original_inference_steps"),
    (lambda: solvers.TCD(original_inference_steps=12.5), ValueError, "original_inference_steps"),
    # unknown option names and solver names
    (lambda: solvers.make_solver("unipc", order=2), ValueError, "order"),
    (lambda: solvers.make_solver("dpmsolver++", use_lu_lambdas=True), ValueError,
     "use_lu_lambdas"),
    (lambda: solvers.make_solver("lcm", eta=0.3), ValueError, "eta"),
    (lambda: solvers.make_solver("dpm++"), ValueError, "name"),
    (lambda: solvers.DPMSolverPP(variance_type="learned_range"), TypeError, "variance_type"),
    # wrong types: a string or an int where a bool belongs would switch the option on silently
    (lambda: solvers.DPMSolverPP(lower_order_final="no"), TypeError, "lower_order_final"),
    (lambda: solvers.DPMSolverPP(use_karras_sigmas="yes"), TypeError, "use_karras_sigmas"),
    (lambda: solvers.UniPC(thresholding=1), TypeError, "thresholding"),
    (lambda: solvers.Euler(use_karras_sigmas=1), TypeError, "use_karras_sigmas"),
    (lambda: solvers.Heun(clip_sample="true"), TypeError, "clip_sample"),
    (lambda: solvers.FlowEuler(stochastic_sampling="yes"), TypeError, "stochastic_sampling"),
    (lambda: solvers.LCM(set_alpha_to_one=None), TypeError, "set_alpha_to_one"),
    (lambda: solvers.TCD(set_alpha_to_one=0), TypeError, "set_alpha_to_one"),
    (lambda: solvers.TCD(gamma=True), TypeError, "gamma"),
    (lambda: solvers.LCM(timestep_scaling="10"), TypeError, "timestep_scaling"),
    (lambda: solvers.DDIM(eta=True), TypeError, "eta"),
    # schedules
    (lambda: schedules.FlowSchedule(shift=0.0), ValueError, "shift"),
    (lambda: schedules.FlowSchedule(shift=3.0, mu=1.0), ValueError, "shift"),
    (lambda: schedules.FlowSchedule(mu=float("nan")), ValueError, "mu"),
    (lambda: schedules.FlowSchedule(num_train_timesteps=1), ValueError, "num_train_timesteps"),
    (lambda: schedules.dynamic_shift_mu(0), ValueError, "image_seq_len"),
    (lambda: schedules.NoiseSchedule(rescale_betas_zero_snr="yes"), TypeError,
     "rescale_betas_zero_snr"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_option(make, error, match):
  with pytest.raises(error, match=match):
    make()


# -- combinations, refused by sample() before tracing --------------------------------------------

class PartialSolver:
  """DDIM's table and step rule without the rest of the `Solver` protocol (no `model_input`,
  `init_noise_scale`, `check`, `timesteps`, `stochastic`): the driver refuses it rather than
  guess the missing members."""

  def table(self, schedule, steps):
    return solvers.DDIM().table(schedule, steps)

  def step(self, *args):
    return solvers.DDIM().step(*args)

  def init_state(self, x):
    return ()


def noise(rows=STEPS):
  return np.zeros((rows, *SHAPE), np.float32)


@pytest.mark.parametrize("run,error,match", [
    # a consistency sampler takes at most the steps it was distilled with
    (lambda: call(solvers.LCM(original_inference_steps=8), steps=10), ValueError, "steps.*8.*10"),
    (lambda: call(solvers.TCD(original_inference_steps=8), steps=10), ValueError, "steps.*8.*10"),
    (lambda: call(solvers.LCM(original_inference_steps=2000)), ValueError,
     "original_inference_steps"),
    # leading spacing: 999 steps reach t = 999, one past the end with the offset
    (lambda: call(solvers.DPMSolverPP(spacing="leading", steps_offset=1), steps=999), ValueError,
     "steps_offset"),
    (lambda: call(solvers.Euler(), steps=0), ValueError, "steps"),
    (lambda: call(solvers.FlowHeun(), FLOW, steps=1001), ValueError, "steps"),
    (lambda: call(solvers.UniPC(), steps=4.0), TypeError, "steps"),
    # noise of the wrong shape: one draw per table row (Heun-type solvers: 2 N - 1 rows)
    (lambda: call(solvers.DPMSolverPP(algorithm_type="sde-dpmsolver++"), noise=noise(3)),
     ValueError, "noise.*\\(4, 2, 3\\)"),
    (lambda: call(solvers.LCM(), noise=np.zeros((STEPS, 2, 4), np.float32)), ValueError, "noise"),
    (lambda: call(solvers.FlowEuler(stochastic_sampling=True), FLOW, noise=noise()[:, :1]),
     ValueError, "noise"),
    (lambda: call(solvers.TCD(), noise=noise()[None]), ValueError, "noise"),
    # noise for a solver that draws none
    (lambda: call(solvers.DPMSolverPP(), noise=noise()), ValueError, "noise.*deterministic"),
    (lambda: call(solvers.UniPC(), noise=noise()), ValueError, "noise.*deterministic"),
    (lambda: call(solvers.Euler(use_karras_sigmas=True), noise=noise()), ValueError, "noise"),
    (lambda: call(solvers.Heun(), noise=noise(2 * STEPS - 1)), ValueError, "noise"),
    (lambda: call(solvers.FlowEuler(), FLOW, noise=noise()), ValueError, "noise"),
    (lambda: call(solvers.FlowHeun(), FLOW, noise=noise(2 * STEPS - 1)), ValueError, "noise"),
    (lambda: call(solvers.TCD(gamma=0.0), noise=noise()), ValueError, "noise"),
    # not a solver: something that lacks a member of the `solvers.Solver` protocol
    (lambda: call(object()), TypeError, "solver"),
    (lambda: call(PartialSolver()), TypeError, "solver"),
    # a schedule the solver can't use
    (lambda: call(solvers.FlowEuler(), VP, den("flow", FLOW)), TypeError, "schedule"),
    (lambda: call(solvers.FlowHeun(), VP, den("flow", FLOW)), TypeError, "schedule"),
    (lambda: call(solvers.DPMSolverPP(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.UniPC(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.Euler(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.Heun(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.LCM(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.TCD(), FLOW), TypeError, "schedule"),
    (lambda: call(solvers.DDIM(), FLOW), TypeError, "schedule"),
    # a prediction type the solver can't use
    (lambda: call(solvers.FlowEuler(), FLOW, den("epsilon")), ValueError, "prediction_type"),
    (lambda: call(solvers.FlowHeun(), FLOW, den("v_prediction")), ValueError, "prediction_type"),
    (lambda: call(solvers.DPMSolverPP(), VP, den("flow", FLOW)), ValueError, "prediction_type"),
    (lambda: call(solvers.UniPC(), VP, den("flow", FLOW)), ValueError, "prediction_type"),
    (lambda: call(solvers.Euler(), VP, den("flow", FLOW)), ValueError, "prediction_type"),
    (lambda: call(solvers.LCM(), VP, den("flow", FLOW)), ValueError, "prediction_type"),
    (lambda: call(solvers.TCD(), VP, den("flow", FLOW)), ValueError, "prediction_type"),
    # the oracle itself: a flow oracle needs a flow schedule and prediction, and vice versa
    (lambda: gaussian_denoiser(np.zeros(3), np.eye(3), FLOW, "epsilon"), ValueError,
     "prediction_type"),
    (lambda: gaussian_denoiser(np.zeros(3), np.eye(3), VP, "flow"), ValueError,
     "prediction_type"),
    (lambda: gaussian_denoiser(np.zeros(3), np.eye(3), "linear"), TypeError, "schedule"),
    (lambda: gaussian_denoiser(np.zeros(2), -np.eye(2), VP), ValueError, "cov"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_call(run, error, match):
  with pytest.raises(error, match=match):
    run()
