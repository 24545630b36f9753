"""A chi-square goodness-of-fit test of sampled categories against exact probabilities."""

from __future__ import annotations

import numpy as np
from scipy import stats


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
  """p-value of the counts of `samples` (ints in [0, len(probs))) under `probs`
  (`counts_pvalue` of their counts)."""
  probs = np.asarray(probs, np.float64)
  counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size)
  if counts.size != probs.size:
    raise ValueError(f"samples: values outside [0, {probs.size})")
  return counts_pvalue(counts, probs, min_expected)


def counts_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
  """p-value of Pearson's chi-square test of `counts` `[K]` under `probs` `[K]`. Cells expected
  fewer than `min_expected` times are pooled into one, as the test's approximation needs; a count
  in a cell of probability 0 is impossible under `probs`: p-value 0."""
  probs = np.asarray(probs, np.float64)
  counts = np.asarray(counts, np.float64)
  if counts.shape != probs.shape:
    raise ValueError(f"counts: expected shape {probs.shape}, got {counts.shape}")
  if counts[probs == 0].sum() > 0:
    return 0.0
  n = counts.sum()
  expected = probs * n
  big = expected >= min_expected
  obs = list(counts[big])
  exp = list(expected[big])
  if expected[~big].sum() > 0:
    obs.append(counts[~big].sum())
    exp.append(expected[~big].sum())
  obs, exp = np.array(obs), np.array(exp)
  exp *= obs.sum() / exp.sum()
  return float(stats.chisquare(obs, exp).pvalue)
