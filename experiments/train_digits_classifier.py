"""Trains the digits classifier behind FD-digits and conditional accuracy, and ships it.

    python -m experiments.train_digits_classifier          # jaxinf/assets/digits_classifier.npz
    python -m experiments.train_digits_classifier --smoke  # 50 steps, to results/, no threshold

About 15 s on a 2-core CPU. Refuses to write weights whose held-out accuracy is below 97%.
Writes its accuracy, steps and time to `results/train_digits_classifier/report.md` (`--report-dir`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from experiments import common
from jaxinf.checkpoints import arrays
from jaxinf.metrics.digits_classifier import ASSET, ClassifierTrainConfig, train_classifier


@dataclasses.dataclass(frozen=True)
class Config(common.Checked):
  train: ClassifierTrainConfig = ClassifierTrainConfig()
  out: str = str(ASSET)
  report_dir: str = "results/train_digits_classifier"  # report.md: accuracy, steps, time
  min_accuracy: float = 0.97
  smoke: bool = False  # 50 steps, no threshold, to results/ (options given beside it are kept)

  def check(self) -> None:
    super().check()
    train = self.train  # ClassifierTrainConfig has no checks of its own: its fields, here
    common.check_types(train, group="train.")
    common.check_ints(train, "steps", "batch_size", group="train.")
    common.check_ints(train, "seed", low=0, group="train.")
    common.check_ints(train, "max_shift", low=0, high=7, group="train.")  # shifts of 8x8 images
    common.check_numbers(train, "learning_rate", low=0.0, low_open=True, group="train.")
    common.check_numbers(self, "min_accuracy", low=0.0, high=1.0)
    if not self.out:
      common.refuse("out", "expected a file name, got ''")
    if not self.report_dir:
      common.refuse("report_dir", "expected a folder, got ''")


def smoke_config(cfg: Config) -> Config:
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, steps=50), min_accuracy=0.0,
      out=str(Path("results") / "train_digits_classifier_smoke" / "digits_classifier.npz"),
      report_dir=common.smoke_dir(cfg.report_dir)), derived=())


def main(cfg: Config) -> float:
  if cfg.smoke:
    cfg = smoke_config(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  params, acc = train_classifier(cfg.train)
  seconds = time.perf_counter() - start
  print(f"held-out accuracy {acc:.4f} after {cfg.train.steps} steps ({seconds:.1f} s)")
  written = acc >= cfg.min_accuracy
  row = dict(steps=cfg.train.steps, seed=cfg.train.seed, heldout_accuracy=float(acc),
             min_accuracy=cfg.min_accuracy, seconds=seconds,
             weights=cfg.out if written else "not written (below min_accuracy)")
  common.write_report(
      Path(cfg.report_dir), [row], title="Training the digits classifier (FD-digits' features)",
      notes="Held-out accuracy of the classifier behind FD-digits and conditional accuracy "
            "(`jaxinf.metrics.digits_classifier`), on the digits it did not train on.",
      extra=dict(total_seconds=seconds, backend=jax.default_backend(), smoke=cfg.smoke))
  if not written:
    raise SystemExit(f"accuracy {acc:.4f} < {cfg.min_accuracy}: not writing {cfg.out}")
  arrays.save_params(cfg.out, params, heldout_accuracy=np.float64(acc),
                     steps=np.int64(cfg.train.steps), seed=np.int64(cfg.train.seed))
  print(f"wrote {cfg.out}")
  return acc


if __name__ == "__main__":
  main(common.parse(Config))
