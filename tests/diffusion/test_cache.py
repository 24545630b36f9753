"""Feature caching: the segmented loop against its masked twin and against the uncached sampler;
schedules; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import cache as fc
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser, dit_feature_apply
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import sample

SHAPE = (4, 8, 8, 1)
STEPS = 10


@pytest.fixture(scope="module")
def den(random_dit):
  cfg, model, apply, params = random_dit()
  return dit_denoiser(apply, params, cfg, prediction_type="v_prediction",
                      features=dit_feature_apply(model))


COND = jnp.array([0, 1, 2, 3])
SCHED = schedules.NoiseSchedule()
SOLVER = solvers.DDIM(spacing="trailing")


def test_all_refresh_equals_the_uncached_sampler(den):
  full = sample(jax.random.key(0), den, SCHED, SOLVER, SHAPE, steps=STEPS, cond=COND,
                guidance=CFG(2.0))
  cached = sample(jax.random.key(0), den, SCHED, SOLVER, SHAPE, steps=STEPS, cond=COND,
                  guidance=CFG(2.0), cache=fc.fixed_interval(STEPS, 1))
  np.testing.assert_allclose(cached, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interval", [2, 3])
def test_segmented_loop_equals_masked_twin(den, interval):
  cache = fc.fixed_interval(STEPS, interval)
  fast = sample(jax.random.key(0), den, SCHED, solvers.DDIM(eta=0.5), SHAPE, steps=STEPS,
                cond=COND, guidance=CFG(2.0), cache=cache)
  slow = fc.sample_masked(jax.random.key(0), den, SCHED, solvers.DDIM(eta=0.5), SHAPE,
                          steps=STEPS, flags=np.array(cache.refresh), cond=COND, guidance=CFG(2.0))
  np.testing.assert_allclose(fast, slow, atol=1e-6, rtol=1e-6)
  full = sample(jax.random.key(0), den, SCHED, solvers.DDIM(eta=0.5), SHAPE, steps=STEPS,
                cond=COND, guidance=CFG(2.0))
  assert float(jnp.abs(fast - full).max()) > 1e-4  # caching did change something


def test_cached_steps_skip_attention_and_mlp(den):
  """At a cached step the output equals the full forward with the cached features, and differs
  from it when the features are stale — so the attention/MLP really are not recomputed."""
  fa = den.spec.features
  x = jax.random.normal(jax.random.key(2), SHAPE)
  t = jnp.full((4,), 500.0)
  out, feats = fa.with_features(den.params, x, t, COND)
  np.testing.assert_allclose(fa.from_features(den.params, x, t, COND, feats), out, atol=1e-5)
  np.testing.assert_allclose(out, den(x, t, COND), atol=1e-6)
  other = fa.from_features(den.params, x, t, COND, feats * 0.5)
  assert float(jnp.abs(other - out).max()) > 1e-4


def test_step_rehash_refreshes_where_features_change():
  changes = np.array([np.inf, 0.1, 0.1, 0.1, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1])
  cache = fc.step_rehash(changes, 3)
  assert cache.num_refresh == 3 and cache.refresh[0] and cache.refresh[4]


def test_learned_schedule_beats_fixed_interval_on_its_calibration_batch(den):
  kw = dict(steps=STEPS, cond=COND, guidance=CFG(2.0))
  learned, path = fc.learn_schedule(jax.random.key(0), den, SCHED, SOLVER, SHAPE, num_refresh=5,
                                    **kw)
  assert learned.num_refresh == 5 and [n for n, _ in path] == list(range(10, 4, -1))
  ref = sample(jax.random.key(0), den, SCHED, SOLVER, SHAPE, **kw)
  err = lambda c: float(jnp.mean(jnp.square(
      sample(jax.random.key(0), den, SCHED, SOLVER, SHAPE, cache=c, **kw) - ref)))
  assert err(learned) <= err(fc.fixed_interval(STEPS, 2)) + 1e-12
  changes = fc.feature_changes(jax.random.key(0), den, SCHED, SOLVER, SHAPE, **kw)
  assert changes.shape == (STEPS,) and np.isinf(changes[0]) and (changes[1:] > 0).all()


class TestBadInput:
  def test_schedule_length(self, den):
    with pytest.raises(ValueError, match="cache"):
      sample(jax.random.key(0), den, SCHED, SOLVER, SHAPE, steps=STEPS, cond=COND,
             cache=fc.fixed_interval(STEPS + 1, 2))

  def test_first_row_must_refresh(self):
    with pytest.raises(ValueError, match="refresh"):
      fc.FeatureCache((False, True))

  def test_denoiser_without_hooks(self, den):
    import dataclasses
    plain = dataclasses.replace(den, spec=dataclasses.replace(den.spec, features=None))
    with pytest.raises(ValueError, match="feature hooks"):
      sample(jax.random.key(0), plain, SCHED, SOLVER, SHAPE, steps=STEPS, cond=COND,
             cache=fc.fixed_interval(STEPS, 2))

  @pytest.mark.parametrize("make,match", [
      (lambda: fc.fixed_interval(10, 0), "interval"),
      (lambda: fc.step_rehash(np.ones(5), 6), "num_refresh")])
  def test_options(self, make, match):
    with pytest.raises(ValueError, match=match):
      make()


def test_learning_in_few_rounds_reaches_the_budget(den):
  kw = dict(steps=STEPS, cond=COND, guidance=CFG(2.0))
  learned, path = fc.learn_schedule(jax.random.key(0), den, SCHED, SOLVER, SHAPE, num_refresh=4,
                                    rounds=2, **kw)
  assert learned.num_refresh == 4 and [n for n, _ in path] == [10, 7, 4]
  with pytest.raises(ValueError, match="rounds"):
    fc.learn_schedule(jax.random.key(0), den, SCHED, SOLVER, SHAPE, num_refresh=4, rounds=0, **kw)
