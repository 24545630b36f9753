"""Fréchet distance against closed forms and scipy's matrix square root."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from jaxinf.metrics.frechet import frechet_distance, frechet_distance_from_stats


def test_diagonal_gaussians_closed_form():
  """For commuting (diagonal) covariances FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2."""
  rng = np.random.default_rng(0)
  mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
  s_a, s_b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(s_a) - np.sqrt(s_b)) ** 2)
  got = frechet_distance_from_stats(mu_a, np.diag(s_a), mu_b, np.diag(s_b))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_full_covariances_against_scipy_sqrtm():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  cov_a, cov_b = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
  mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
  expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
  np.testing.assert_allclose(frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b), expected,
                             rtol=1e-9)


def test_identical_sets_and_rank_deficient_features():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10))  # rank 3 in 10 dims
  # the 7 zero eigenvalues come out as ~±1e-16·|S|, and sqrt turns each into ~sqrt(1e-16·|S|):
  # the floor is about d·sqrt(eps·|S|), not eps·|S|.
  scale = np.trace(np.cov(x.T))
  bound = 10 * x.shape[1] * np.sqrt(np.finfo(np.float64).eps * scale)
  assert abs(frechet_distance(x, x)) < bound
  assert abs(frechet_distance(x[:, :3], x[:, :3])) < 1e-9 * scale  # full rank: round-off only


def test_bad_shapes():
  with pytest.raises(ValueError, match="features_b"):
    frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="features"):
    frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
