"""diffusers scheduler configs in: a `scheduler_config.json` (or the dict diffusers writes) becomes
jaxinf's solver and schedule, configured as diffusers would run it.

`solver_from_diffusers(config)` reads the config's `_class_name` (one of `SUPPORTED_CLASSES`), fills
every missing key with diffusers' own default for that class (`DIFFUSERS_DEFAULTS`, not jaxinf's:
`DDIMScheduler` clips x0 by default, `solvers.DDIM()` does not), and accounts for every key:

- mapped onto a jaxinf option (`timestep_spacing` -> `spacing`, `beta_schedule` -> the
  schedule, ...);
- ignored, with the reason written in the handler, only where diffusers itself does not read the
  key (`_diffusers_version`; `steps_offset` in `LCMScheduler`, whose grid ignores it; `flow_shift`
  while `use_flow_sigmas` is off, ...);
- or refused with a ValueError naming the class, the key and its value, when the value asks for
  something jaxinf does not implement (`use_lu_lambdas=True`, `solver_order=3`, trained betas, ...).

A key of another diffusers scheduler that this class does not take (SDXL's EulerDiscreteScheduler
config still carries PNDM's `skip_prk_steps`) is dropped as diffusers' `from_config` drops it: with
a warning, and listed in the result's `dropped_keys`. A key no diffusers scheduler has (a typo, a
key of a newer diffusers) is refused, never dropped, unless named in `ignore_keys=`.

The schedule's buffers are built in float32 by default (`NoiseSchedule(dtype="float32")`), as
diffusers builds them, so that a trajectory replays diffusers' to float32 rounding; pass
`dtype="float64"` for jaxinf's more accurate tables. The result is a frozen `FromDiffusers`
(solver, schedule, prediction_type, learned_sigma, dropped_keys): prediction_type and learned_sigma
are what the denoiser needs (`DenoiserSpec(apply, prediction_type=..., learned_sigma=...)`), since
in diffusers they live in the scheduler config rather than beside the model.

Values a diffusers pipeline passes at call time rather than in the config are keyword arguments
here: `eta` (DDIM's stochasticity, TCD's gamma; diffusers' `step(..., eta=)`), and `mu` or
`image_seq_len` for `FlowMatchEulerDiscreteScheduler` with `use_dynamic_shifting` (diffusers'
`set_timesteps(mu=)`, which FLUX-style pipelines compute from the latent token count with the
config's `base_shift`/`max_shift`/`base_image_seq_len`/`max_image_seq_len`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxinf.diffusion import schedules, solvers

DIFFUSERS_VERSION = "0.42.1"
_INF = float("inf")

# Every supported scheduler's `__init__` keyword defaults, copied from diffusers 0.42.1
# (`inspect.signature(Cls.__init__)`; tests/diffusion/test_from_diffusers.py holds this table
# against the installed diffusers). A key missing from a config takes the value here.
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, variance_type="fixed_small", clip_sample=True,
        prediction_type="epsilon",
        thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
        sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
        rescale_betas_zero_snr=False),
    "DDIMScheduler": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
        prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
        rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-_INF, variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential"),
    "UniPCMultistepScheduler": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
        lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
        timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
        sigma_min=None, sigma_max=None, shift_terminal=None),
    "EulerDiscreteScheduler": dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
        steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "HeunDiscreteScheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
        trained_betas=None, prediction_type="epsilon", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0),
    "FlowMatchEulerDiscreteScheduler": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
        shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False),
    "FlowMatchHeunDiscreteScheduler": dict(num_train_timesteps=1000, shift=1.0),
    "LCMScheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
        timestep_scaling=10.0, rescale_betas_zero_snr=False),
    "TCDScheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
        timestep_scaling=10.0, rescale_betas_zero_snr=False),
}
SUPPORTED_CLASSES = tuple(DIFFUSERS_DEFAULTS)

# Every `__init__` keyword of diffusers 0.42.1's 47 scheduler classes (the SchedulerMixin
# subclasses it exports; the test holds this against the installed diffusers). A key of one of
# them that the chosen class does not take is a leftover of another scheduler (SDXL's
# EulerDiscreteScheduler config still carries PNDM's `skip_prk_steps`, `set_alpha_to_one`, ...):
# diffusers' `from_config` drops it with a warning, and so does `solver_from_diffusers`, listing
# it in `FromDiffusers.dropped_keys`. Any other key is refused.
DIFFUSERS_SCHEDULER_KEYS = frozenset((
    "algorithm_type", "alpha_cum_end", "alpha_cum_start", "base_image_seq_len", "base_shift",
    "beta_end", "beta_schedule", "beta_start", "block_length", "clip_denoised", "clip_sample",
    "clip_sample_range", "correct_steps", "corrector_k", "corrector_order",
    "corrector_selection", "corrector_selection_tau", "corrector_steps", "disable_corrector",
    "dynamic_thresholding_ratio", "editing_threshold", "entropy_bound", "eps", "eta",
    "euler_at_final", "final_sigmas_type", "final_step_size_scale", "flow_shift", "gamma",
    "gamma_cum_end", "gamma_cum_start", "interpolation_type", "invert_sigmas",
    "lambda_min_clipped", "lower_order_final", "mask_token_id", "masking_schedule",
    "max_image_seq_len", "max_shift", "minimal_topk", "n_grid", "noise_mode",
    "num_inference_steps", "num_policy_substeps", "num_train_timesteps", "num_vec_classes",
    "original_inference_steps", "predict_x0", "prediction_type", "predictor_order",
    "rescale_betas_zero_snr", "rho", "s", "s_churn", "s_max", "s_min", "s_noise",
    "sample_max_value", "sampling_eps", "scale_factors", "scaler", "schedule_mode",
    "scheduler_type", "set_alpha_to_one", "shift", "shift_terminal", "sigma_data", "sigma_max",
    "sigma_min", "sigma_schedule", "skip_prk_steps", "snr", "snr_shift_scale", "solver_order",
    "solver_p", "solver_type", "stage_range", "stages", "steps_offset", "stochastic_sampling",
    "t_lim_ode", "t_lim_ode_below", "t_max", "t_min", "tail_step_multiplier", "tail_steps",
    "tau_func", "threshold", "thresholding", "time_shift_type", "timestep_scaling",
    "timestep_spacing", "timestep_type", "trained_betas", "tsr_k", "tsr_sigma", "upscale_mode",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type"))

# Keys diffusers' ConfigMixin writes or keeps about the config itself, never read by a scheduler.
IGNORED_KEYS = {
    "_class_name": "names the scheduler class (read to pick the solver)",
    "_diffusers_version": "the diffusers version that wrote the file",
    "_use_default_values": "diffusers' record of which keys took their defaults",
    "_name_or_path": "where diffusers loaded the config from",
}


@dataclasses.dataclass(frozen=True)
class FromDiffusers:
  """What a diffusers scheduler config describes, in jaxinf's terms: the `solver` and its
  `schedule` (as `sample(..., schedule, solver, ...)` takes them), and the two facts about the
  model that diffusers keeps in the scheduler config: `prediction_type` (epsilon, v_prediction,
  sample; "flow" for the flow-matching classes) and `learned_sigma` (the model output carries a
  variance half: DDPM's `variance_type="learned_range"`, DPM-Solver's `variance_type`
  "learned"/"learned_range"); both go into the `DenoiserSpec`. `dropped_keys`: the config's keys
  that belong to other diffusers schedulers and that this class does not read (diffusers drops
  them too), and those dropped on request (`ignore_keys=`). A frozen dataclass rather than a tuple,
  so that fields can be added without breaking unpacking callers."""

  solver: Any
  schedule: Any
  prediction_type: str
  learned_sigma: bool = False
  dropped_keys: tuple[str, ...] = ()


class _Keys:
  """The config of one class with diffusers' defaults filled in, and a record of the keys the
  handler has accounted for (mapped, ignored with a reason, or checked to hold a supported value):
  `solver_from_diffusers` fails if a handler leaves one unaccounted for."""

  def __init__(self, class_name: str, values: dict[str, Any]):
    self.class_name = class_name
    self.values = values
    self.seen: set[str] = set()

  def get(self, key: str) -> Any:
    self.seen.add(key)
    return self.values[key]

  def ignore(self, key: str, why: str) -> None:
    """`key` is not read by diffusers in this configuration (`why` says so); accounted for."""
    del why
    self.seen.add(key)

  def refuse(self, key: str, why: str) -> None:
    value = self.values[key]
    raise ValueError(f"scheduler_config: {self.class_name} {key}={value!r} is not supported by "
                     f"jaxinf: {why}")

  def only(self, key: str, allowed: tuple, why: str = "") -> Any:
    """The value of `key`, which must be one of `allowed` (compared by type too: True is not 1)."""
    value = self.get(key)
    if not any(_same(value, a) for a in allowed):
      self.refuse(key, (why + "; " if why else "") + f"supported: {list(allowed)}")
    return value


def _same(value, allowed) -> bool:
  if allowed is None or isinstance(allowed, bool):
    return value is allowed or (isinstance(value, np.bool_) and bool(value) is allowed)
  if isinstance(allowed, str):
    return isinstance(value, str) and value == allowed
  return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and value == allowed)


def _load(scheduler_config) -> dict[str, Any]:
  """The config as a plain dict: a mapping as given, or the JSON of a path (a
  `scheduler_config.json`, or the scheduler folder holding one)."""
  if isinstance(scheduler_config, Mapping):
    config = dict(scheduler_config)
  elif isinstance(scheduler_config, (str, os.PathLike)):
    path = os.fspath(scheduler_config)
    if os.path.isdir(path):
      path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
      raise ValueError(f"scheduler_config: no such file {path!r} (expected a diffusers "
                       f"scheduler_config.json, or the folder holding one)")
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"scheduler_config: {path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
      raise TypeError(f"scheduler_config: {path!r} holds a JSON {type(config).__name__}, expected "
                      f"an object of scheduler options")
  else:
    raise TypeError(f"scheduler_config: expected a dict (a diffusers scheduler config) or the path "
                    f"of a scheduler_config.json, got {type(scheduler_config).__name__}")
  bad = [k for k in config if not isinstance(k, str)]
  if bad:
    raise TypeError(f"scheduler_config: keys must be str, got {bad!r}")
  return config


def solver_from_diffusers(scheduler_config: Mapping[str, Any] | str | os.PathLike, *,
                          class_name: str | None = None, dtype: str = "float32",
                          eta: float | None = None, mu: float | None = None,
                          image_seq_len: int | None = None,
                          ignore_keys: tuple[str, ...] = ()) -> FromDiffusers:
  """jaxinf's solver, schedule, prediction type and learned-sigma flag for a diffusers scheduler
  config, configured exactly as diffusers runs it (diffusers' defaults for missing keys).

  scheduler_config: the dict diffusers writes (`scheduler.config`, `_class_name` included), or the
    path of a `scheduler_config.json` or of the folder holding one.
  class_name: build this class instead of `_class_name` (diffusers' `Cls.from_config(config)`,
    e.g. a DPMSolverMultistepScheduler from a PNDMScheduler config); needed when the config has no
    `_class_name`. Keys of other schedulers are dropped with a warning, as diffusers drops them.
  dtype: precision of the VP schedule's buffers, "float32" (diffusers' own, the default: exact
    replay) or "float64" (jaxinf's more accurate tables); no effect on the flow schedules.
  eta: DDIMScheduler's stochasticity (default 0.0) or TCDScheduler's gamma (default 0.3), which
    diffusers takes in `step()`, not in the config.
  mu / image_seq_len: FlowMatchEulerDiscreteScheduler with `use_dynamic_shifting` only: the shift
    exponent (diffusers' `set_timesteps(mu=)`), or the latent token count it is computed from with
    the config's base/max shift and sequence lengths (`schedules.dynamic_shift_mu`).
  ignore_keys: config keys to drop on purpose, without a warning (also keys no diffusers
    scheduler has, which are otherwise refused).

  Raises a ValueError naming the key and value for an unknown `_class_name`, a key no diffusers
  scheduler has, or a value jaxinf does not implement; TypeError for a config of the wrong type.
  Warns (UserWarning) when it drops keys of other diffusers schedulers.
  """
  config = _load(scheduler_config)
  if class_name is None:
    if "_class_name" not in config:
      raise ValueError(f"scheduler_config: no '_class_name' key; pass class_name= (one of "
                       f"{list(SUPPORTED_CLASSES)})")
    class_name, source = config["_class_name"], "scheduler_config: _class_name"
  else:
    source = "class_name:"
  if not isinstance(class_name, str) or class_name not in DIFFUSERS_DEFAULTS:
    raise ValueError(f"{source} {class_name!r} is not a diffusers scheduler jaxinf implements; "
                     f"supported: {list(SUPPORTED_CLASSES)}")
  if not isinstance(dtype, str) or dtype not in schedules.TABLE_DTYPES:
    raise ValueError(f"dtype: expected one of {list(schedules.TABLE_DTYPES)}, got {dtype!r}")
  if not isinstance(ignore_keys, (tuple, list)) or not all(isinstance(k, str) for k in ignore_keys):
    raise TypeError(f"ignore_keys: expected a tuple of key names, got {ignore_keys!r}")
  for name, value in (("eta", eta), ("mu", mu)):
    if value is not None and (isinstance(value, bool) or not isinstance(
        value, (int, float, np.integer, np.floating)) or not math.isfinite(value)):
      raise ValueError(f"{name}: expected a finite number or None, got {value!r}")
  if eta is not None and class_name not in ("DDIMScheduler", "TCDScheduler"):
    raise ValueError(f"eta: only DDIMScheduler and TCDScheduler take eta (in diffusers' step()), "
                     f"not {class_name}")
  if (mu is not None or image_seq_len is not None) and class_name != (
      "FlowMatchEulerDiscreteScheduler"):
    raise ValueError(f"{'mu' if mu is not None else 'image_seq_len'}: only "
                     f"FlowMatchEulerDiscreteScheduler (with use_dynamic_shifting) takes it, not "
                     f"{class_name}")

  defaults = DIFFUSERS_DEFAULTS[class_name]
  own = sorted(set(ignore_keys) & set(defaults))
  if own:
    raise ValueError(f"ignore_keys: {own} are {class_name} options, which are mapped or refused, "
                     f"never dropped; remove them from the config to take diffusers' defaults")
  extra = [k for k in config if k not in defaults and k not in IGNORED_KEYS]
  unknown = sorted(k for k in extra if k not in DIFFUSERS_SCHEDULER_KEYS and k not in ignore_keys)
  if unknown:
    raise ValueError(
        f"scheduler_config: {class_name} has no key(s) {unknown} (values "
        f"{[config[k] for k in unknown]!r}), nor has any diffusers {DIFFUSERS_VERSION} scheduler; "
        f"jaxinf refuses keys it does not know rather than drop them: pass ignore_keys= to drop "
        f"them on purpose. {class_name}'s keys: {sorted(defaults)}")
  foreign = sorted(k for k in extra if k not in ignore_keys)
  if foreign:
    warnings.warn(f"scheduler_config: {class_name} does not read {foreign} (keys of other "
                  f"diffusers schedulers; diffusers' from_config drops them too): dropped",
                  UserWarning, stacklevel=2)
  given = {k: v for k, v in config.items() if k in defaults}
  keys = _Keys(class_name, {**defaults, **given})
  handler = _HANDLERS[class_name]
  try:
    result = handler(keys, dtype=dtype, eta=eta, mu=mu, image_seq_len=image_seq_len)
  except (ValueError, TypeError) as e:
    message = str(e)
    if message.startswith(("scheduler_config:", "mu:", "image_seq_len:", "eta:")):
      raise
    # a value jaxinf's own option checks refused (their message names jaxinf's option)
    raise type(e)(f"scheduler_config: {class_name} {message}") from None
  missed = set(keys.values) - keys.seen
  if missed:  # a handler bug: every key must be mapped, ignored with a reason, or refused
    raise RuntimeError(f"from_diffusers: {class_name} handler left keys {sorted(missed)} "
                       f"unaccounted for")
  return dataclasses.replace(result, dropped_keys=tuple(sorted(extra)))


# ------------------------------------------------------------------------------------------------
# One handler per class: every key of DIFFUSERS_DEFAULTS[class] is mapped, ignored or refused.

_VP_PREDICTIONS = schedules.PREDICTION_TYPES
_ONLY_JAXINF = "jaxinf does not implement it"


def _vp_schedule(k: _Keys, dtype: str, zsnr: bool = True) -> schedules.NoiseSchedule:
  k.only("trained_betas", (None,), "jaxinf's NoiseSchedule builds its betas from beta_schedule")
  k.only("beta_schedule", schedules.BETA_SCHEDULES, _ONLY_JAXINF)
  return schedules.NoiseSchedule(
      beta_schedule=k.get("beta_schedule"), num_train_timesteps=k.get("num_train_timesteps"),
      beta_start=k.get("beta_start"), beta_end=k.get("beta_end"),
      rescale_betas_zero_snr=k.get("rescale_betas_zero_snr") if zsnr else False, dtype=dtype)


def _spacing(k: _Keys) -> str:
  return k.only("timestep_spacing", schedules.TIMESTEP_SPACINGS, _ONLY_JAXINF)


def _x0_options(k: _Keys, clip: bool = True) -> dict[str, Any]:
  names = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
  names += ("clip_sample", "clip_sample_range") if clip else ()
  return {name: k.get(name) for name in names}


def _no_sigma_transforms(k: _Keys, *keys: str) -> None:
  for key in keys:
    k.only(key, (False,), _ONLY_JAXINF + " (Karras sigmas are: use_karras_sigmas)")


def _karras_bounds(k: _Keys) -> None:
  """`sigma_min`/`sigma_max` override the Karras grid's ends; without Karras sigmas diffusers does
  not read them."""
  if k.values["use_karras_sigmas"]:
    for key in ("sigma_min", "sigma_max"):
      k.only(key, (None,), "jaxinf's Karras grid spans the schedule's own sigma range")
  else:
    for key in ("sigma_min", "sigma_max"):
      k.ignore(key, "read only by the Karras/exponential/beta sigma conversions, all off")


def _ddpm(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  # fixed_small_log is fixed_small with the standard deviation taken as exp(log(var) / 2), which is
  # how jaxinf computes fixed_small anyway; fixed_large_log takes sqrt(log(beta)) in diffusers
  # 0.42.1 (NaN), and "learned" (an unbounded log variance) is not implemented here.
  variance = k.only("variance_type", ("fixed_small", "fixed_small_log", "fixed_large",
                                      "learned_range"), _ONLY_JAXINF)
  variance = {"fixed_small_log": "fixed_small"}.get(variance, variance)
  solver = solvers.DDPM(variance_type=variance, spacing=_spacing(k),
                        steps_offset=k.get("steps_offset"), **_x0_options(k))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS),
                       variance == "learned_range")


def _ddim(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  solver = solvers.DDIM(eta=0.0 if eta is None else eta, spacing=_spacing(k),
                        steps_offset=k.get("steps_offset"),
                        set_alpha_to_one=k.get("set_alpha_to_one"), **_x0_options(k))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


def _flow_sigma_keys(k: _Keys) -> None:
  """DPM-Solver++ / UniPC's flow-matching mode, refused; its options are then not read."""
  k.only("use_flow_sigmas", (False,), _ONLY_JAXINF + " (use FlowMatchEulerDiscreteScheduler)")
  for key in ("flow_shift", "use_dynamic_shifting", "time_shift_type"):
    k.ignore(key, "read only with use_flow_sigmas=True (diffusers 0.42.1 set_timesteps)")


def _dpm(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  order = k.only("solver_order", (1, 2), "jaxinf's DPM-Solver++ has orders 1 and 2")
  algorithm = k.only("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"), _ONLY_JAXINF)
  _no_sigma_transforms(k, "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
  _flow_sigma_keys(k)
  clip = k.get("lambda_min_clipped")
  if isinstance(clip, bool) or not isinstance(clip, (int, float, np.integer, np.floating)):
    k.refuse("lambda_min_clipped", "expected a number")
  # diffusers drops the training timesteps whose log-SNR/2 lambda = -log(sigma) falls below it;
  # jaxinf's grid always spans every training timestep, so only a value that clips nothing runs
  lam_min = -float(np.max(schedule.log_sigmas))
  if clip > lam_min:
    k.refuse("lambda_min_clipped", f"it clips the schedule's lowest lambda {lam_min:.4g} and "
             f"jaxinf's grid always spans all training timesteps")
  variance = k.only("variance_type", (None, "learned", "learned_range"))
  solver = solvers.DPMSolverPP(
      solver_order=order, algorithm_type=algorithm, solver_type=k.get("solver_type"),
      lower_order_final=k.get("lower_order_final"), euler_at_final=k.get("euler_at_final"),
      use_karras_sigmas=k.get("use_karras_sigmas"),
      final_sigmas_type=k.get("final_sigmas_type"), spacing=_spacing(k),
      steps_offset=k.get("steps_offset"), **_x0_options(k, clip=False))
  # variance_type only makes diffusers drop the model output's variance channels
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS),
                       variance is not None)


def _unipc(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  order = k.only("solver_order", (1, 2), "jaxinf's UniPC has orders 1 and 2")
  k.only("predict_x0", (True,), "jaxinf's UniPC is the data-prediction form")
  if order == 2:
    k.only("lower_order_final", (True,), "jaxinf's UniPC always lowers the order at the last step")
  else:
    k.ignore("lower_order_final", "a first-order solver has no order to lower")
  k.only("solver_p", (None,), "jaxinf's UniPC uses its own predictor (UniP)")
  _no_sigma_transforms(k, "use_exponential_sigmas", "use_beta_sigmas")
  _flow_sigma_keys(k)
  k.only("shift_terminal", (None,), "diffusers allows it only with use_flow_sigmas")
  _karras_bounds(k)
  corrector = k.get("disable_corrector")
  if not isinstance(corrector, (list, tuple)):
    k.refuse("disable_corrector", "expected a list of step indices")
  solver = solvers.UniPC(
      solver_order=order, solver_type=k.get("solver_type"),
      use_karras_sigmas=k.get("use_karras_sigmas"), final_sigmas_type=k.get("final_sigmas_type"),
      disable_corrector=tuple(corrector), spacing=_spacing(k),
      steps_offset=k.get("steps_offset"), **_x0_options(k, clip=False))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


def _euler(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  k.only("interpolation_type", ("linear",), _ONLY_JAXINF)
  k.only("timestep_type", ("discrete",), _ONLY_JAXINF)
  k.only("final_sigmas_type", ("zero",), "jaxinf's Euler always ends at sigma = 0")
  _no_sigma_transforms(k, "use_exponential_sigmas", "use_beta_sigmas")
  _karras_bounds(k)
  solver = solvers.Euler(use_karras_sigmas=k.get("use_karras_sigmas"),
                         spacing=_spacing(k), steps_offset=k.get("steps_offset"))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


def _heun(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype, zsnr=False)
  _no_sigma_transforms(k, "use_exponential_sigmas", "use_beta_sigmas")
  solver = solvers.Heun(use_karras_sigmas=k.get("use_karras_sigmas"),
                        spacing=_spacing(k), steps_offset=k.get("steps_offset"),
                        clip_sample=k.get("clip_sample"),
                        clip_sample_range=k.get("clip_sample_range"))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


def _flow_euler(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  k.only("invert_sigmas", (False,), _ONLY_JAXINF)
  k.only("shift_terminal", (None,), _ONLY_JAXINF)
  _no_sigma_transforms(k, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
  seq_keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
  if k.only("use_dynamic_shifting", (False, True)):
    k.only("time_shift_type", ("exponential",), _ONLY_JAXINF)
    k.ignore("shift", "diffusers does not apply the static shift under use_dynamic_shifting")
    if (mu is None) == (image_seq_len is None):
      raise ValueError("mu: a FlowMatchEulerDiscreteScheduler config with use_dynamic_shifting "
                       "needs exactly one of mu= or image_seq_len= (diffusers' set_timesteps(mu=))")
    if mu is None:
      mu = schedules.dynamic_shift_mu(
          image_seq_len, base_seq_len=k.get("base_image_seq_len"),
          max_seq_len=k.get("max_image_seq_len"), base_shift=k.get("base_shift"),
          max_shift=k.get("max_shift"))
    else:
      for key in seq_keys:
        k.ignore(key, "used only to compute mu from image_seq_len; mu was given")
    schedule = schedules.FlowSchedule(num_train_timesteps=k.get("num_train_timesteps"), mu=mu)
  else:
    if mu is not None or image_seq_len is not None:
      raise ValueError(f"{'mu' if mu is not None else 'image_seq_len'}: the config has "
                       f"use_dynamic_shifting=False, so diffusers takes no mu; leave it None")
    for key in seq_keys + ("time_shift_type",):
      k.ignore(key, "read only under use_dynamic_shifting")
    schedule = schedules.FlowSchedule(num_train_timesteps=k.get("num_train_timesteps"),
                                      shift=k.get("shift"))
  solver = solvers.FlowEuler(stochastic_sampling=k.get("stochastic_sampling"))
  return FromDiffusers(solver, schedule, "flow", False)


def _flow_heun(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = schedules.FlowSchedule(num_train_timesteps=k.get("num_train_timesteps"),
                                    shift=k.get("shift"))
  return FromDiffusers(solvers.FlowHeun(), schedule, "flow", False)


def _lcm(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  for key in ("timestep_spacing", "steps_offset"):
    k.ignore(key, "LCMScheduler.set_timesteps builds its grid from original_inference_steps only")
  solver = solvers.LCM(original_inference_steps=k.get("original_inference_steps"),
                       timestep_scaling=k.get("timestep_scaling"),
                       set_alpha_to_one=k.get("set_alpha_to_one"), **_x0_options(k))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


def _tcd(k: _Keys, *, dtype, eta, mu, image_seq_len) -> FromDiffusers:
  schedule = _vp_schedule(k, dtype)
  for key in ("timestep_spacing", "steps_offset"):
    k.ignore(key, "TCDScheduler.set_timesteps builds its grid from original_inference_steps only")
  for key in ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
              "sample_max_value", "timestep_scaling"):
    k.ignore(key, "TCDScheduler.step (diffusers 0.42.1) neither clips, thresholds nor scales t")
  solver = solvers.TCD(gamma=0.3 if eta is None else eta,
                       original_inference_steps=k.get("original_inference_steps"),
                       set_alpha_to_one=k.get("set_alpha_to_one"))
  return FromDiffusers(solver, schedule, k.only("prediction_type", _VP_PREDICTIONS), False)


_HANDLERS = {
    "DDPMScheduler": _ddpm, "DDIMScheduler": _ddim, "DPMSolverMultistepScheduler": _dpm,
    "UniPCMultistepScheduler": _unipc, "EulerDiscreteScheduler": _euler,
    "HeunDiscreteScheduler": _heun, "FlowMatchEulerDiscreteScheduler": _flow_euler,
    "FlowMatchHeunDiscreteScheduler": _flow_heun, "LCMScheduler": _lcm, "TCDScheduler": _tcd,
}
assert set(_HANDLERS) == set(DIFFUSERS_DEFAULTS)
