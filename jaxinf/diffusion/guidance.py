"""Classifier-free guidance (Ho & Salimans 2022): a denoiser in, a denoiser out.

`out = out_uncond + scale * (out_cond - out_uncond)`; scale 1 is the conditional model, 0 the
unconditional one. The conditional and unconditional passes run as one batched forward of size 2B.
Guidance is applied to the raw model output: x0, eps and v are affine in it with the same x_t, so
guiding any of them is the same. With a learned variance only the prediction half is guided and the
variance half comes from the conditional pass, as in DiT's `forward_with_cfg`.

`guided_channels=k` guides only the first k prediction channels and takes the rest from the
conditional pass. The DiT release's `forward_with_cfg` (and its `sample.py`) guide the first 3 of
the 4 latent channels "for exact reproducibility"; pass `guided_channels=3` to reproduce its
samples. diffusers' `DiTPipeline` guides all `in_channels` latent channels (the default here).

Variants:
- guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
  sample and distribution quality"): guide only while the noise level sigma lies in (lo, hi],
  use the conditional model elsewhere. Noise levels are EDM sigmas, sqrt((1 - abar)/abar) for a VP
  schedule and s/(1 - s) for a flow schedule (both: x_t / scale = x0 + sigma eps), so an interval
  means the same thing whatever the step count or spacing.
- CFG rescale (Lin et al. 2024, Sec. 3.4, eqs. 15-16): rescale the guided output to the standard
  deviation of the conditional one and blend with factor phi, against over-exposure at high scales.
- eDiff-I experts (Balaji et al. 2022): `expert_denoiser` routes each step to the denoiser trained
  for its noise interval (one runs; the others are skipped by `lax.switch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec, FeatureApply


@dataclasses.dataclass(frozen=True)
class _GuidedApply:
  inner: DenoiserSpec
  guided_channels: int | None = None
  noise_level: "NoiseLevel | None" = None  # set when guidance is limited to an interval
  interval: tuple[float, float] | None = None

  def __call__(self, params, x_t, t, cond):
    return self.combine(params, self.inner.apply(params["inner"], *self.batch(x_t, t, cond)), t)

  def batch(self, x_t, t, cond):
    """The conditional and unconditional inputs as one batch of 2B."""
    null = jnp.full_like(cond, self.inner.null_cond)
    return jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([cond, null])

  def combine(self, params, out, t):
    out_c, out_u = jnp.split(out.astype(jnp.float32), 2)
    scale = jnp.broadcast_to(params["scale"], t.shape)
    if self.interval is not None:
      sigma = self.noise_level(t)
      inside = (sigma > self.interval[0]) & (sigma <= self.interval[1])
      scale = jnp.where(inside, scale, 1.0)
    scale = scale.reshape((-1,) + (1,) * (out.ndim - 1))
    c = out.shape[-1] // 2 if self.inner.learned_sigma else out.shape[-1]
    if self.guided_channels is not None:
      c = self.guided_channels
    guided = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
    guided = _rescale(guided, out_c[..., :c], params["rescale"])
    if c == out.shape[-1]:
      return guided
    return jnp.concatenate([guided, out_c[..., c:]], axis=-1)


def _rescale(guided, cond, phi):
  """Lin et al. 2024, eqs. 15-16: phi * guided * std(cond) / std(guided) + (1 - phi) * guided."""
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.maximum(
      jnp.std(guided, axis=axes, keepdims=True), 1e-12)
  return phi * guided * ratio + (1.0 - phi) * guided


@dataclasses.dataclass(frozen=True)
class NoiseLevel:
  """Model time t -> EDM noise level sigma for a schedule: log-sigma interpolated linearly
  between integer timesteps (diffusers' sigma <-> t map); flow: sigma = s / (1 - s), s = t / T."""

  schedule: Any

  def table(self) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(self.schedule, schedules.FlowSchedule):
      n = self.schedule.num_train_timesteps
      s = np.clip(np.arange(n + 1) / n, 1e-6, 1 - 1e-6)
      return np.arange(n + 1, dtype=np.float64), np.log(s / (1 - s))
    sig = self.schedule.sigmas
    return np.arange(len(sig), dtype=np.float64), np.log(sig)

  def range(self) -> tuple[float, float]:
    _, log_sig = self.table()
    return float(np.exp(log_sig.min())), float(np.exp(log_sig.max()))

  def __call__(self, t):
    grid, log_sig = self.table()
    return jnp.exp(jnp.interp(t.astype(jnp.float32), jnp.asarray(grid, jnp.float32),
                              jnp.asarray(log_sig, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class _GuidedWithFeatures:
  guided: _GuidedApply

  def __call__(self, params, x_t, t, cond):
    out, features = self.guided.inner.features.with_features(
        params["inner"], *self.guided.batch(x_t, t, cond))
    return self.guided.combine(params, out, t), features


@dataclasses.dataclass(frozen=True)
class _GuidedFromFeatures:
  guided: _GuidedApply

  def __call__(self, params, x_t, t, cond, features):
    out = self.guided.inner.features.from_features(
        params["inner"], *self.guided.batch(x_t, t, cond), features)
    return self.guided.combine(params, out, t)


def classifier_free_guidance(denoiser: Denoiser, scale, *, guided_channels: int | None = None,
                             rescale: float = 0.0, interval: tuple[float, float] | None = None,
                             schedule=None) -> Denoiser:
  """Wraps a class-conditional denoiser; `scale` and `rescale` stay traced leaves, so sweeping
  them never recompiles. `guided_channels`: guide only the first k prediction channels (None: all).
  `rescale`: CFG-rescale factor phi in [0, 1]. `interval`: (sigma_lo, sigma_hi), guide only there;
  needs the `schedule` (NoiseSchedule or FlowSchedule) that maps t to sigma."""
  if not isinstance(denoiser, Denoiser):
    raise TypeError(f"denoiser: expected a jaxinf Denoiser, got {type(denoiser).__name__}")
  if denoiser.spec.null_cond is None:
    raise ValueError(
        "denoiser: classifier-free guidance needs a null condition; this denoiser has none "
        "(a DiT built with class_dropout_prob = 0)")
  if not isinstance(scale, jax.core.Tracer):
    _check_real("scale", scale)
  if not isinstance(rescale, jax.core.Tracer):
    _check_real("rescale", rescale)
    if not 0.0 <= float(rescale) <= 1.0:
      raise ValueError(f"rescale: expected phi in [0, 1], got {rescale!r}")
  _check_guided_channels(guided_channels, denoiser.spec)
  noise_level = _check_interval(interval, schedule)
  guided = _GuidedApply(denoiser.spec, guided_channels, noise_level,
                        None if interval is None else (float(interval[0]), float(interval[1])))
  features = None
  if denoiser.spec.features is not None:  # the cached features then hold both halves' (2B rows)
    features = FeatureApply(_GuidedWithFeatures(guided), _GuidedFromFeatures(guided))
  spec = dataclasses.replace(denoiser.spec, apply=guided, features=features)
  return Denoiser({"inner": denoiser.params, "scale": jnp.asarray(scale, jnp.float32),
                   "rescale": jnp.asarray(rescale, jnp.float32)}, spec)


def _check_real(name: str, value) -> None:
  """A finite real number (or array of them): bools, strings and complex numbers are refused."""
  dtype = np.asarray(value).dtype if isinstance(value, (int, float, complex, np.number, np.ndarray,
                                                       jax.Array)) else None
  if isinstance(value, bool) or dtype is None or dtype == np.bool_ or not (
      np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    raise TypeError(f"{name}: expected a real number, got {value!r}")
  if not np.isfinite(np.asarray(value)).all():
    raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _check_interval(interval, schedule) -> NoiseLevel | None:
  if interval is None:
    return None
  if not isinstance(schedule, (schedules.NoiseSchedule, schedules.FlowSchedule)):
    raise ValueError("schedule: a guidance interval is given in noise levels and needs the "
                     f"NoiseSchedule or FlowSchedule, got {type(schedule).__name__}")
  if (not isinstance(interval, (tuple, list)) or len(interval) != 2
      or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                 for v in interval)
      or not 0.0 <= interval[0] < interval[1] or not np.isfinite(interval[1])):
    raise ValueError(f"interval: expected (sigma_lo, sigma_hi) with 0 <= lo < hi, got {interval!r}")
  level = NoiseLevel(schedule)
  lo, hi = level.range()
  if interval[1] < lo or interval[0] >= hi:
    raise ValueError(f"interval: {tuple(interval)} lies outside the schedule's noise levels "
                     f"[{lo:.4g}, {hi:.4g}] (EDM sigma); guidance would never apply")
  return level


def _check_guided_channels(guided_channels, spec: DenoiserSpec) -> None:
  if guided_channels is None:
    return
  if isinstance(guided_channels, bool) or not isinstance(guided_channels, (int, np.integer)):
    raise TypeError(f"guided_channels: expected an int or None, got {guided_channels!r}")
  # the prediction has the sample's channel count (the variance half, if any, comes after it)
  hi = spec.sample_shape[-1] if spec.sample_shape is not None else None
  if guided_channels < 1 or (hi is not None and guided_channels > hi):
    raise ValueError(f"guided_channels: expected in [1, {hi if hi is not None else 'C'}] "
                     f"(the prediction's channels), got {guided_channels}")


@dataclasses.dataclass(frozen=True)
class CFG:
  """`guidance=CFG(scale)` for `sample`: classifier-free guidance at a fixed scale;
  `CFG(scale, guided_channels=3)` guides only the first 3 channels as the DiT release does;
  `CFG(scale, rescale=0.7)`; `CFG(scale, interval=(0.28, 5.42), schedule=schedule)`."""

  scale: float
  guided_channels: int | None = None
  rescale: float = 0.0
  interval: tuple[float, float] | None = None
  schedule: Any = None

  def __post_init__(self):
    # refused at construction as well as when applied; pytree unflattening passes placeholders
    # (None, tracers, ...) through __init__, so only concrete numbers and arrays are checked here
    for name in ("scale", "rescale"):
      value = getattr(self, name)
      if isinstance(value, (int, float, complex, str, np.number, np.ndarray, jax.Array)) and (
          not isinstance(value, jax.core.Tracer)):
        _check_real(name, value)
    if self.interval is not None:  # a static (hashed) field: make a list hashable
      if not isinstance(self.interval, (tuple, list)) or not all(
          isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
          for v in self.interval):
        raise ValueError(f"interval: expected (sigma_lo, sigma_hi), got {self.interval!r}")
      object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))

  def __call__(self, denoiser: Denoiser) -> Denoiser:
    return classifier_free_guidance(denoiser, self.scale, guided_channels=self.guided_channels,
                                    rescale=self.rescale, interval=self.interval,
                                    schedule=self.schedule)


jax.tree_util.register_dataclass(CFG, data_fields=["scale", "rescale"],
                                 meta_fields=["guided_channels", "interval", "schedule"])


@dataclasses.dataclass(frozen=True)
class _ExpertApply:
  experts: tuple[DenoiserSpec, ...]
  boundaries: tuple[float, ...]
  noise_level: NoiseLevel

  def __call__(self, params, x_t, t, cond):
    # all rows of a sampling step share t; route on the first row's noise level
    sigma = self.noise_level(t[:1])[0]
    idx = jnp.searchsorted(jnp.asarray(self.boundaries, jnp.float32), sigma, side="left")
    branches = [lambda p, x, tt, c, s=spec, i=i: s.apply(p[i], x, tt, c).astype(jnp.float32)
                for i, spec in enumerate(self.experts)]
    return jax.lax.switch(idx, branches, params, x_t, t, cond)


def expert_denoiser(experts: Sequence[Denoiser], boundaries: Sequence[float], schedule) -> Denoiser:
  """eDiff-I-style ensemble of expert denoisers: `experts[i]` handles noise levels
  sigma in (boundaries[i-1], boundaries[i]] (EDM sigma; boundaries ascending, one fewer than
  experts), so `experts[0]` is the low-noise expert. The experts must agree on what they predict
  and for which shapes and labels."""
  experts = list(experts)
  if len(experts) < 2 or not all(isinstance(e, Denoiser) for e in experts):
    raise ValueError("experts: expected at least two jaxinf Denoisers")
  if not isinstance(boundaries, (list, tuple, np.ndarray)) or not all(
      isinstance(b, (int, float, np.integer, np.floating)) and not isinstance(b, bool)
      and np.isfinite(b) for b in boundaries):
    raise ValueError(f"boundaries: expected a sequence of finite noise levels, got {boundaries!r}")
  boundaries = [float(b) for b in boundaries]
  if len(boundaries) != len(experts) - 1:
    raise ValueError(f"boundaries: expected {len(experts) - 1} noise levels for {len(experts)} "
                     f"experts, got {len(boundaries)}")
  if any(b <= a for a, b in zip(boundaries, boundaries[1:])) or boundaries[0] <= 0:
    raise ValueError(f"boundaries: expected positive, strictly increasing sigmas, got {boundaries}")
  level = _check_interval((0.0, boundaries[-1]), schedule)
  lo, hi = level.range()
  if boundaries[0] < lo or boundaries[-1] > hi:
    raise ValueError(f"boundaries: {boundaries} must lie inside the schedule's noise levels "
                     f"[{lo:.4g}, {hi:.4g}], or some expert never runs")
  first = experts[0].spec
  for i, e in enumerate(experts[1:], 1):
    for field in ("prediction_type", "learned_sigma", "sample_shape", "num_classes", "null_cond"):
      if getattr(e.spec, field) != getattr(first, field):
        raise ValueError(f"experts: expert {i} has {field}={getattr(e.spec, field)!r}, expert 0 "
                         f"{getattr(first, field)!r}")
  spec = dataclasses.replace(first, apply=_ExpertApply(tuple(e.spec for e in experts),
                                                       tuple(boundaries), level), features=None)
  return Denoiser([e.params for e in experts], spec)
