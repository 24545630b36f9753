"""Trains the digits classifier behind FD-digits and conditional accuracy, and ships it.

    python -m experiments.train_digits_classifier          # jaxinf/assets/digits_classifier.npz
    python -m experiments.train_digits_classifier --smoke  # 50 steps, to results/, no threshold

About 15 s on a 2-core CPU. Refuses to write weights whose held-out accuracy is below 97%.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tyro

from experiments.common import results_dir
from jaxinf.checkpoints import arrays
from jaxinf.metrics.digits_classifier import ASSET, ClassifierTrainConfig, train_classifier


@dataclasses.dataclass(frozen=True)
class Config:
  train: ClassifierTrainConfig = ClassifierTrainConfig()
  out: str = str(ASSET)
  min_accuracy: float = 0.97
  smoke: bool = False


def main(cfg: Config) -> float:
  if cfg.smoke:
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=50), min_accuracy=0.0,
        out=str(results_dir("train_digits_classifier_smoke") / "digits_classifier.npz"))
  start = time.perf_counter()
  params, acc = train_classifier(cfg.train)
  print(f"held-out accuracy {acc:.4f} after {cfg.train.steps} steps "
        f"({time.perf_counter() - start:.1f} s)")
  if acc < cfg.min_accuracy:
    raise SystemExit(f"accuracy {acc:.4f} < {cfg.min_accuracy}: not writing {cfg.out}")
  arrays.save_params(cfg.out, params, heldout_accuracy=np.float64(acc),
                     steps=np.int64(cfg.train.steps), seed=np.int64(cfg.train.seed))
  print(f"wrote {cfg.out}")
  return acc


if __name__ == "__main__":
  main(tyro.cli(Config))
