"""The shipped digits classifier: held-out accuracy, FD-digits sanity, strict loading."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinf.checkpoints import arrays
from jaxinf.data import digits
from jaxinf.metrics.digits_classifier import ASSET, DigitsEvaluator


@pytest.fixture(scope="module")
def ev():
  return DigitsEvaluator.load()


def test_heldout_accuracy_at_least_97_percent(ev):
  images, labels = digits.load_digits_images()
  _, test = digits.split_indices()
  assert len(test) == 450
  assert ev.cond_accuracy(images[test], labels[test]) >= 0.97


def test_fd_orders_real_digits_below_noise_and_shuffled_pixels(ev):
  images, _ = digits.load_digits_images()
  rng = np.random.default_rng(0)
  real = images[rng.choice(len(images), 500, replace=False)]
  noise = np.clip(rng.normal(size=real.shape), -1, 1).astype(np.float32)
  shuffled = np.stack([rng.permutation(im.reshape(-1)).reshape(im.shape) for im in real])
  fd_real, fd_noise, fd_shuffled = ev.fd(real), ev.fd(noise), ev.fd(shuffled)
  assert fd_real < 2.0
  assert fd_noise > 50 * fd_real and fd_shuffled > 10 * fd_real


def test_split_is_stratified_and_disjoint():
  train, test = digits.split_indices()
  _, labels = digits.load_digits_images()
  assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
  counts = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
  np.testing.assert_allclose(counts, 0.25, atol=0.01)


def test_loading_refuses_missing_or_extra_keys(tmp_path):
  params, _ = arrays.load_params(ASSET)
  extra = dict(params, extra_layer={"kernel": np.zeros(3)})
  arrays.save_params(tmp_path / "extra.npz", extra)
  with pytest.raises(ValueError, match="unexpected keys \\['extra_layer/kernel'\\]"):
    DigitsEvaluator.load(str(tmp_path / "extra.npz"))
  missing = {k: v for k, v in params.items() if k != "fc2"}
  arrays.save_params(tmp_path / "missing.npz", missing)
  with pytest.raises(ValueError, match="missing keys \\['fc2/bias', 'fc2/kernel'\\]"):
    DigitsEvaluator.load(str(tmp_path / "missing.npz"))


def test_bad_images(ev):
  with pytest.raises(ValueError, match="images"):
    ev.fd(np.zeros((10, 28, 28, 1)))
  with pytest.raises(ValueError, match="labels"):
    ev.cond_accuracy(np.zeros((10, 8, 8, 1)), np.zeros(9))


def test_the_recipe_reproduces_the_shipped_accuracy(tmp_path):
  """Retraining from scratch (what `experiments.train_digits_classifier` does) clears 97% again
  and writes a file the evaluator loads."""
  from experiments import train_digits_classifier as exp
  acc = exp.main(exp.Config(out=str(tmp_path / "clf.npz"), report_dir=str(tmp_path / "report")))
  assert acc >= 0.97
  assert f"{acc:.4g}" in (tmp_path / "report" / "report.md").read_text()
  _, meta = arrays.load_params(tmp_path / "clf.npz")
  assert float(meta["heldout_accuracy"]) == pytest.approx(acc)
  images, labels = digits.load_digits_images()
  _, test = digits.split_indices()
  assert DigitsEvaluator(arrays.load_params(tmp_path / "clf.npz")[0]).cond_accuracy(
      images[test], labels[test]) == pytest.approx(acc)
