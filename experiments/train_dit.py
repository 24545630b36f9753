"""Trains a class-conditional DiT on scikit-learn's digits, with checkpoints that resume.

    python -m experiments.train_dit --out-dir results/train_dit        # DiT-digits, 1500 steps
    python -m experiments.train_dit --smoke                             # a few steps, seconds

Kill it at any point and run the same command again: it resumes from the latest checkpoint and
continues with exactly the losses the uninterrupted run would have had (`losses.jsonl`).
"""

from __future__ import annotations

import dataclasses
import time

from experiments import common
from jaxinf.diffusion import schedules
from jaxinf.models.dit import dit_config
from jaxinf.recipes.dit_digits import train_dit_on_digits
from jaxinf.recipes.quickstart_dit import check_digits_dit
from jaxinf.train.diffusion import DiffusionTrainConfig


@dataclasses.dataclass(frozen=True)
class Config(common.Checked):
  out_dir: str = "results/train_dit"
  model: str = "DiT-digits"  # a digits-sized `jaxinf.models.dit` config (8x8x1, 10 classes)
  train: DiffusionTrainConfig = DiffusionTrainConfig()  # checks its own fields
  beta_schedule: str = "linear"
  smoke: bool = False  # DiT-tiny, at most 40 steps of batch 16 (options given beside it are kept)
  progress: bool = True

  def check(self) -> None:
    super().check()
    if not self.out_dir:
      common.refuse("out_dir", "expected a folder, got ''")
    check_digits_dit("model", self.model)
    common.check_with("beta_schedule", lambda: schedules.NoiseSchedule(self.beta_schedule))


def smoke_config(cfg: Config) -> Config:
  """DiT-tiny for a few steps; an option given beside `--smoke` is kept (`common.smoke_sized`)."""
  train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps, 40), checkpoint_every=10,
                              batch_size=16)
  return common.smoke_sized(cfg, dataclasses.replace(cfg, model="DiT-tiny", train=train),
                            derived=())


def main(cfg: Config) -> None:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  start = time.perf_counter()
  _, _, state, records = train_dit_on_digits(
      cfg.out_dir, model_cfg=dit_config(cfg.model), train_cfg=cfg.train,
      schedule=schedules.NoiseSchedule(cfg.beta_schedule), progress=cfg.progress)
  print(f"step {int(state['step'])}: loss {records[-1]['loss']:.4f} "
        f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main(common.parse(Config))
