"""`solver_from_diffusers` against diffusers itself: the scheduler configs diffusers' own tests use
and every class's default config, each built once by jaxinf from the config and once by diffusers
from the same config, must visit the same timesteps and produce the same trajectory on a fixed
model function (the harness of tests/parity/test_schedulers_vs_diffusers.py: plain-arithmetic model,
replayed per-step noise, 1e-5 in fp32). Unlike there, diffusers runs with its own float32 buffers
(no float64 upcast): matching them is what the float32 schedule (`NoiseSchedule(dtype="float32")`,
the converter's default) is for. Also: the defaults table against diffusers' signatures, the
float32 buffers against diffusers' tensors, and the named refusals.

The configs below are the `get_scheduler_config()` dicts of diffusers' tests/schedulers/
test_scheduler_{ddpm,ddim,dpm_multi,unipc,euler,heun,lcm,tcd}.py and the default config of
test_scheduler_flow_match_euler_discrete.py (huggingface/diffusers, read at commit 58eb52c0), each
with the overrides its `test_full_loop_*` tests pass.
"""

from __future__ import annotations

import inspect
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec
from jaxinf.diffusion.from_diffusers import (DIFFUSERS_DEFAULTS, DIFFUSERS_SCHEDULER_KEYS,
                                             DIFFUSERS_VERSION, IGNORED_KEYS, SUPPORTED_CLASSES,
                                             FromDiffusers, solver_from_diffusers)
from jaxinf.diffusion.sample import sample
from tests.bad_input import raises_before_tracing

SHAPE = (2, 2, 3)  # [B, C, L]: diffusers' thresholding needs a channel axis

# diffusers' tests/schedulers get_scheduler_config() dicts, as data.
_DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "variance_type": "fixed_small", "clip_sample": True}
_DDIM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
         "beta_schedule": "linear", "clip_sample": True}
_DPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "solver_order": 2, "prediction_type": "epsilon",
        "thresholding": False, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": False, "euler_at_final": False,
        "lambda_min_clipped": -float("inf"), "variance_type": None,
        "final_sigmas_type": "sigma_min"}
_UNIPC = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
          "beta_schedule": "linear", "solver_order": 2, "solver_type": "bh2",
          "final_sigmas_type": "sigma_min"}
_EULER = {"num_train_timesteps": 1100, "beta_start": 0.0001, "beta_end": 0.02,
          "beta_schedule": "linear"}
_HEUN = dict(_EULER)
_LCM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.0120,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
_TCD = dict(_LCM)
_FLOW = {"num_train_timesteps": 1000, "shift": 1.0}

DIFFUSERS_TEST_CONFIGS = [
    ("ddpm", "DDPMScheduler", _DDPM),
    ("ddpm-v", "DDPMScheduler", {**_DDPM, "prediction_type": "v_prediction"}),
    ("ddim", "DDIMScheduler", _DDIM),
    ("ddim-offset", "DDIMScheduler", {**_DDIM, "steps_offset": 1}),
    ("ddim-v", "DDIMScheduler", {**_DDIM, "prediction_type": "v_prediction"}),
    ("ddim-no-alpha-to-one", "DDIMScheduler", {**_DDIM, "set_alpha_to_one": False,
                                               "beta_start": 0.01}),
    ("dpm", "DPMSolverMultistepScheduler", _DPM),
    ("dpm-thres", "DPMSolverMultistepScheduler", {**_DPM, "thresholding": True,
                                                  "dynamic_thresholding_ratio": 0.87,
                                                  "sample_max_value": 0.5}),
    ("dpm-v", "DPMSolverMultistepScheduler", {**_DPM, "prediction_type": "v_prediction"}),
    ("dpm-karras-v", "DPMSolverMultistepScheduler", {**_DPM, "prediction_type": "v_prediction",
                                                     "use_karras_sigmas": True}),
    ("unipc", "UniPCMultistepScheduler", _UNIPC),
    ("unipc-karras", "UniPCMultistepScheduler", {**_UNIPC, "use_karras_sigmas": True}),
    ("unipc-v", "UniPCMultistepScheduler", {**_UNIPC, "prediction_type": "v_prediction"}),
    ("euler", "EulerDiscreteScheduler", _EULER),
    ("euler-v", "EulerDiscreteScheduler", {**_EULER, "prediction_type": "v_prediction"}),
    ("euler-karras", "EulerDiscreteScheduler", {**_EULER, "use_karras_sigmas": True}),
    ("heun", "HeunDiscreteScheduler", _HEUN),
    ("heun-v", "HeunDiscreteScheduler", {**_HEUN, "prediction_type": "v_prediction"}),
    ("heun-karras", "HeunDiscreteScheduler", {**_HEUN, "use_karras_sigmas": True}),
    ("lcm", "LCMScheduler", _LCM),
    ("tcd", "TCDScheduler", _TCD),
    ("flow-euler", "FlowMatchEulerDiscreteScheduler", _FLOW),
    ("flow-euler-shift3", "FlowMatchEulerDiscreteScheduler", {**_FLOW, "shift": 3.0}),
]
# Configs as users have them: published pipelines' scheduler_config.json files (their shape:
# SDXL's Euler and SD 2.1's DDIM carry PNDM leftovers such as skip_prk_steps, which diffusers'
# from_config drops), SD 1.5's PNDM config run as DPM-Solver++ 2M Karras, a zero-terminal-SNR
# v-prediction DDIM, and FLUX's dynamically shifted flow matching at 1024 latent tokens.
_PNDM_LEFTOVERS = {"skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False,
                   "sample_max_value": 1.0, "trained_betas": None, "_diffusers_version": "0.19.0"}
_SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
       "num_train_timesteps": 1000}
USER_CONFIGS = [
    ("sdxl-euler", "EulerDiscreteScheduler",
     {**_SD, **_PNDM_LEFTOVERS, "_class_name": "EulerDiscreteScheduler",
      "interpolation_type": "linear", "prediction_type": "epsilon", "steps_offset": 1,
      "timestep_spacing": "leading", "use_karras_sigmas": False}, {}),
    ("sd21-ddim-v", "DDIMScheduler",
     {**_SD, **_PNDM_LEFTOVERS, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
      "steps_offset": 1}, {}),
    ("sd15-as-dpm-karras", "DPMSolverMultistepScheduler",
     {**_SD, **_PNDM_LEFTOVERS, "_class_name": "PNDMScheduler", "steps_offset": 1,
      "use_karras_sigmas": True}, {"class_name": "DPMSolverMultistepScheduler"}),
    ("ddim-zsnr-trailing-v", "DDIMScheduler",
     {**_SD, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}, {}),
    ("flux-dynamic-shift", "FlowMatchEulerDiscreteScheduler",
     {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
      "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
      "shift": 3.0, "use_dynamic_shifting": True}, {"image_seq_len": 1024}),
]
# (each class's default config, `Cls().config`, is the other half of the round trip)
CASES = ([pytest.param(c, {"_class_name": c, **cfg}, {}, id=name)
          for name, c, cfg in DIFFUSERS_TEST_CONFIGS]
         + [pytest.param(c, None, {}, id=f"default-{c}") for c in SUPPORTED_CLASSES]
         + [pytest.param(c, cfg, kw, id=name) for name, c, cfg, kw in USER_CONFIGS])
STEPS = 4


def model_fn(x, t):
  """The parity tests' fixed 'denoiser': only +, -, *, / so that torch and XLA round alike."""
  return 0.6 * x * (t + 50.0) / (t + 500.0) + 0.3 * x / (1.0 + x * x)


def _jax_apply(params, x, t, cond):
  del params, cond
  return model_fn(x, t.reshape((-1,) + (1,) * (x.ndim - 1)))


def _diffusers():
  pytest.importorskip("torch")
  return pytest.importorskip("diffusers")


def _flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
  """diffusers' FLUX pipeline's `calculate_shift` (pipelines/flux/pipeline_flux.py), restated."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * m + (base_shift - m * base_seq_len)


def _both(class_name, config, kwargs):
  """(jaxinf's FromDiffusers, diffusers' scheduler, its set_timesteps kwargs) from one config:
  diffusers' `class_name.from_config(config)`, as a user loads it (None: the class's defaults,
  `Cls().config`, with `_class_name` added as save_config writes it)."""
  cls = getattr(_diffusers(), class_name)
  if config is None:
    config = {"_class_name": class_name, **cls().config}
  got = solver_from_diffusers(config, **kwargs)
  set_kwargs = {"mu": _flux_mu(kwargs["image_seq_len"])} if "image_seq_len" in kwargs else {}
  return got, cls.from_config(config), set_kwargs


def _run_diffusers(scheduler, steps, x_init, noise, monkeypatch, set_kwargs=None):
  """diffusers' own loop (as in its pipelines), its `randn_tensor` replaying `noise`."""
  import torch
  module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
  current = [0]
  if noise is not None:
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(noise[current[0]].copy()))
  scheduler.set_timesteps(steps, **(set_kwargs or {}))
  if hasattr(scheduler, "set_begin_index"):
    scheduler.set_begin_index(0)
  x = torch.from_numpy(x_init.copy()) * getattr(scheduler, "init_noise_sigma", 1.0)
  x = x.to(torch.float32)
  traj = []
  for i, t in enumerate(scheduler.timesteps):
    current[0] = i
    x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
    out = model_fn(x_in, t.to(torch.float32))
    x = scheduler.step(out, t, x).prev_sample
    traj.append(x.numpy().copy())
  return np.stack(traj)

def _run_jaxinf(got: FromDiffusers, steps, x_init, noise):
  den = Denoiser({}, DenoiserSpec(_jax_apply, prediction_type=got.prediction_type,
                                  learned_sigma=got.learned_sigma))
  _, traj = sample(jax.random.key(0), den, got.schedule, got.solver, SHAPE, steps=steps,
                   x_init=jnp.asarray(x_init), noise=None if noise is None else jnp.asarray(noise),
                   return_trajectory=True)
  return np.asarray(traj)


def _tolerance(got: FromDiffusers, x_init) -> float:
  """1e-5, as the parity tests, except for Euler/Heun. Those keep x at the variance-exploding
  scale, |x| ~ sigma_max |z| (157 |z| on the linear schedule diffusers' Euler/Heun tests and
  defaults use; the parity tests run them on scaled_linear only, 14.6), and their steps cancel it
  down to O(1), so float32 rounding of the coefficients (jaxinf: float64 tables cast once; torch:
  float32 arithmetic each step) and XLA's fused multiply-add (one rounding where torch has two)
  show at the scale of sigma_max |z|: allowed 2e-6 of it (measured worst, heun-v: 3.5e-4 at
  sigma_max |z| = 470, 7.5e-7 of it; diffusers' own float32 run is 1.6e-4 from a float64 run there,
  jaxinf's 3.6e-4)."""
  if not isinstance(got.solver, (solvers.Euler, solvers.Heun)):
    return 1e-5
  scale = got.solver.init_noise_scale(got.schedule, STEPS) * float(np.abs(x_init).max())
  return max(1e-5, 2e-6 * scale)


@pytest.mark.parity
@pytest.mark.parametrize("class_name, config, kwargs", CASES)
@pytest.mark.filterwarnings("ignore:scheduler_config.*does not read:UserWarning")
def test_round_trip_matches_diffusers(class_name, config, kwargs, monkeypatch):
  got, ref, set_kwargs = _both(class_name, config, kwargs)
  table = got.solver.table(got.schedule, STEPS)
  ref.set_timesteps(STEPS, **set_kwargs)
  # the same timesteps (Heun: both stages, interleaved), to the fp32 the model sees; flow matching
  # within 1 ulp (diffusers rounds sigma to float32 before sigma * T, jaxinf rounds sigma * T once)
  theirs_t = ref.timesteps.numpy().astype(np.float32)
  if isinstance(got.schedule, schedules.FlowSchedule):
    np.testing.assert_array_max_ulp(table["t"], theirs_t, 1)
  else:
    np.testing.assert_array_equal(table["t"], theirs_t)
  rng = np.random.default_rng(sum(map(ord, class_name)))
  x_init = rng.standard_normal(SHAPE).astype(np.float32)
  rows = len(table["t"])
  noise = (rng.standard_normal((rows, *SHAPE)).astype(np.float32) if got.solver.stochastic
           else None)
  ours = _run_jaxinf(got, STEPS, x_init, noise)
  theirs = _run_diffusers(ref, STEPS, x_init, noise, monkeypatch, set_kwargs)
  tol = _tolerance(got, x_init)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=tol)


@pytest.mark.parity
def test_float64_tables_miss_diffusers_where_float32_tables_replay_it(monkeypatch):
  """The case that motivates the float32 schedule: Euler with Karras sigmas on the linear
  schedule. diffusers' float32 1 - abar_0 moves sigma_min by ~1e-4 relative; jaxinf's float64
  table then visits other timesteps and lands elsewhere, the float32 one replays diffusers."""
  config = {**_EULER, "use_karras_sigmas": True, "_class_name": "EulerDiscreteScheduler"}
  got, ref, _ = _both("EulerDiscreteScheduler", config, {})
  f64 = solver_from_diffusers(config, dtype="float64")
  ref.set_timesteps(STEPS)
  sig32 = got.solver.table(got.schedule, STEPS)["sigma"]
  sig64 = f64.solver.table(f64.schedule, STEPS)["sigma"]
  np.testing.assert_array_equal(sig32, ref.sigmas.numpy()[:-1])
  assert abs(sig64[-1] / ref.sigmas.numpy()[-2] - 1) > 1e-5


@pytest.mark.parity
def test_defaults_table_is_diffusers_signatures():
  """DIFFUSERS_DEFAULTS is every supported class's `__init__` keywords and defaults, exactly."""
  diffusers = _diffusers()
  if diffusers.__version__ != DIFFUSERS_VERSION:
    pytest.skip(f"table written for diffusers {DIFFUSERS_VERSION}, installed "
                f"{diffusers.__version__}")
  for name in SUPPORTED_CLASSES:
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    signature = {k: p.default for k, p in params.items() if k != "self"}
    assert list(signature) == list(DIFFUSERS_DEFAULTS[name]), name
    for key, value in signature.items():
      ours = DIFFUSERS_DEFAULTS[name][key]
      assert type(ours) is type(value) and (ours == value or ours is value), (name, key)
  every_key = set()
  for name in dir(diffusers):
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and (
        cls is not diffusers.SchedulerMixin):
      every_key |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "args"}
  assert DIFFUSERS_SCHEDULER_KEYS == every_key


@pytest.mark.parity
@pytest.mark.parametrize("kw", [
    dict(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"), dict(num_train_timesteps=1100),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         rescale_betas_zero_snr=True)], ids=["linear", "scaled", "cosine", "T1100", "zsnr"])
def test_float32_buffers_are_diffusers(kw, monkeypatch):
  """betas and abar bit for bit, sigma within 1 ulp (torch's vectorised sqrt is not always
  correctly rounded). Under zero-terminal SNR that sqrt sits inside the rescaling, where a 1-ulp
  difference grows through the shift, the square and the cumprod of ratios (on a 2-core AMD EPYC
  with AVX2, torch's float32 sqrt was 1 ulp off numpy's in 182 of the 1000 entries and abar then
  differed by up to 4e-6; the float64 abar is 4e-5 off): there the reference is built with a
  correctly rounded sqrt (float64 then rounded to float32, exact since 53 >= 2 x 24 + 2), and
  betas and abar must again agree bit for bit."""
  torch = pytest.importorskip("torch")
  if kw.get("rescale_betas_zero_snr"):
    sqrt = torch.Tensor.sqrt
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda x: sqrt(x.double()).to(x.dtype))
  ref = _diffusers().DDIMScheduler(**kw)
  monkeypatch.undo()
  ours = schedules.NoiseSchedule(**kw, dtype="float32")
  abar = ref.alphas_cumprod.numpy()
  sig = (((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy()
  np.testing.assert_array_equal(ours.betas.astype(np.float32), ref.betas.numpy())
  if kw.get("rescale_betas_zero_snr"):
    assert abar[-1] == ours.alphas_cumprod[-1] == 0.0
    np.testing.assert_array_equal(ours.alphas_cumprod.astype(np.float32), abar)
    np.testing.assert_array_max_ulp(ours.sigmas[:-1].astype(np.float32), sig[:-1], 1)
    assert ours.sigmas[-1] == np.float32(np.sqrt((1 - 2.0**-24) / 2.0**-24))  # diffusers' floor
  else:
    np.testing.assert_array_equal(ours.alphas_cumprod, abar)
    np.testing.assert_array_max_ulp(ours.sigmas.astype(np.float32), sig, 1)
  assert ours.sigmas.dtype == np.float64  # float32 values, float64 arithmetic downstream


@pytest.mark.parity
def test_json_file_and_folder(tmp_path):
  """A scheduler folder written by diffusers' save_config, its json, and the dict agree."""
  diffusers = _diffusers()
  ref = diffusers.DPMSolverMultistepScheduler(**_DPM)
  ref.save_config(tmp_path)
  with open(tmp_path / "scheduler_config.json") as f:
    written = json.load(f)
  from_dict = solver_from_diffusers(written)
  assert solver_from_diffusers(tmp_path) == from_dict
  assert solver_from_diffusers(str(tmp_path / "scheduler_config.json")) == from_dict
  assert from_dict.solver.final_sigmas_type == "sigma_min"
  assert not from_dict.solver.lower_order_final


# ------------------------------------------------------------------------------------------------
# Without diffusers: mapping, defaults, refusals.


def test_missing_keys_take_diffusers_defaults_not_jaxinfs():
  got = solver_from_diffusers({"_class_name": "DDIMScheduler"})
  assert got.solver.clip_sample and not solvers.DDIM().clip_sample
  assert got.schedule == schedules.NoiseSchedule(dtype="float32")
  got = solver_from_diffusers({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                               "_diffusers_version": "0.30.0"}, dtype="float64", eta=0.5)
  assert (got.solver.spacing, got.solver.eta, got.schedule.dtype) == ("trailing", 0.5, "float64")
  got = solver_from_diffusers({"_class_name": "DDPMScheduler", "variance_type": "learned_range",
                               "prediction_type": "v_prediction"})
  assert (got.solver.variance_type, got.prediction_type, got.learned_sigma) == (
      "learned_range", "v_prediction", True)
  assert solver_from_diffusers({"_class_name": "TCDScheduler"}).solver.gamma == 0.3
  # a lambda_min_clipped below the schedule's lowest lambda (-5.06 on linear) clips nothing
  assert solver_from_diffusers({"_class_name": "DPMSolverMultistepScheduler",
                                "lambda_min_clipped": -5.1}).solver.spacing == "linspace"


def test_dynamic_shift_takes_mu_or_image_seq_len():
  cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
         "shift": 3.0}
  by_len = solver_from_diffusers(cfg, image_seq_len=4096)
  assert by_len.schedule.mu == pytest.approx(1.15) and by_len.schedule.shift == 1.0
  assert solver_from_diffusers(cfg, mu=0.8).schedule.mu == 0.8
  with raises_before_tracing(ValueError, "^mu: .*use_dynamic_shifting"):
    solver_from_diffusers(cfg)
  with raises_before_tracing(ValueError, "^mu: .*use_dynamic_shifting=False"):
    solver_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler"}, mu=0.8)


def test_other_schedulers_keys_are_dropped_with_a_warning_and_listed():
  pndm = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
          "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": True, "steps_offset": 1,
          "set_alpha_to_one": False, "clip_sample": False}
  with raises_before_tracing(ValueError, "^scheduler_config: _class_name 'PNDMScheduler'"):
    solver_from_diffusers(pndm)
  with pytest.warns(UserWarning, match=r"EulerDiscreteScheduler does not read \['clip_sample', "
                    r"'set_alpha_to_one', 'skip_prk_steps'\]"):
    got = solver_from_diffusers(pndm, class_name="EulerDiscreteScheduler")
  assert got.dropped_keys == ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
  assert got.solver.steps_offset == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = solver_from_diffusers(pndm, class_name="DDIMScheduler", ignore_keys=("skip_prk_steps",))
  assert (got.solver.set_alpha_to_one, got.dropped_keys) == (False, ("skip_prk_steps",))
  # a key no diffusers scheduler has is refused, unless dropped on purpose
  with raises_before_tracing(ValueError, r"has no key\(s\) \['my_key'\]"):
    solver_from_diffusers({"_class_name": "DDIMScheduler", "my_key": 1})
  got = solver_from_diffusers({"_class_name": "DDIMScheduler", "my_key": 1}, ignore_keys=["my_key"])
  assert got.dropped_keys == ("my_key",)


@pytest.mark.parametrize("config, kwargs, error, pattern", [
    ({"_class_name": "KDPM2DiscreteScheduler"}, {}, ValueError,
     r"^scheduler_config: _class_name 'KDPM2DiscreteScheduler'.*DDIMScheduler"),
    ({"beta_schedule": "linear"}, {}, ValueError, "^scheduler_config: no '_class_name'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True}, {}, ValueError,
     "^scheduler_config: DPMSolverMultistepScheduler use_lu_lambdas=True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, {}, ValueError,
     "^scheduler_config: DPMSolverMultistepScheduler solver_order=3"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, {}, ValueError,
     "algorithm_type='dpmsolver'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -4.0}, {}, ValueError,
     "lambda_min_clipped=-4.0 .* clips"),
    ({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}, {}, ValueError,
     r"trained_betas=\[0.1, 0.2\]"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, {}, ValueError,
     "beta_schedule='sigmoid'"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "uniform"}, {}, ValueError,
     "timestep_spacing='uniform'"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}, {}, ValueError,
     "variance_type='fixed_large_log'"),
    ({"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "sigma_min"}, {}, ValueError,
     "final_sigmas_type='sigma_min'"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "sigma_min": 0.1}, {},
     ValueError, "sigma_min=0.1"),
    ({"_class_name": "UniPCMultistepScheduler", "lower_order_final": False}, {}, ValueError,
     "lower_order_final=False"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, {}, ValueError,
     "use_flow_sigmas=True"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, {}, ValueError,
     "invert_sigmas=True"),
    ({"_class_name": "DDIMScheduler", "clip_sampel": True}, {}, ValueError,
     r"^scheduler_config: DDIMScheduler has no key\(s\) \['clip_sampel'\]"),
    ({"_class_name": "DDIMScheduler", "num_train_timesteps": 0}, {}, ValueError,
     "^scheduler_config: DDIMScheduler num_train_timesteps"),
    ({"_class_name": "HeunDiscreteScheduler", "clip_sample": "yes"}, {}, TypeError,
     "^scheduler_config: HeunDiscreteScheduler clip_sample"),
    ({"_class_name": "DDIMScheduler"}, {"eta": -1.0}, ValueError, "^eta:"),
    ({"_class_name": "DDPMScheduler"}, {"eta": 0.5}, ValueError, "^eta: only DDIM"),
    ({"_class_name": "DDIMScheduler"}, {"dtype": "float16"}, ValueError, "^dtype:"),
    ({"_class_name": "DDIMScheduler"}, {"class_name": "Nope"}, ValueError, "^class_name: 'Nope'"),
    ({"_class_name": "DDIMScheduler"}, {"mu": 0.5}, ValueError, "^mu: only FlowMatch"),
    ({"_class_name": "DDIMScheduler"}, {"ignore_keys": ("clip_sample",)}, ValueError,
     r"^ignore_keys: \['clip_sample'\] are DDIMScheduler options"),
])
def test_refusals_name_the_key_and_value(config, kwargs, error, pattern):
  with raises_before_tracing(error, pattern):
    solver_from_diffusers(config, **kwargs)


def test_bad_config_types_and_paths(tmp_path):
  with raises_before_tracing(TypeError, "^scheduler_config: expected a dict"):
    solver_from_diffusers(["DDIMScheduler"])
  with raises_before_tracing(ValueError, "^scheduler_config: no such file"):
    solver_from_diffusers(tmp_path / "missing.json")
  with raises_before_tracing(ValueError, "^scheduler_config: no such file"):
    solver_from_diffusers(tmp_path)  # a folder without scheduler_config.json
  (tmp_path / "bad.json").write_text("{not json")
  with raises_before_tracing(ValueError, "^scheduler_config: .* is not valid JSON"):
    solver_from_diffusers(tmp_path / "bad.json")
  (tmp_path / "list.json").write_text("[1, 2]")
  with raises_before_tracing(TypeError, "^scheduler_config: .* holds a JSON list"):
    solver_from_diffusers(tmp_path / "list.json")


def test_every_default_key_is_accounted_for():
  """Each class's full default config converts (a handler that left a key unmapped, unignored and
  unrefused would raise), and the ignored meta keys are accepted."""
  for name in SUPPORTED_CLASSES:
    config = {"_class_name": name, **DIFFUSERS_DEFAULTS[name], "_diffusers_version": "0.42.1",
              "_use_default_values": list(DIFFUSERS_DEFAULTS[name])}
    kwargs = {}
    got = solver_from_diffusers(config, **kwargs)
    assert isinstance(got, FromDiffusers)
  assert "_class_name" in IGNORED_KEYS


def test_noise_schedule_dtype():
  s32 = schedules.NoiseSchedule(dtype="float32")
  assert s32 != schedules.NoiseSchedule()  # a different table, so a different jit key
  for buf in (s32.betas, s32.alphas_cumprod, s32.sigmas, s32.log_sigmas):
    assert buf.dtype == np.float64
    np.testing.assert_array_equal(buf, buf.astype(np.float32).astype(np.float64))
  # sigma_0 is where float32 loses most: 1 - abar_0 = 1e-4 keeps few bits
  rel = abs(s32.sigmas[0] / schedules.NoiseSchedule().sigmas[0] - 1)
  assert 1e-6 < rel < 1e-3
  with raises_before_tracing(ValueError, "^dtype: unknown value 'float16'"):
    schedules.NoiseSchedule(dtype="float16")
  with raises_before_tracing(TypeError, "^dtype: "):
    schedules.NoiseSchedule(dtype=np.float32)
