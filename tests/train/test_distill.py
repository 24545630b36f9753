"""Reflow and one-step distillation against closed forms: the teacher ODE's coupling, straightness,
the reflowed toy flow, the one-step map, SlimFlow's annealing and 2-step target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec, gaussian_denoiser
from jaxinf.diffusion.solvers import FlowEuler, FlowHeun
from jaxinf.train import distill
from jaxinf.train.flow import FlowTrainConfig, flow_matching_loss, train_regression
from jaxinf.train.step import OptimizerConfig, StepContext

SCHED = schedules.FlowSchedule()
MU = np.array([0.5, -1.0])
COV = np.array([[0.6, 0.2], [0.2, 0.3]])


def sqrtm(cov):
  lam, u = np.linalg.eigh(cov)
  return u @ np.diag(np.sqrt(lam)) @ u.T


def test_coupling_is_the_teacher_odes_map():
  """For Gaussian data the rectified-flow ODE is affine and diagonal in Sigma's eigenbasis, so its
  map from s = 1 to 0 is the increasing affine map N(0, I) -> N(mu, Sigma): x = mu + Sigma^1/2 z.
  FlowHeun converges to it (second order: doubling the steps cuts the error ~4x)."""
  den = gaussian_denoiser(MU, COV, SCHED, "flow")
  key = jax.random.key(0)
  errs = []
  for steps in (25, 50):
    z, x = distill.ode_coupling(key, den, SCHED, (512, 2), steps=steps, solver=FlowHeun(),
                                chunk=200)
    errs.append(np.abs(x - (MU + z @ sqrtm(COV))).max())
  assert errs[1] < 2e-3
  assert errs[1] < errs[0] / 3  # converging at second order, not to something else


def straightness_closed_form(lam):
  """Per dimension, x_s = (1-s) mu + r(s) z with r = sqrt((1-s)^2 lam + s^2); the chord slope is
  z - mu - sqrt(lam) z, so S = int_0^1 (r'(s) - 1 + sqrt(lam))^2 ds (E z^2 = 1)."""
  s, w = np.polynomial.legendre.leggauss(400)
  s, w = (s + 1) / 2, w / 2
  r = np.sqrt((1 - s) ** 2 * lam + s**2)
  dr = (s - (1 - s) * lam) / r
  return float(np.sum(w * (dr - 1 + np.sqrt(lam)) ** 2))


def test_straightness_of_the_gaussian_flow_matches_its_closed_form():
  lam = np.linalg.eigvalsh(COV)
  expected = np.mean([straightness_closed_form(l) for l in lam])
  den = gaussian_denoiser(MU, COV, SCHED, "flow")
  z = jax.random.normal(jax.random.key(0), (20_000, 2))
  got = distill.straightness(den, SCHED, z, steps=200)
  # Monte Carlo over z (relative se ~ sqrt(2/20000) = 1%) and O(1/steps) quadrature error
  assert abs(got - expected) < 0.05 * expected
  # a point mass is transported along straight lines: S = 0 up to rounding
  point = gaussian_denoiser(MU, np.zeros((2, 2)), SCHED, "flow")
  assert distill.straightness(point, SCHED, z[:256], steps=20) < 1e-8


class _TwoAtomsFlow:
  """The exact 1-rectified-flow velocity of data on two atoms +-A (independent coupling):
  E[eps - x0 | x_s] with posterior weights over the atoms from N(x_s; (1-s) a, s^2 I)."""

  atoms = jnp.array([[2.0, 0.0], [-2.0, 1.0]])

  def __call__(self, params, x, t, y):
    s = (t / SCHED.num_train_timesteps)[:, None]
    d2 = jnp.sum(jnp.square(x[:, None, :] - (1 - s)[:, None] * self.atoms[None]), -1)
    w = jax.nn.softmax(-d2 / (2 * s**2), axis=-1)
    x0 = w @ self.atoms
    return (x - x0) / s - x0  # eps = (x_s - (1-s) x0) / s; v = eps - x0


def _mlp_apply(p, x, t, y):
  h = jnp.concatenate([x, (t / SCHED.num_train_timesteps)[:, None]], -1)
  h = jax.nn.silu(h @ p["w1"] + p["b1"])
  h = jax.nn.silu(h @ p["w2"] + p["b2"])
  return h @ p["w3"] + p["b3"]


def _mlp_init(key, width=64):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w1": jax.random.normal(k1, (3, width)) / np.sqrt(3), "b1": jnp.zeros(width),
          "w2": jax.random.normal(k2, (width, width)) / np.sqrt(width), "b2": jnp.zeros(width),
          "w3": jax.random.normal(k3, (width, 2)) * 0.01, "b3": jnp.zeros(2)}


def test_reflow_straightens_a_toy_flow(tmp_path):
  """Reflow on the exact 1-RF's coupling of a two-atom distribution gives a much straighter flow
  (Liu et al. 2023, Sec. 2.3: the straightness of a reflowed flow is no larger, and in practice far
  smaller), and its one-step samples land near the atoms where the 1-RF's do not."""
  teacher = Denoiser(None, DenoiserSpec(apply=_TwoAtomsFlow(), prediction_type="flow"))
  z, x = distill.ode_coupling(jax.random.key(0), teacher, SCHED, (4096, 2), steps=50,
                              solver=FlowHeun(), chunk=4096)
  cfg = FlowTrainConfig(steps=600, batch_size=256, checkpoint_every=600,
                        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=50,
                                                  weight_decay=0.0, ema_decay=0.9))
  state, _ = train_regression(distill.reflow_loss(_mlp_apply, schedule=SCHED, cfg=cfg),
                              _mlp_init(jax.random.key(1)), (z, x, np.zeros(len(z), np.int32)),
                              cfg=cfg, out_dir=tmp_path, progress=False)
  student = Denoiser(state["params"], DenoiserSpec(apply=_mlp_apply, prediction_type="flow"))
  probe = jax.random.normal(jax.random.key(2), (2048, 2))
  s1 = distill.straightness(teacher, SCHED, probe, steps=50)
  s2 = distill.straightness(student, SCHED, probe, steps=50)
  assert s2 < 0.25 * s1, (s1, s2)


def test_one_step_distillation_recovers_the_ode_map(tmp_path):
  """InstaFlow's regression with an affine velocity model v(z) = W z + b on the Gaussian teacher's
  coupling: the least-squares one-step map z - v(z) is the ODE map mu + Sigma^1/2 z."""
  den = gaussian_denoiser(MU, COV, SCHED, "flow")
  z, x = distill.ode_coupling(jax.random.key(0), den, SCHED, (4096, 2), steps=50,
                              solver=FlowHeun(), chunk=4096)
  apply = lambda p, x_, t, y: x_ @ p["w"] + p["b"]
  cfg = FlowTrainConfig(steps=400, batch_size=256, checkpoint_every=400,
                        optimizer=OptimizerConfig(learning_rate=2e-2, warmup_steps=10,
                                                  weight_decay=0.0, ema_decay=0.0))
  state, rec = train_regression(distill.one_step_loss(apply, schedule=SCHED),
                                {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, (z, x, z[:, 0]),
                                cfg=cfg, out_dir=tmp_path, progress=False)
  p = state["params"]
  # z - (W^T z + b) with row vectors: the map's matrix is I - W, its offset -b
  np.testing.assert_allclose(np.eye(2) - p["w"], sqrtm(COV), atol=0.02)
  np.testing.assert_allclose(-p["b"], MU, atol=0.02)


def test_two_step_euler_is_exact_on_straight_flows():
  """A point mass is transported along straight lines, so the 2-step Euler target of flow-guided
  distillation lands exactly on it."""
  point = gaussian_denoiser(MU, np.zeros((2, 2)), SCHED, "flow")
  z = jax.random.normal(jax.random.key(0), (64, 2))
  x = distill.two_step_euler(point.spec.apply, point.params, z, None, SCHED)
  np.testing.assert_allclose(x, np.broadcast_to(MU, x.shape), atol=1e-5)


def test_annealing_reflow_ends():
  """beta = 1 at step 0: the coupled noise is ignored (flow matching on the teacher's samples);
  beta = 0 from anneal_steps on: exactly the reflow loss on the coupled noise."""
  apply = lambda p, x, t, y: x * p + (t / 1000.0)[:, None]
  cfg = FlowTrainConfig()
  loss = distill.annealing_reflow_loss(apply, schedule=SCHED, cfg=cfg, anneal_steps=100)
  kz, kx, key = jax.random.split(jax.random.key(0), 3)
  z, x = jax.random.normal(kz, (32, 2)), jax.random.normal(kx, (32, 2))
  at = lambda step, zz: float(loss(0.3, key, StepContext(None, jnp.int32(step)), (zz, x, None),
                                   None))
  assert at(0, z) == at(0, -3.0 * z)
  expected = flow_matching_loss(apply, 0.3, x, None, jax.random.split(key)[1], schedule=SCHED,
                                cfg=cfg, eps=z)
  assert at(100, z) == pytest.approx(float(expected), rel=1e-6)
  np.testing.assert_allclose(distill.annealing_beta(jnp.array([0, 50, 100, 200]), 100),
                             [1.0, 0.5, 0.0, 0.0])


def test_bad_input():
  den = gaussian_denoiser(MU, COV, schedules.NoiseSchedule(), "epsilon")
  with pytest.raises(ValueError, match="denoiser"):
    distill.ode_coupling(jax.random.key(0), den, SCHED, (4, 2), steps=4)
  flow = gaussian_denoiser(MU, COV, SCHED, "flow")
  with pytest.raises(TypeError, match="schedule"):
    distill.straightness(flow, schedules.NoiseSchedule(), jnp.zeros((4, 2)), steps=4)
  with pytest.raises(ValueError, match="solver"):
    distill.ode_coupling(jax.random.key(0), flow, SCHED, (4, 2), steps=4,
                         solver=FlowEuler(stochastic_sampling=True))
  with pytest.raises(ValueError, match="anneal_steps"):
    distill.annealing_reflow_loss(None, schedule=SCHED, cfg=FlowTrainConfig(), anneal_steps=0)
  with pytest.raises(ValueError, match="pairs"):
    distill.CouplingConfig(pairs=0)
