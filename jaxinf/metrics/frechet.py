"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, the FID
formula; Dowson & Landau 1982 for the distance itself):

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

computed in float64. Tr((S_a S_b)^{1/2}) is taken as the sum of the square roots of the
eigenvalues of the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2}, which avoids the complex
round-off of a general `sqrtm(S_a @ S_b)`.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of `[N, D]` features, float64, covariance with N - 1 normalisation."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features: expected [N >= 2, D], got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  # eigenvalues of a PSD matrix can come out as -1e-17 from round-off; they are zero.
  return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  d = mu_a.shape[0]
  for name, cov in (("cov_a", cov_a), ("cov_b", cov_b)):
    if cov.shape != (d, d):
      raise ValueError(f"{name}: expected shape {(d, d)}, got {cov.shape}")
  if mu_b.shape != (d,):
    raise ValueError(f"mu_b: expected shape {(d,)}, got {mu_b.shape}")
  root_a = _psd_sqrt(cov_a)
  inner = root_a @ cov_b @ root_a
  w = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_sqrt = np.sqrt(np.maximum(w, 0.0)).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD between Gaussian fits of two `[N, D]` feature sets."""
  a, b = np.asarray(features_a), np.asarray(features_b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"features_b: expected [M, {a.shape[-1]}] to match features_a {a.shape}, "
                     f"got {b.shape}")
  return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
