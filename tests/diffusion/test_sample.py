"""The lax.scan driver against a plain Python loop over the same step rule, guidance, and the
checks that run before tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser, gaussian_denoiser
from jaxinf.diffusion.guidance import CFG, classifier_free_guidance
from jaxinf.diffusion.reverse import denoise_step, step_noise
from jaxinf.diffusion.sample import sample
from jaxinf.models.dit import DiT, dit_config
from jaxinf.models.functional import to_functional


@pytest.fixture(scope="module")
def tiny_dit(random_dit):
  cfg, _, apply, params = random_dit(learn_sigma=True)
  return cfg, apply, params


def python_loop(key, denoiser, schedule, solver, shape, steps, cond):
  """The same step rule in a plain Python loop: the slow twin of `sample`.

  Each step is jitted on its own (an op-by-op eager forward rounds differently from any compiled
  one, by about 1e-7 relative per step, which the random DiT amplifies over the steps).
  """
  table = solver.table(schedule, steps)
  step = jax.jit(denoise_step, static_argnums=(1,))
  init_key, loop_key = jax.random.split(key)
  x = jax.random.normal(init_key, shape)
  state = solver.init_state(x)
  for i in range(steps):
    c = {k: jnp.asarray(v[i]) for k, v in table.items()}
    x, state = step(denoiser, solver, x, c, cond, step_noise(loop_key, i, solver, shape), state)
  return x


@pytest.mark.parametrize("solver", [solvers.DDPM("learned_range", spacing="trailing"),
                                    solvers.DDIM(eta=0.7), solvers.DDIM()],
                         ids=["ddpm-learned_range", "ddim-eta0.7", "ddim"])
def test_scan_equals_python_loop(tiny_dit, solver):
  cfg, apply, params = tiny_dit
  den = classifier_free_guidance(dit_denoiser(apply, params, cfg, prediction_type="v_prediction"),
                                 2.5)
  sched = schedules.NoiseSchedule("squaredcos_cap_v2")
  y = jnp.array([0, 3, 9, 10])  # 10 is the null class
  shape = (4, 8, 8, 1)
  key = jax.random.key(7)
  fast = sample(key, den, sched, solver, shape, steps=12, cond=y)
  slow = python_loop(key, den, sched, solver, shape, 12, y)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-6, rtol=1e-6)
  again = sample(key, den, sched, solver, shape, steps=12, cond=y)
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(again))  # same key, same samples
  other = sample(jax.random.key(8), den, sched, solver, shape, steps=12, cond=y)
  assert np.abs(np.asarray(other) - np.asarray(fast)).max() > 1e-2


def test_cfg_is_one_batched_forward_of_cond_and_null(tiny_dit):
  cfg, apply, params = tiny_dit
  den = dit_denoiser(apply, params, cfg)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t = jnp.array([10.0, 500.0, 990.0])
  y = jnp.array([1, 2, 3])
  out_c = den(x, t, y)
  out_u = den(x, t, jnp.full((3,), cfg.null_class))
  guided = classifier_free_guidance(den, 4.0)(x, t, y)
  c = cfg.in_channels
  np.testing.assert_allclose(guided[..., :c],
                             out_u[..., :c] + 4.0 * (out_c[..., :c] - out_u[..., :c]),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(guided[..., c:], out_c[..., c:], atol=1e-6)
  # scale 1 is the conditional model
  np.testing.assert_allclose(classifier_free_guidance(den, 1.0)(x, t, y), out_c, atol=1e-5)


def test_guidance_scale_does_not_recompile(tiny_dit):
  cfg, apply, params = tiny_dit
  den = dit_denoiser(apply, params, cfg)
  sched = schedules.NoiseSchedule()
  kw = dict(steps=3, cond=jnp.array([1, 2]))
  sample(jax.random.key(0), den, sched, solvers.DDIM(), (2, 8, 8, 1), guidance=CFG(1.5), **kw)
  from jaxinf.diffusion import sample as sample_module
  before = sample_module._scan._cache_size()
  sample(jax.random.key(0), den, sched, solvers.DDIM(), (2, 8, 8, 1), guidance=CFG(3.0), **kw)
  assert sample_module._scan._cache_size() == before


@pytest.fixture(scope="module")
def den():
  cfg = dit_config("DiT-tiny")  # no learned sigma
  apply, params = to_functional(DiT(cfg, rngs=nnx.Rngs(0)))
  return dit_denoiser(apply, params, cfg)


class TestBadInput:

  def call(self, den, **kw):
    args = dict(key=jax.random.key(0), denoiser=den, schedule=schedules.NoiseSchedule(),
                solver=solvers.DDIM(), shape=(2, 8, 8, 1), steps=4, cond=jnp.array([0, 1]))
    args.update(kw)
    return sample(**args)

  @pytest.mark.parametrize("kw,match", [
      (dict(shape=(2, 16, 16, 1)), "shape"),
      (dict(shape=(2, 8, 8, 3)), "shape"),
      (dict(cond=jnp.array([0, 11])), "cond"),
      (dict(cond=jnp.array([-1, 0])), "cond"),
      (dict(cond=jnp.array([0, 1, 2])), "cond"),
      (dict(cond=None), "cond"),
      (dict(steps=0), "steps"),
      (dict(steps=1001), "steps"),
      (dict(solver=solvers.DDPM("learned_range")), "learned_range"),
      (dict(x_init=jnp.zeros((3, 8, 8, 1))), "x_init"),
      # CFG(nan) itself is refused at construction (tests/diffusion/test_bad_input.py)
      (dict(guidance=lambda d: classifier_free_guidance(d, float("nan"))), "scale"),
  ])
  def test_raises_value_error_naming_argument(self, den, kw, match):
    with pytest.raises(ValueError, match=match):
      self.call(den, **kw)

  def test_float_labels_are_a_type_error(self, den):
    with pytest.raises(TypeError, match="cond"):
      self.call(den, cond=jnp.array([0.0, 1.0]))

  def test_checks_run_before_tracing(self, den, monkeypatch):
    from jaxinf.diffusion import sample as sample_module

    def boom(*a, **k):
      raise AssertionError("traced before validating")

    monkeypatch.setattr(sample_module, "_scan", boom)
    with pytest.raises(ValueError, match="cond"):
      self.call(den, cond=jnp.array([0, 42]))

  @pytest.mark.parametrize("make,match", [
      (lambda: schedules.NoiseSchedule("cosine"), "beta_schedule"),
      (lambda: solvers.DDIM(spacing="uniform"), "spacing"),
      (lambda: solvers.DDPM(variance_type="learned"), "variance_type"),
      (lambda: solvers.DDIM(eta=-0.1), "eta"),
      (lambda: solvers.make_solver("euler_a"), "name"),
      (lambda: solvers.make_solver("ddim", etaa=1.0), "etaa"),
      (lambda: schedules.predict_x0_eps(jnp.zeros(2), jnp.zeros(2), 0.5, "eps"), "prediction_type"),
      (lambda: gaussian_denoiser(np.zeros(2), np.eye(2), schedules.NoiseSchedule(), "x0"),
       "prediction_type"),
  ])
  def test_unknown_options(self, make, match):
    with pytest.raises(ValueError, match=match):
      make()

  def test_eta_beyond_the_schedule_is_refused(self):
    with pytest.raises(ValueError, match="eta"):
      solvers.DDIM(eta=5.0).table(schedules.NoiseSchedule(), 10)

  def test_guidance_needs_a_null_class(self, tiny_dit):
    cfg = dit_config("DiT-tiny", class_dropout_prob=0.0)
    apply, params = to_functional(DiT(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="null"):
      classifier_free_guidance(dit_denoiser(apply, params, cfg), 2.0)
