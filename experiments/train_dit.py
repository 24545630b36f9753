"""Trains a class-conditional DiT on scikit-learn's digits, with checkpoints that resume.

    python -m experiments.train_dit --out-dir results/train_dit        # DiT-digits, 1500 steps
    python -m experiments.train_dit --smoke                             # a few steps, seconds

Kill it at any point and run the same command again: it resumes from the latest checkpoint and
continues with exactly the losses the uninterrupted run would have had (`losses.jsonl`). Writes
`report.md` / `results.json` (the loss at a few steps) and `loss.png` beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

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
  seconds = time.perf_counter() - start
  print(f"step {int(state['step'])}: loss {records[-1]['loss']:.4f} ({seconds:.1f} s)")
  write_loss_report(Path(cfg.out_dir), cfg, records, seconds)


def write_loss_report(out: Path, cfg: Config, records: list[dict], seconds: float,
                      window: int = 50) -> None:
  """`report.md` / `results.json`: the mean loss over the `window` steps ending at a few steps
  (each power-of-ten multiple of 1, 2 and 5, and the last), and `loss.png`, the whole curve."""
  losses = np.asarray([r["loss"] for r in records], np.float64)
  marks = sorted({s for s in (m * 10**e for e in range(7) for m in (1, 2, 5))
                  if s <= len(losses)} | {len(losses)})
  rows = [dict(step=s, mean_loss=float(losses[max(0, s - window):s].mean()),
               steps_averaged=min(s, window)) for s in marks]
  notes = (f"{cfg.model} on scikit-learn's digits, {cfg.train.steps} steps of batch "
           f"{cfg.train.batch_size}, `{cfg.train.prediction_type}` targets, `{cfg.beta_schedule}` "
           f"betas; `mean_loss` is the mean training loss of the `steps_averaged` steps ending at "
           f"`step`. This call took {seconds:.0f} s on {jax.default_backend()} (0 steps trained "
           f"when the checkpoint was already finished).")
  common.write_report(out, rows, title="Training a DiT on digits", notes=notes,
                      extra=dict(total_seconds=seconds, backend=jax.default_backend(),
                                 model=cfg.model, steps=cfg.train.steps, smoke=cfg.smoke))
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, label="per step")
  if len(losses) >= window:
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main(common.parse(Config))
