"""scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes) as diffusion data.

Pixels take the integer values 0..16; they are mapped affinely to [-1, 1] (x / 8 - 1), channels-last
`[N, 8, 8, 1]`. The held-out split is stratified and fixed by a seed so that every run and the
shipped classifier agree on it.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  bunch = load_digits()
  return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
  """(images `[1797, 8, 8, 1]` float32 in [-1, 1], labels `[1797]` int32)."""
  images, labels = _raw()
  return (images / 8.0 - 1.0)[..., None], labels.copy()


def to_pixels(images: np.ndarray) -> np.ndarray:
  """Inverse map to the 0..16 pixel scale (for display)."""
  return (np.asarray(images) + 1.0) * 8.0


def split_indices(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train, test) index arrays: `test_fraction` of each class is held out."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction: expected in (0, 1), got {test_fraction}")
  _, labels = _raw()
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
