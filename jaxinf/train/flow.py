"""Flow matching / rectified flow: the loss, a regression train step shared by the few-step
methods, and a class-conditional flow DiT on digits.

Rectified flow (Liu et al. 2023, "Flow Straight and Fast", eq. 1) and conditional flow matching
(Lipman et al. 2023, eq. 23 with sigma_min = 0) in the convention of `FlowSchedule` (SD3, Esser et
al. 2024, Sec. 2): x_s = (1 - s) x0 + s eps, s in (0, 1], model time t = s T, and the model
regresses the velocity dx/ds = eps - x0:

    L = E_{s, x0, eps} || v_theta(x_s, s T, y) - (eps - x0) ||^2.

s is drawn uniformly (Liu et al.) or from SD3's logit-normal density (Esser et al. 2024, eq. 19:
s = sigmoid(m + std * n), n ~ N(0, 1)). With independent eps this is flow matching; with eps
*coupled* to x0 by a teacher's ODE it is reflow (`jaxinf.train.distill`), the same loss.

`train_regression(loss_fn, params, arrays, cfg=...)` trains every method here (flow matching,
reflow, InstaFlow/SlimFlow distillation, consistency distillation) with the shared step of
`jaxinf.train.step` inside `jaxinf.train.loop.run_training`: `regression_loss` draws the batch and
the method supplies `loss_fn(params, key, ctx, batch, frozen)`. As in `jaxinf.train.diffusion`, all
randomness of a step is `fold_in(key(seed), step)`, so a resumed run reproduces the uninterrupted
run's losses exactly.

    model_cfg, apply, state, records = train_flow_dit_on_digits("results/flow-digits")
    den = flow_denoiser(model_cfg, apply, state["ema"])  # sample(..., FlowSchedule(), FlowEuler(), ...)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, dit_denoiser
from jaxinf.models.dit import DiT, DiTConfig, dit_config, drop_labels
from jaxinf.models.functional import to_functional
from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_optimizer, check_positive_ints, check_seed,
                               init_train_state, make_train_step)

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class FlowTrainConfig:
  """Settings shared by the few-step trainers (the digits quickstart's values: lr 2e-3 with 50
  warm-up steps, batch 64, EMA 0.995 — see shared/quickstart-budget.md). The optimizer must keep
  an EMA (`optimizer.ema_decay`): it holds the sampling weights and consistency's target network."""

  steps: int = 2500
  batch_size: int = 64
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-3, warmup_steps=50,
                                               weight_decay=0.0, ema_decay=0.995)
  time_sampling: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  seed: int = 0
  checkpoint_every: int = 250

  def __post_init__(self):
    check_positive_ints(self, "steps", "batch_size", "checkpoint_every")
    check_optimizer(self.optimizer, needs_ema=True)
    check_seed(self)
    if self.time_sampling not in TIME_SAMPLINGS:
      raise ValueError(f"time_sampling: expected one of {list(TIME_SAMPLINGS)}, got "
                       f"{self.time_sampling!r}")
    if not 0 < self.logit_std < math.inf:
      raise ValueError(f"logit_std: expected a finite number > 0, got {self.logit_std}")
    if not -math.inf < self.logit_mean < math.inf:
      raise ValueError(f"logit_mean: expected a finite number, got {self.logit_mean}")


def sample_flow_time(key: jax.Array, n: int, cfg: FlowTrainConfig) -> jax.Array:
  """`[n]` noise levels s in (0, 1): uniform, or SD3's logit-normal (Esser et al. 2024, eq. 19)."""
  if cfg.time_sampling == "uniform":
    # (0, 1]: s = 0 is the data itself, where the velocity target carries no information
    return 1.0 - jax.random.uniform(key, (n,))
  return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,)))


def flow_matching_loss(apply: Callable, params, x0: jax.Array, y, key: jax.Array, *,
                       schedule: schedules.FlowSchedule, cfg: FlowTrainConfig,
                       eps: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of || v(x_s, s T, y) - (eps - x0) ||^2 / d (see the module docstring).

  eps: the noise coupled to each x0 (reflow, Liu et al. 2023, Sec. 2.3), or None for independent
  standard-normal noise (flow matching).
  """
  k_s, k_eps = jax.random.split(key)
  s = sample_flow_time(k_s, x0.shape[0], cfg)
  if eps is None:
    eps = jax.random.normal(k_eps, x0.shape)
  sb = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_s = (1.0 - sb) * x0 + sb * eps
  v = apply(params, x_s, s * schedule.num_train_timesteps, y).astype(jnp.float32)
  return jnp.mean(jnp.square(v - (eps - x0)))


# ----------------------------------------------------------------------------------------------
# Regression on a fixed set of arrays.


def regression_loss(loss_fn: Callable, batch_size: int) -> Callable:
  """The loss `(params, key, ctx, arrays, frozen)` of `jaxinf.train.step.make_train_step` that
  draws `batch_size` rows of `arrays` (a tuple with a common leading axis) with replacement and
  returns `loss_fn(params, key, ctx, batch, frozen)`. frozen: a pytree the loss reads but does not
  train (a teacher's weights); ctx: the step's `StepContext` (the EMA: consistency distillation's
  target network; the step: annealed losses)."""

  def loss(params, key, ctx, arrays, frozen):
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, arrays[0].shape[0])
    return loss_fn(params, k_loss, ctx, tuple(a[idx] for a in arrays), frozen)

  return loss


def train_regression(loss_fn: Callable, params, arrays: tuple, *, cfg: FlowTrainConfig,
                     out_dir: str | os.PathLike, frozen: Any = None, progress: bool = True,
                     desc: str = "train") -> tuple[dict[str, Any], list[dict]]:
  """`regression_loss(loss_fn)` trained by the shared step and loop (checkpoints, loss log, exact
  resume). Returns (train state, loss records); `state["ema"]` holds the EMA weights."""
  if not isinstance(cfg, FlowTrainConfig):
    raise TypeError(f"cfg: expected a FlowTrainConfig, got {type(cfg).__name__}")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
  if not isinstance(arrays, (tuple, list)) or not arrays:
    raise TypeError(f"arrays: expected a non-empty tuple of arrays, got {type(arrays).__name__}")
  arrays = tuple(jnp.asarray(a) for a in arrays)
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"arrays: expected a common leading axis, got shapes "
                     f"{[tuple(a.shape) for a in arrays]}")
  step = make_train_step(regression_loss(loss_fn, cfg.batch_size), cfg.optimizer, seed=cfg.seed)
  return run_training(step, init_train_state(params, cfg.optimizer), (arrays, frozen),
                      steps=cfg.steps, out_dir=out_dir, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc=desc)


_NO_DEFAULT = object()


def _plain(value):
  """(the JSON form of `value`, its spec): the spec maps each dataclass field to (the JSON form of
  its default, or _NO_DEFAULT; the field's own spec), so a field added to a config class after a
  run was written can be recognised at its default."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    plain, spec = {}, {}
    for f in dataclasses.fields(value):
      plain[f.name], sub = _plain(getattr(value, f.name))
      if f.default is not dataclasses.MISSING:
        default = _plain(f.default)[0]
      elif f.default_factory is not dataclasses.MISSING:
        default = _plain(f.default_factory())[0]
      else:
        default = _NO_DEFAULT
      spec[f.name] = (default, sub)
    return plain, spec
  if isinstance(value, dict):
    plain, spec = {}, {}
    for k, v in value.items():
      plain[str(k)], sub = _plain(v)
      spec[str(k)] = (_NO_DEFAULT, sub)
    return plain, spec
  return json.loads(json.dumps(value, default=str)), None


def _same_run(stored, new, spec) -> bool:
  """Whether the config written to a folder (`stored`) is the run `new` describes: equal, except
  that a field missing from `stored` may take its default (fields added since)."""
  if not (isinstance(stored, dict) and isinstance(new, dict) and isinstance(spec, dict)):
    return stored == new
  if set(stored) - set(new):
    return False
  for key, value in new.items():
    default, sub = spec.get(key, (_NO_DEFAULT, None))
    if key in stored:
      if not _same_run(stored[key], value, sub):
        return False
    elif default is _NO_DEFAULT or default != value:
      return False
  return True


def claim_out_dir(out_dir: str | os.PathLike, config: dict) -> Path:
  """Creates `out_dir` and writes `config.json`; refuses a folder written with another config
  (resuming it would mix two runs). `config` maps names to dataclass configs (or plain JSON
  values); a field added to a config class since the folder was written counts as the same run
  when it holds its default (so a new option does not orphan every finished run)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "config.json"
  plain, spec = _plain(config)
  if path.exists() and not _same_run(json.loads(path.read_text()), plain, spec):
    raise ValueError(f"out_dir: {out_dir} holds a run with another configuration; use a new folder")
  path.write_text(json.dumps(plain, indent=2))
  return out_dir


def check_digits_model(model_cfg: DiTConfig) -> None:
  if model_cfg.sample_shape != digits.IMAGE_SHAPE or model_cfg.num_classes != digits.NUM_CLASSES:
    raise ValueError(f"model_cfg: a digits DiT needs input 8x8x1 and 10 classes, got "
                     f"{model_cfg.sample_shape} and {model_cfg.num_classes}")
  if model_cfg.learn_sigma:
    raise ValueError("model_cfg: a flow model predicts a velocity only; use learn_sigma=False")


# ----------------------------------------------------------------------------------------------
# Digits.


def train_flow_dit_on_digits(out_dir: str | os.PathLike, *, model_cfg: DiTConfig | None = None,
                             train_cfg: FlowTrainConfig = FlowTrainConfig(),
                             schedule: schedules.FlowSchedule = schedules.FlowSchedule(),
                             progress: bool = True):
  """A class-conditional rectified-flow DiT on digits, with label dropout (the DiT's
  `class_dropout_prob`) for classifier-free guidance. Trains, resumes, or reuses a finished run.

  Returns (model_cfg, apply, state, loss records); `state["ema"]` holds the sampling weights.
  """
  model_cfg = model_cfg or dit_config("DiT-digits")
  check_digits_model(model_cfg)
  if not isinstance(schedule, schedules.FlowSchedule):
    raise TypeError(f"schedule: expected a FlowSchedule, got {type(schedule).__name__}")
  out_dir = claim_out_dir(out_dir, {"model": model_cfg,
                                    "train": train_cfg,
                                    "schedule": schedule, "method": "flow_matching"})
  apply, params = to_functional(DiT(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
  images, labels = digits.load_digits_images()

  def loss_fn(p, key, ctx, batch, frozen):
    del ctx, frozen
    x0, y = batch
    k_drop, k_loss = jax.random.split(key)
    return flow_matching_loss(apply, p, x0, drop_labels(model_cfg, y, k_drop), k_loss,
                              schedule=schedule, cfg=train_cfg)

  state, records = train_regression(loss_fn, params, (images, labels), cfg=train_cfg,
                                    out_dir=out_dir, progress=progress, desc="flow")
  return model_cfg, apply, state, records


def flow_denoiser(model_cfg: DiTConfig, apply: Callable, params) -> Denoiser:
  """The velocity denoiser (prediction type `flow`) of a flow DiT's weights (e.g. `state["ema"]`)."""
  return dit_denoiser(apply, params, model_cfg, prediction_type="flow")
