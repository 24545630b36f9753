"""The project's digits classifier and the metrics it defines.

A small CNN (conv3x3·16 → ReLU → maxpool 2 → conv3x3·32 → ReLU → fc 64 → ReLU → fc 10) trained on
the stratified train split of scikit-learn's digits. Its 64-d penultimate activations define
**FD-digits** (the Fréchet distance of generated samples to all 1,797 real digits in that feature
space, an FID analogue for 8x8 digits), and its predictions give the **conditional accuracy** of
class-conditional samples (the share classified as the class they were conditioned on).

The trained weights ship in `jaxinf/assets/digits_classifier.npz`, so no run retrains it;
`python -m experiments.train_digits_classifier` rebuilds that file.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxinf.checkpoints import arrays
from jaxinf.data import digits
from jaxinf.metrics import frechet
from jaxinf.models.functional import to_functional

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.npz"


class DigitsCNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, digits.NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate activations `[B, 64]` of images `[B, 8, 8, 1]` in [-1, 1]."""
    h = jax.nn.relu(self.conv1(x))
    h = nnx.max_pool(h, (2, 2), strides=(2, 2))
    h = jax.nn.relu(self.conv2(h))
    return jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.features(x))


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 2e-3
  seed: int = 0
  # one-pixel random shifts: cheap augmentation that helps on 8x8 digits
  max_shift: int = 1


def _shift(x: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  if max_shift == 0:
    return x
  shifts = jax.random.randint(key, (x.shape[0], 2), -max_shift, max_shift + 1)
  pad = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                constant_values=-1.0)
  crop = lambda img, s: jax.lax.dynamic_slice(img, (max_shift + s[0], max_shift + s[1], 0),
                                              x.shape[1:])
  return jax.vmap(crop)(pad, shifts)


def train_classifier(cfg: ClassifierTrainConfig = ClassifierTrainConfig()) -> tuple[dict, float]:
  """Trains the CNN on the train split; returns (params, held-out accuracy)."""
  images, labels = digits.load_digits_images()
  train_idx, test_idx = digits.split_indices()
  x_train, y_train = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])
  apply, params = to_functional(DigitsCNN(rngs=nnx.Rngs(cfg.seed)))
  opt = optax.adam(cfg.learning_rate)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, i):
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), i)
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, x_train.shape[0])
    x = _shift(x_train[idx], k_shift, cfg.max_shift)

    def loss_fn(p):
      logits = apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(cfg.steps):
    params, opt_state, _ = step(params, opt_state, i)
  preds = jnp.argmax(jax.jit(apply)(params, jnp.asarray(images[test_idx])), -1)
  return params, float(np.mean(np.asarray(preds) == labels[test_idx]))


class DigitsEvaluator:
  """FD-digits and conditional accuracy with the shipped classifier.

      ev = DigitsEvaluator.load()
      ev.fd(samples); ev.cond_accuracy(samples, labels)
  """

  def __init__(self, params: dict):
    model = DigitsCNN(rngs=nnx.Rngs(0))
    feat_apply, template = to_functional(model, "features")
    logit_apply, _ = to_functional(model)
    arrays.check_keys(arrays.flatten_params(params), arrays.flatten_params(template),
                      what="params")
    self.params = params
    self._features = jax.jit(feat_apply)
    self._logits = jax.jit(logit_apply)
    images, _ = digits.load_digits_images()
    self.reference_stats = frechet.gaussian_stats(self.features(images))

  @classmethod
  @functools.cache
  def load(cls, path: str | None = None) -> "DigitsEvaluator":
    path = Path(path) if path is not None else ASSET
    if not path.exists():
      raise FileNotFoundError(
          f"path: {path} not found; run `python -m experiments.train_digits_classifier`")
    template = to_functional(DigitsCNN(rngs=nnx.Rngs(0)))[1]
    params, _ = arrays.load_params(path, template)
    return cls(params)

  @staticmethod
  def _check(images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != digits.IMAGE_SHAPE:
      raise ValueError(f"images: expected [N, 8, 8, 1], got {images.shape}")
    return images

  def features(self, images) -> np.ndarray:
    return np.asarray(self._features(self.params, self._check(images)), np.float64)

  def predict(self, images) -> np.ndarray:
    return np.asarray(jnp.argmax(self._logits(self.params, self._check(images)), -1))

  def fd(self, images) -> float:
    """FD-digits of `images` against all 1,797 real digits."""
    return frechet.frechet_distance_from_stats(
        *frechet.gaussian_stats(self.features(images)), *self.reference_stats)

  def cond_accuracy(self, images, labels) -> float:
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
      raise ValueError(f"labels: expected shape [{np.shape(images)[0]}], got {labels.shape}")
    return float(np.mean(self.predict(images) == labels))
