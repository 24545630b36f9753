"""Flow matching: the loss of the exact velocity against its closed form, exact resume, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import gaussian_denoiser
from jaxinf.models.dit import dit_config
from jaxinf.train.flow import (FlowTrainConfig, flow_matching_loss, train_flow_dit_on_digits,
                               train_regression)

MU = np.array([0.5, -1.0, 0.2])
COV = np.array([[0.6, 0.2, 0.0], [0.2, 0.3, 0.05], [0.0, 0.05, 0.9]])


def conditional_variance(lam, s):
  """tr Cov(eps - x0 | x_s) per eigen-direction of variance lam, for x_s = (1 - s) x0 + s eps:
  Var(u) - Cov(u, x_s)^2 / Var(x_s) with u = eps - x0, which simplifies to lam / ((1-s)^2 lam + s^2)."""
  return lam / ((1 - s) ** 2 * lam + s**2)


def expected_loss(cfg):
  lam = np.linalg.eigvalsh(COV)
  if cfg.time_sampling == "uniform":
    # int_0^1 lam / ((1+lam) s^2 - 2 lam s + lam) ds = sqrt(lam) (atan(1/sqrt lam) + atan(sqrt lam))
    # = (pi / 2) sqrt(lam)
    return float(np.mean(np.pi / 2 * np.sqrt(lam)))
  # logit-normal: s = sigmoid(m + std n), Gauss-Hermite quadrature over n
  z, w = np.polynomial.hermite_e.hermegauss(200)
  s = 1 / (1 + np.exp(-(cfg.logit_mean + cfg.logit_std * z)))
  per_s = np.mean(conditional_variance(lam[None, :], s[:, None]), axis=1)
  return float(np.sum(w * per_s) / np.sqrt(2 * np.pi))


@pytest.mark.parametrize("cfg", [FlowTrainConfig(), FlowTrainConfig(time_sampling="logit_normal"),
                                 FlowTrainConfig(time_sampling="logit_normal", logit_mean=0.5,
                                                 logit_std=0.7)],
                         ids=["uniform", "logit_normal", "logit_normal_shifted"])
def test_loss_of_the_exact_velocity_is_the_conditional_variance(cfg):
  """With v = E[eps - x0 | x_s] (Gaussian data, closed form) the loss is E_s tr Cov(eps - x0 | x_s)/d."""
  sched = schedules.FlowSchedule()
  den = gaussian_denoiser(MU, COV, sched, "flow")
  n, chunks = 200_000, 50
  x0 = jnp.asarray(np.random.default_rng(0).multivariate_normal(MU, COV, n), jnp.float32)
  keys = jax.random.split(jax.random.key(1), chunks)
  loss = jax.jit(lambda x, k: flow_matching_loss(den.spec.apply, den.params, x, None, k,
                                                 schedule=sched, cfg=cfg))
  losses = np.array([float(loss(x0[i::chunks], k)) for i, k in enumerate(keys)])
  se = losses.std(ddof=1) / np.sqrt(chunks)
  assert abs(losses.mean() - expected_loss(cfg)) < 5 * se


def test_coupled_noise_is_used_as_given():
  """With eps coupled to x0 (reflow) and a model that outputs eps - x0 exactly, the loss is 0."""
  x0 = jax.random.normal(jax.random.key(0), (16, 4))
  eps = jax.random.normal(jax.random.key(1), (16, 4))
  sched = schedules.FlowSchedule()

  def apply(params, x_s, t, y):
    del params, y
    s = (t / sched.num_train_timesteps)[:, None]
    # x_s = x0 + s (eps - x0): recover the straight velocity from the known x0
    return (x_s - x0) / s

  loss = flow_matching_loss(apply, None, x0, None, jax.random.key(2), schedule=sched,
                            cfg=FlowTrainConfig(), eps=eps)
  assert float(loss) < 1e-9


def _small_flow_loss():
  """A per-pixel affine velocity model: the step and the loop are model-agnostic, and a DiT's
  three compiles would dominate this file's runtime."""
  sched = schedules.FlowSchedule()
  cfg = FlowTrainConfig(steps=6, batch_size=8, checkpoint_every=3)
  params = {"w": jnp.full((8, 8, 1), 0.5), "b": jnp.zeros((10, 8, 8, 1))}

  def apply(p, x, t, y):
    return p["w"] * x * (t / 1000.0)[:, None, None, None] + p["b"][y]

  def loss_fn(p, key, ctx, batch, frozen):
    x0, y = batch
    return flow_matching_loss(apply, p, x0, y, key, schedule=sched, cfg=cfg)

  return loss_fn, params, cfg


def test_resume_gives_identical_losses(tmp_path):
  """Stopping after a checkpoint and restarting reproduces the uninterrupted losses bit for bit."""
  loss_fn, params, cfg = _small_flow_loss()
  images, labels = digits.load_digits_images()
  data = (images[:64], labels[:64])
  _, full = train_regression(loss_fn, params, data, cfg=cfg, out_dir=tmp_path / "a",
                             progress=False)
  half = dataclasses.replace(cfg, steps=3)
  train_regression(loss_fn, params, data, cfg=half, out_dir=tmp_path / "b", progress=False)
  _, resumed = train_regression(loss_fn, params, data, cfg=cfg, out_dir=tmp_path / "b",
                                progress=False)
  assert [r["step"] for r in resumed] == list(range(1, 7))
  assert resumed == full
  assert len({r["loss"] for r in full}) == 6  # the steps really differ


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match="time_sampling"):
    FlowTrainConfig(time_sampling="cosine")
  with pytest.raises(ValueError, match="steps"):
    FlowTrainConfig(steps=0)
  with pytest.raises(ValueError, match="model_cfg"):
    train_flow_dit_on_digits(tmp_path, model_cfg=dit_config("DiT-tiny", input_size=16))
  with pytest.raises(ValueError, match="learn_sigma"):
    train_flow_dit_on_digits(tmp_path, model_cfg=dit_config("DiT-tiny", learn_sigma=True))
  with pytest.raises(TypeError, match="schedule"):
    train_flow_dit_on_digits(tmp_path, schedule=schedules.NoiseSchedule())
  with pytest.raises(ValueError, match="arrays"):
    loss_fn, params, cfg = _small_flow_loss()
    train_regression(loss_fn, params, (np.zeros((4, 8, 8, 1)), np.zeros(3, np.int32)), cfg=cfg,
                     out_dir=tmp_path / "x", progress=False)
