"""A chi-square goodness-of-fit test of sampled categories against exact probabilities."""

from __future__ import annotations

import numpy as np
from scipy import stats


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
  """p-value of the counts of `samples` (ints in [0, len(probs))) under `probs`. Cells expected
  fewer than `min_expected` times are pooled into one, as the test's approximation needs."""
  probs = np.asarray(probs, np.float64)
  counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size).astype(np.float64)
  if counts.size != probs.size:
    raise ValueError(f"samples: values outside [0, {probs.size})")
  n = counts.sum()
  expected = probs * n
  big = expected >= min_expected
  obs = list(counts[big])
  exp = list(expected[big])
  if (~big).any():
    obs.append(counts[~big].sum())
    exp.append(expected[~big].sum())
  obs, exp = np.array(obs), np.array(exp)
  exp *= obs.sum() / exp.sum()
  return float(stats.chisquare(obs, exp).pvalue)
