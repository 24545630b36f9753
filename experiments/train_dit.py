"""Trains a class-conditional DiT on scikit-learn's digits, with checkpoints that resume.

    python -m experiments.train_dit --out-dir results/train_dit        # DiT-digits, 1500 steps
    python -m experiments.train_dit --smoke                             # a few steps, seconds

Kill it at any point and run the same command again: it resumes from the latest checkpoint and
continues with exactly the losses the uninterrupted run would have had (`losses.jsonl`).
"""

from __future__ import annotations

import dataclasses
import time

import tyro

from jaxinf.diffusion import schedules
from jaxinf.models.dit import dit_config
from jaxinf.recipes.dit_digits import train_dit_on_digits
from jaxinf.train.diffusion import DiffusionTrainConfig


@dataclasses.dataclass(frozen=True)
class Config:
  out_dir: str = "results/train_dit"
  model: str = "DiT-digits"
  train: DiffusionTrainConfig = DiffusionTrainConfig()
  beta_schedule: str = "linear"
  smoke: bool = False
  progress: bool = True


def main(cfg: Config) -> None:
  train = cfg.train
  model_cfg = dit_config(cfg.model)
  if cfg.smoke:
    model_cfg = dit_config("DiT-tiny")
    train = dataclasses.replace(train, steps=min(train.steps, 40), checkpoint_every=10,
                                batch_size=16)
  start = time.perf_counter()
  _, _, state, records = train_dit_on_digits(
      cfg.out_dir, model_cfg=model_cfg, train_cfg=train,
      schedule=schedules.NoiseSchedule(cfg.beta_schedule), progress=cfg.progress)
  print(f"step {int(state['step'])}: loss {records[-1]['loss']:.4f} "
        f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main(tyro.cli(Config))
