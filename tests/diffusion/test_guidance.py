"""Guidance variants against their definitions: interval by noise level, CFG rescale, experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.diffusion.guidance import (CFG, NoiseLevel, classifier_free_guidance,
                                       expert_denoiser)
from jaxinf.diffusion.sample import sample

SCHED = schedules.NoiseSchedule()


@pytest.fixture(scope="module")
def random_den(random_dit):
  """`random_den(seed)`: the random DiT-tiny of `random_dit(seed)` as a denoiser."""

  def make(seed):
    cfg, _, apply, params = random_dit(seed)
    return dit_denoiser(apply, params, cfg)

  return make


@pytest.fixture(scope="module")
def den(random_den):
  return random_den(1)


X = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
Y = jnp.array([1, 2, 3])


def test_noise_level_is_edm_sigma():
  level = NoiseLevel(SCHED)
  t = jnp.array([0.0, 10.0, 999.0, 500.5])
  abar = SCHED.alphas_cumprod
  exact = np.sqrt((1 - abar) / abar)
  got = np.asarray(level(t))
  np.testing.assert_allclose(got[:3], exact[[0, 10, 999]], rtol=1e-5)
  np.testing.assert_allclose(got[3], np.sqrt(exact[500] * exact[501]), rtol=1e-5)  # log-linear
  flow = NoiseLevel(schedules.FlowSchedule())
  np.testing.assert_allclose(flow(jnp.array([250.0])), 0.25 / 0.75, rtol=1e-5)


def test_interval_guides_inside_and_is_conditional_outside(den):
  level = NoiseLevel(SCHED)
  t = jnp.array([50.0, 500.0, 950.0])
  sig = np.asarray(level(t))
  interval = (float(sig[0]) * 1.01, float(sig[1]) * 1.01)  # contains only t = 500
  g = classifier_free_guidance(den, 3.0, interval=interval, schedule=SCHED)(X, t, Y)
  plain = classifier_free_guidance(den, 3.0)(X, t, Y)
  cond = den(X, t, Y)
  np.testing.assert_allclose(g[1], plain[1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(g)[[0, 2]], np.asarray(cond)[[0, 2]], atol=1e-5)
  assert float(jnp.abs(plain[0] - cond[0]).max()) > 1e-4


def test_rescale_matches_its_formula(den):
  t = jnp.array([100.0, 400.0, 800.0])
  cond = np.asarray(den(X, t, Y), np.float64)
  plain = np.asarray(classifier_free_guidance(den, 5.0)(X, t, Y), np.float64)
  np.testing.assert_allclose(classifier_free_guidance(den, 5.0, rescale=0.0)(X, t, Y), plain,
                             atol=1e-6)
  full = np.asarray(classifier_free_guidance(den, 5.0, rescale=1.0)(X, t, Y), np.float64)
  np.testing.assert_allclose(full.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-4)
  half = np.asarray(classifier_free_guidance(den, 5.0, rescale=0.5)(X, t, Y), np.float64)
  np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)


def test_experts_route_by_noise_level(random_den):
  low, high = random_den(1), random_den(2)
  b = float(NoiseLevel(SCHED)(jnp.array([300.0]))[0])
  ens = expert_denoiser([low, high], [b], SCHED)
  for tv, which in ((100.0, low), (300.0, low), (301.0, high), (900.0, high)):
    t = jnp.full((3,), tv)
    np.testing.assert_allclose(ens(X, t, Y), which(X, t, Y), atol=1e-6)
  # inside the sampler and under guidance
  x = sample(jax.random.key(0), ens, SCHED, solvers.DDIM(), (3, 8, 8, 1), steps=4, cond=Y,
             guidance=CFG(2.0))
  assert np.isfinite(np.asarray(x)).all()


class TestBadInput:
  @pytest.mark.parametrize("kw,match", [
      (dict(interval=(0.1, 1.0)), "schedule"),
      (dict(interval=(2.0, 1.0), schedule=SCHED), "interval"),
      (dict(interval=(500.0, 900.0), schedule=SCHED), "outside"),
      (dict(rescale=1.5), "rescale")])
  def test_cfg_options(self, den, kw, match):
    with pytest.raises(ValueError, match=match):
      classifier_free_guidance(den, 2.0, **kw)

  def test_interval_checked_before_tracing_in_sample(self, den):
    with pytest.raises(ValueError, match="outside"):
      sample(jax.random.key(0), den, SCHED, solvers.DDIM(), (3, 8, 8, 1), steps=4, cond=Y,
             guidance=CFG(2.0, interval=(1e-6, 1e-5), schedule=SCHED))

  def test_experts(self, den):
    with pytest.raises(ValueError, match="boundaries"):
      expert_denoiser([den, den], [1.0, 2.0], SCHED)
    with pytest.raises(ValueError, match="boundaries"):
      expert_denoiser([den, den, den], [2.0, 1.0], SCHED)
    with pytest.raises(ValueError, match="boundaries"):
      expert_denoiser([den, den], [1e4], SCHED)
    import dataclasses
    other = dataclasses.replace(den, spec=dataclasses.replace(den.spec, prediction_type="sample"))
    with pytest.raises(ValueError, match="prediction_type"):
      expert_denoiser([den, other], [1.0], SCHED)
