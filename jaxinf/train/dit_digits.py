"""A class-conditional DiT on scikit-learn's digits: the project's small diffusion workload.

    model_cfg, apply, state = train_dit_on_digits(out_dir="results/dit-digits")

trains (or resumes, or reuses when finished) and returns the functional model and the train state
(`state["ema"]` holds the EMA weights used for sampling).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from flax import nnx

from jaxinf.data import digits
from jaxinf.diffusion import schedules
from jaxinf.diffusion.denoiser import Denoiser, dit_denoiser
from jaxinf.models.dit import DiT, DiTConfig, dit_config, drop_labels
from jaxinf.models.functional import to_functional
from jaxinf.train.diffusion import DiffusionTrainConfig, train_diffusion


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
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  config = {"model": model_cfg.__dict__, "train": dataclasses.asdict(train_cfg),
            "schedule": schedule.__dict__}
  config_path = out_dir / "config.json"
  if config_path.exists() and json.loads(config_path.read_text()) != json.loads(json.dumps(config)):
    raise ValueError(f"out_dir: {out_dir} holds a run with another configuration; use a new folder")
  config_path.write_text(json.dumps(config, indent=2))
  apply, params = to_functional(DiT(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
  images, labels = digits.load_digits_images()
  state, records = train_diffusion(
      apply, params, images, labels, cfg=train_cfg, schedule=schedule, out_dir=out_dir,
      learned_sigma=model_cfg.learn_sigma, drop_labels=lambda y, k: drop_labels(model_cfg, y, k),
      progress=progress)
  return model_cfg, apply, state, records


def ema_denoiser(model_cfg: DiTConfig, apply, state, prediction_type: str) -> Denoiser:
  return dit_denoiser(apply, state["ema"], model_cfg, prediction_type=prediction_type)
