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

`make_regression_step(loss_fn, cfg)` is the one jitted AdamW + EMA step that every method here
(flow matching, reflow, InstaFlow/SlimFlow distillation, consistency distillation) runs inside
`jaxinf.train.loop.run_training`. As in `jaxinf.train.diffusion`, all randomness of a step is
`fold_in(key(seed), step)`, so a resumed run reproduces the uninterrupted run's losses exactly.

    model_cfg, apply, state, records = train_flow_dit_on_digits("results/flow-digits")
    den = flow_denoiser(model_cfg, apply, state["ema"])  # sample(..., FlowSchedule(), FlowEuler(), ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, dit_denoiser
from jaxinf.models.dit import DiT, DiTConfig, dit_config, drop_labels
from jaxinf.models.functional import to_functional
from jaxinf.train.loop import adamw_with_warmup, run_training

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class FlowTrainConfig:
  """Optimisation settings shared by the few-step trainers (the digits quickstart's values:
  lr 2e-3 with 50 warm-up steps, batch 64, EMA 0.995 — see shared/quickstart-budget.md)."""

  steps: int = 2500
  batch_size: int = 64
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 0.0
  ema_decay: float = 0.995
  grad_clip: float = 1.0
  time_sampling: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  seed: int = 0
  checkpoint_every: int = 250

  def __post_init__(self):
    for name in ("steps", "batch_size", "checkpoint_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay: expected in [0, 1), got {self.ema_decay}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
    if self.time_sampling not in TIME_SAMPLINGS:
      raise ValueError(f"time_sampling: expected one of {list(TIME_SAMPLINGS)}, got "
                       f"{self.time_sampling!r}")
    if not self.logit_std > 0:
      raise ValueError(f"logit_std: expected > 0, got {self.logit_std}")


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
# The shared step.


class StepContext(NamedTuple):
  """What a loss may read besides its params, batch and key (see `make_regression_step`)."""

  frozen: Any
  ema: Any
  step: jax.Array


def make_regression_step(loss_fn: Callable, cfg: FlowTrainConfig):
  """A jitted `step(state, arrays, frozen) -> (state, loss)`.

  arrays: a tuple of arrays with a common leading (example) axis; each step draws `batch_size`
    rows with replacement. frozen: a pytree the loss reads but does not train (a teacher's
    weights) — passed as an argument so that it is not baked into the compiled step.
  loss_fn(params, batch, key, ctx) -> scalar, with `ctx` a `StepContext`: the frozen pytree, the
    EMA of the trained weights (consistency distillation's target network) and the step number
    (for annealed losses).
  """
  opt = adamw_with_warmup(cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip)
  base_key = jax.random.key(cfg.seed)

  @jax.jit
  def step(state, arrays, frozen):
    key = jax.random.fold_in(base_key, state["step"])
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, arrays[0].shape[0])
    batch = tuple(a[idx] for a in arrays)
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, k_loss, StepContext(frozen, state["ema"], state["step"])))(
            state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p,
                       state["ema"], params)
    return {"params": params, "ema": ema, "opt_state": opt_state,
            "step": state["step"] + 1}, loss

  return step


def init_train_state(params, cfg: FlowTrainConfig) -> dict[str, Any]:
  opt = adamw_with_warmup(cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip)
  return {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params),
          "step": jnp.zeros((), jnp.int32)}


def train_regression(loss_fn: Callable, params, arrays: tuple, *, cfg: FlowTrainConfig,
                     out_dir: str | os.PathLike, frozen: Any = None, progress: bool = True,
                     desc: str = "train") -> tuple[dict[str, Any], list[dict]]:
  """`make_regression_step` run by the shared loop (checkpoints, loss log, exact resume)."""
  arrays = tuple(jnp.asarray(a) for a in arrays)
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"arrays: expected a common leading axis, got shapes "
                     f"{[tuple(a.shape) for a in arrays]}")
  return run_training(make_regression_step(loss_fn, cfg), init_train_state(params, cfg),
                      (arrays, frozen), steps=cfg.steps, out_dir=out_dir,
                      checkpoint_every=cfg.checkpoint_every, progress=progress, desc=desc)


def claim_out_dir(out_dir: str | os.PathLike, config: dict) -> Path:
  """Creates `out_dir` and writes `config.json`; refuses a folder written with another config
  (resuming it would mix two runs)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "config.json"
  text = json.dumps(config, indent=2, default=str)
  if path.exists() and json.loads(path.read_text()) != json.loads(text):
    raise ValueError(f"out_dir: {out_dir} holds a run with another configuration; use a new folder")
  path.write_text(text)
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
  out_dir = claim_out_dir(out_dir, {"model": model_cfg.__dict__, "train": train_cfg.__dict__,
                                    "schedule": schedule.__dict__, "method": "flow_matching"})
  apply, params = to_functional(DiT(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
  images, labels = digits.load_digits_images()

  def loss_fn(p, batch, key, ctx):
    del ctx
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
