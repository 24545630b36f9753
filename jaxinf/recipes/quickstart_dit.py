"""The quickstart's digits DiT: one size, noise schedule and training budget, trained once and
shared by the diffusion studies.

    dit = QuickstartDiT()
    model_cfg, apply, state, records = dit.trained(dit_folder("results/quickstart"))
    x = sample(key, dit.denoiser(model_cfg, apply, state), dit.schedule(), solver, shape, ...)
    digits_scores(DigitsEvaluator.load(), x, labels)    # {"fd": ..., "cond_accuracy": ...}

`experiments.quickstart` trains it (or resumes, or reuses the finished checkpoint) in
`results/quickstart/dit/`; `experiments.sampler_pareto` reuses that checkpoint, or trains the same
model there when the quickstart has not run. The training itself is
`jaxinf.recipes.dit_digits.train_dit_on_digits`; the scores are FD-digits and conditional accuracy
(`jaxinf.metrics.digits_classifier`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinf.checkpoints.native import CheckpointStore
from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.models.dit import DIT_CONFIGS, dit_config
from jaxinf.recipes.dit_digits import train_dit_on_digits
from jaxinf.train.diffusion import DiffusionTrainConfig

QUICKSTART_RESULTS = "results/quickstart"


@dataclasses.dataclass(frozen=True)
class QuickstartDiT:
  """The digits DiT's size (`jaxinf.models.dit.dit_config` name), training and noise schedule."""
  model: str = "DiT-digits"       # a `jaxinf.models.dit.dit_config` name
  # v-prediction: with epsilon-prediction the x0 implied at t = 999 of the linear schedule is the
  # eps error times 1/sqrt(abar) = 158, and deterministic DDIM keeps that error (see the README).
  # checkpoints at the half and the end: each save costs the run ~1 s on a 2-core CPU
  train: DiffusionTrainConfig = DiffusionTrainConfig(steps=2500, prediction_type="v_prediction",
                                                     checkpoint_every=1250)
  beta_schedule: str = "linear"   # the noise schedule's betas

  def __post_init__(self):
    # checked as the options are parsed: a bad one must not cost a training run first
    check_digits_dit("model", self.model)
    if not isinstance(self.train, DiffusionTrainConfig):  # it checks its own fields
      raise TypeError(f"train: expected a DiffusionTrainConfig, got {self.train!r}")
    self.schedule()  # NoiseSchedule names a bad beta_schedule

  def schedule(self) -> schedules.NoiseSchedule:
    return schedules.NoiseSchedule(self.beta_schedule)

  def finished(self, folder: str | os.PathLike) -> bool:
    """Whether `folder` holds the finished checkpoint (training will be skipped)."""
    ckpts = Path(folder) / "checkpoints"
    return ckpts.exists() and CheckpointStore(ckpts).latest_step() == self.train.steps

  def trained(self, folder: str | os.PathLike, *, progress: bool = True):
    """(model config, apply, train state, loss records): trains in `folder`, resuming any partial
    run, or reuses the finished checkpoint; `state["ema"]` holds the sampling weights."""
    return train_dit_on_digits(folder, model_cfg=dit_config(self.model), train_cfg=self.train,
                               schedule=self.schedule(), progress=progress)

  def denoiser(self, model_cfg, apply, state, **options):
    """The EMA weights' denoiser (`options`: e.g. `features` for feature caching)."""
    return dit_denoiser(apply, state["ema"], model_cfg,
                        prediction_type=self.train.prediction_type, **options)


def check_digits_dit(name: str, model) -> None:
  """`model` names a `jaxinf.models.dit.DIT_CONFIGS` entry that fits the digits (8x8x1 inputs,
  10 classes); errors name the option `name`."""
  if not isinstance(model, str) or model not in DIT_CONFIGS:
    raise ValueError(f"{name}: unknown DiT config {model!r}; known: {sorted(DIT_CONFIGS)}")
  cfg = DIT_CONFIGS[model]
  if cfg.sample_shape != digits.IMAGE_SHAPE or cfg.num_classes != digits.NUM_CLASSES:
    fits = sorted(k for k, c in DIT_CONFIGS.items()
                  if c.sample_shape == digits.IMAGE_SHAPE and c.num_classes == digits.NUM_CLASSES)
    raise ValueError(f"{name}: {model!r} takes {cfg.sample_shape} inputs and {cfg.num_classes} "
                     f"classes, not the digits' {digits.IMAGE_SHAPE} and {digits.NUM_CLASSES}; "
                     f"digits configs: {fits}")


def smoke_dit(dit: QuickstartDiT) -> QuickstartDiT:
  """`dit` cut to a smoke run: DiT-tiny, 60 steps of batch 32."""
  return dataclasses.replace(dit, model="DiT-tiny", train=dataclasses.replace(
      dit.train, steps=60, checkpoint_every=30, batch_size=32))


def dit_folder(quickstart_results: str | os.PathLike) -> Path:
  """Where the DiT trains: `dit/` inside the quickstart's results folder."""
  return Path(quickstart_results) / "dit"


def balanced_labels(per_class: int) -> jnp.ndarray:
  """Class labels 0..9, `per_class` of each in order: [10 * per_class]."""
  return jnp.repeat(jnp.arange(digits.NUM_CLASSES), per_class)


def digits_scores(evaluator, images: np.ndarray, labels) -> dict[str, float]:
  """FD-digits of `images` [N, 8, 8, 1] and their conditional accuracy against `labels` [N]."""
  return dict(fd=evaluator.fd(images), cond_accuracy=evaluator.cond_accuracy(images,
                                                                              np.asarray(labels)))
