"""Training a denoiser: the diffusion loss for each prediction type, AdamW, EMA, exact resume.

Loss (Ho et al. 2020, eq. 14, "simple"): t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, MSE between the model output and the target of its
prediction type (eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0). With a learned variance the
hybrid loss of improved DDPM (Nichol & Dhariwal 2021, Sec. 3.1) adds L_vlb, with the mean held
fixed (stop-gradient) so that L_vlb trains only the variance, as DiT does.

Everything a step needs is derived from (seed, step): the batch indices, the timesteps, the noise
and the label dropout come from `fold_in(key, step)`. A run resumed from a checkpoint at step k
therefore produces exactly the losses an uninterrupted run produces after step k. The optimizer,
the update and the EMA are those of `jaxinf.train.step`; this module supplies the loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.diffusion import schedules
from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_apply_params, check_optimizer,
                               check_positive_ints, check_seed, init_train_state, make_train_step)


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig:
  """Sampling reads the EMA weights, so the optimizer must keep one (`optimizer.ema_decay`)."""

  steps: int = 1500
  batch_size: int = 64
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-3, warmup_steps=50,
                                               weight_decay=0.0, ema_decay=0.995)
  prediction_type: str = "epsilon"
  seed: int = 0
  checkpoint_every: int = 250

  def __post_init__(self):
    check_positive_ints(self, "steps", "batch_size", "checkpoint_every")
    check_optimizer(self.optimizer, needs_ema=True)
    check_seed(self)
    schedules.check_prediction_type(self.prediction_type)


def _normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_nll(x, mean, log_scale):
  """-log p(x) for data on 256 bins in [-1, 1] (Ho et al. 2020, eq. 13), elementwise, in nats."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_probs = jnp.where(
      x < -0.999, log_cdf_plus,
      jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))))
  return -log_probs


def vlb_terms(schedule: schedules.NoiseSchedule, x0, x_t, t, x0_pred, var_values):
  """Per-sample L_vlb term (bits/dim) of improved DDPM with the learned-range variance.

  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL at t = 0.
  `x0_pred` should be stop-gradient'ed by the caller so the term trains only the variance.
  """
  # tables in float64 first: 1 - abar loses most of its digits in fp32 when abar is near 1
  abar = schedule.alphas_cumprod
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = schedule.betas
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # log of the posterior variance with the t = 0 entry (zero) replaced by the t = 1 entry
  post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  table = lambda v: jnp.asarray(v, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
  c0 = table(np.sqrt(abar_prev) * betas / (1.0 - abar))
  ct = table(np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar))
  min_log, max_log = table(post_log_var), table(np.log(betas))
  true_mean = c0 * x0 + ct * x_t
  model_mean = c0 * x0_pred + ct * x_t
  frac = (var_values + 1.0) / 2.0
  model_log_var = frac * max_log + (1.0 - frac) * min_log
  kl = _normal_kl(true_mean, min_log, model_mean, model_log_var)
  nll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var)
  axes = tuple(range(1, x0.ndim))
  per_sample = jnp.where(t == 0, nll.mean(axes), kl.mean(axes))
  return per_sample / math.log(2.0)


def diffusion_loss(apply: Callable, params, x0, y, key, *, schedule: schedules.NoiseSchedule,
                   prediction_type: str, learned_sigma: bool):
  """Mean loss over the batch for `apply(params, x_t, t, y)`; see the module docstring."""
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
  eps = jax.random.normal(k_eps, x0.shape)
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = schedules.add_noise(x0, eps, abar)
  out = apply(params, x_t, t.astype(jnp.float32), y)
  c = x0.shape[-1]
  pred = out[..., :c]
  target = schedules.training_target(x0, eps, abar, prediction_type)
  loss = jnp.mean(jnp.square(pred - target))
  if learned_sigma:
    x0_pred, _ = schedules.predict_x0_eps(jax.lax.stop_gradient(pred), x_t, abar, prediction_type)
    loss = loss + jnp.mean(vlb_terms(schedule, x0, x_t, t, x0_pred, out[..., c:]))
  return loss


def diffusion_train_loss(apply: Callable, cfg: DiffusionTrainConfig,
                         schedule: schedules.NoiseSchedule, *, learned_sigma: bool,
                         drop_labels: Callable | None = None) -> Callable:
  """The loss `loss_fn(params, key, ctx, images, labels)` of `jaxinf.train.step.make_train_step`:
  a batch of `cfg.batch_size` rows drawn with replacement, labels dropped by `drop_labels(y, key)`
  (classifier-free guidance), then `diffusion_loss`."""

  def loss_fn(params, key, ctx, images, labels):
    del ctx
    k_idx, k_drop, k_loss = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
    x0, y = images[idx], labels[idx]
    if drop_labels is not None:
      y = drop_labels(y, k_drop)
    return diffusion_loss(apply, params, x0, y, k_loss, schedule=schedule,
                          prediction_type=cfg.prediction_type, learned_sigma=learned_sigma)

  return loss_fn


def train_diffusion(apply: Callable, params, images, labels, *, cfg: DiffusionTrainConfig,
                    schedule: schedules.NoiseSchedule, out_dir: str | os.PathLike,
                    learned_sigma: bool = False, drop_labels: Callable | None = None,
                    progress: bool = True) -> tuple[dict[str, Any], list[dict]]:
  """Trains for `cfg.steps` steps, checkpointing to `out_dir/checkpoints` and appending
  `{"step", "loss"}` to `out_dir/losses.jsonl`; resumes from the latest checkpoint if any.

  Returns (final train state, the loss records of the whole run, resumed parts included).
  """
  if not isinstance(cfg, DiffusionTrainConfig):
    raise TypeError(f"cfg: expected a DiffusionTrainConfig, got {type(cfg).__name__}")
  check_apply_params(apply, params)
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"labels: expected {images.shape[0]} labels for the images, got {labels.shape}")
  loss_fn = diffusion_train_loss(apply, cfg, schedule, learned_sigma=learned_sigma,
                                 drop_labels=drop_labels)
  return run_training(make_train_step(loss_fn, cfg.optimizer, seed=cfg.seed),
                      init_train_state(params, cfg.optimizer), (images, labels), steps=cfg.steps,
                      out_dir=out_dir, checkpoint_every=cfg.checkpoint_every, progress=progress)
