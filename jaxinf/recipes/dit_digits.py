"""A class-conditional DiT on scikit-learn's digits: the project's small diffusion workload.

    model_cfg, apply, state, records = train_dit_on_digits(out_dir="results/dit-digits")

trains (or resumes, or reuses when finished) and returns the functional model, the train state
(`state["ema"]` holds the EMA weights used for sampling) and the loss records. The quickstart's
size, schedule and budget for it, and its denoiser, are `jaxinf.recipes.quickstart_dit`;
`experiments.train_dit` trains it with any settings.
"""

from __future__ import annotations

import os

from flax import nnx

from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.models.dit import DiT, DiTConfig, dit_config, drop_labels
from jaxinf.models.functional import to_functional
from jaxinf.train.diffusion import DiffusionTrainConfig, train_diffusion
from jaxinf.train.flow import claim_out_dir


def train_dit_on_digits(out_dir: str | os.PathLike, *,
                        model_cfg: DiTConfig | None = None,
                        train_cfg: DiffusionTrainConfig = DiffusionTrainConfig(),
                        schedule: schedules.NoiseSchedule = schedules.NoiseSchedule(),
                        progress: bool = True):
  """Returns (model_cfg, apply, state, loss records). Writes `config.json` beside the checkpoints
  and refuses to resume a directory written with a different configuration."""
  model_cfg = model_cfg or dit_config("DiT-digits")
  if model_cfg.sample_shape != digits.IMAGE_SHAPE or model_cfg.num_classes != digits.NUM_CLASSES:
    raise ValueError(f"model_cfg: a digits DiT needs input 8x8x1 and 10 classes, got "
                     f"{model_cfg.sample_shape} and {model_cfg.num_classes}")
  out_dir = claim_out_dir(out_dir, {"model": model_cfg,
                                    "train": train_cfg,
                                    "schedule": schedule})
  apply, params = to_functional(DiT(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
  images, labels = digits.load_digits_images()
  state, records = train_diffusion(
      apply, params, images, labels, cfg=train_cfg, schedule=schedule, out_dir=out_dir,
      learned_sigma=model_cfg.learn_sigma, drop_labels=lambda y, k: drop_labels(model_cfg, y, k),
      progress=progress)
  return model_cfg, apply, state, records

