"""Feature caching for DiT inside the sampling loop: reuse block outputs across adjacent steps.

At a *refresh* step the denoiser runs in full and keeps every block's attention and MLP outputs
(`DenoiserSpec.features`); at the steps until the next refresh it reuses them, recomputing only the
embeddings, the per-step modulations and the final layer (FORA, Selvaraju et al. 2024 — the DiT
analogue of DeepCache's reuse of high-level features). Which steps refresh is a static
`FeatureCache` schedule, chosen by one of:

- `fixed_interval(rows, n)`: every n-th step (FORA / DeepCache).
- `step_rehash(...)`: refresh where the features actually change — from a calibration pass, the
  relative change of the cached features between adjacent steps, refreshing whenever the change
  accumulated since the last refresh would exceed a threshold set to meet the budget (the Step
  Rehash idea of Zhan et al. 2024: adjacent steps whose features are similar share them).
- `learn_schedule(...)`: in the spirit of HarmoniCa (Huang et al. 2024), the refresh set that
  minimises the error of the *final* samples against the uncached sampler on a calibration batch
  (not the per-step feature error): greedy backward elimination, every candidate evaluated in one
  vmapped call.

Skipped work costs nothing at run time: the loop is a `lax.scan` over refresh segments, each one
full step followed by a `fori_loop` of cached steps (no `lax.cond`, nothing computed and thrown
away). `sample_masked` is the slow twin (computes both paths and selects), used to check the fast
loop and to evaluate candidate schedules without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_key
from jaxinf.diffusion.denoiser import Denoiser
from jaxinf.diffusion.reverse import (apply_step, initial_noise, model_inputs, prepare,
                                      step_noise)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """`refresh[i]`: whether table row i runs the full model (row 0 always does)."""

  refresh: tuple[bool, ...]

  def __post_init__(self):
    if not self.refresh or not all(isinstance(r, (bool, np.bool_)) for r in self.refresh):
      raise ValueError(f"refresh: expected a non-empty tuple of bools, got {self.refresh!r}")
    if not self.refresh[0]:
      raise ValueError("refresh: the first step must refresh (there is nothing cached yet)")
    object.__setattr__(self, "refresh", tuple(bool(r) for r in self.refresh))

  @property
  def num_refresh(self) -> int:
    return sum(self.refresh)

  @property
  def rows(self) -> int:
    return len(self.refresh)


def fixed_interval(rows: int, interval: int) -> FeatureCache:
  """Refresh every `interval`-th row (FORA's N; interval 1 is no caching)."""
  if not isinstance(interval, int) or interval < 1:
    raise ValueError(f"interval: expected an int >= 1, got {interval!r}")
  if not isinstance(rows, int) or rows < 1:
    raise ValueError(f"rows: expected an int >= 1, got {rows!r}")
  return FeatureCache(tuple(i % interval == 0 for i in range(rows)))


def step_rehash(changes: np.ndarray, num_refresh: int) -> FeatureCache:
  """Refresh where the features change: `changes[i]` is the relative change of the features
  between rows i-1 and i (from `feature_changes`); a refresh happens when the change accumulated
  since the last refresh exceeds a threshold, bisected to give exactly `num_refresh` refreshes
  (or the closest count above it)."""
  changes = np.asarray(changes, np.float64)
  rows = len(changes)
  _check_budget(num_refresh, rows)

  def schedule(threshold):
    refresh, acc = [True], 0.0
    for i in range(1, rows):
      acc += changes[i]
      if acc > threshold:
        refresh.append(True)
        acc = 0.0
      else:
        refresh.append(False)
    return refresh

  lo, hi = 0.0, float(changes[1:].sum()) + 1.0  # row 0 (always refreshed) may be inf
  for _ in range(60):  # the count is monotone in the threshold
    mid = (lo + hi) / 2
    if sum(schedule(mid)) > num_refresh:
      lo = mid
    else:
      hi = mid
  best = schedule(hi)
  if sum(best) < num_refresh:
    best = schedule(lo)
  return FeatureCache(tuple(best))


def _check_budget(num_refresh, rows):
  if not isinstance(num_refresh, int) or not 1 <= num_refresh <= rows:
    raise ValueError(f"num_refresh: expected an int in [1, {rows}], got {num_refresh!r}")


def _check_cacheable(denoiser: Denoiser) -> None:
  if denoiser.spec.features is None:
    raise ValueError("denoiser: has no feature hooks; build it with "
                     "dit_denoiser(..., features=dit_feature_apply(model))")


# --- the loops --------------------------------------------------------------------------------

def _row(table, i):
  return jax.tree.map(lambda a: a[i], table)


def _empty_features(denoiser, solver, x, table, cond):
  x_in, t = model_inputs(solver, x, _row(table, 0))
  shapes = jax.eval_shape(denoiser.spec.features.with_features, denoiser.params, x_in, t, cond)[1]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("solver", "shape", "refresh"))
def _cached_scan(key, denoiser, table, cond, x_init, init_scale, *, solver, shape, refresh):
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  fa = denoiser.spec.features
  starts = np.flatnonzero(refresh)
  lengths = np.diff(np.append(starts, len(refresh)))

  def full(i, x, state):
    c = _row(table, i)
    out, feats = fa.with_features(denoiser.params, *model_inputs(solver, x, c), cond)
    x, state = apply_step(denoiser, solver, x, c, out, step_noise(loop_key, i, solver, shape),
                          state)
    return x, state, feats

  def cached(i, x, state, feats):
    c = _row(table, i)
    out = fa.from_features(denoiser.params, *model_inputs(solver, x, c), cond, feats)
    return apply_step(denoiser, solver, x, c, out, step_noise(loop_key, i, solver, shape), state)

  def segment(carry, inp):
    x, state, _ = carry
    i0, n = inp
    x, state, feats = full(i0, x, state)
    x, state = jax.lax.fori_loop(1, n, lambda j, xs: cached(i0 + j, *xs, feats), (x, state))
    return (x, state, feats), None

  carry = (x, solver.init_state(x), _empty_features(denoiser, solver, x, table, cond))
  (x, _, _), _ = jax.lax.scan(segment, carry, (jnp.asarray(starts), jnp.asarray(lengths)))
  return x


@functools.partial(jax.jit, static_argnames=("solver", "shape"))
def _masked_scan(key, denoiser, table, cond, x_init, init_scale, flags, *, solver, shape):
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  fa = denoiser.spec.features

  def body(carry, inp):
    x, state, feats = carry
    i, c, refresh = inp
    x_in, t = model_inputs(solver, x, c)
    out_full, new_feats = fa.with_features(denoiser.params, x_in, t, cond)
    out_cached = fa.from_features(denoiser.params, x_in, t, cond, feats)
    out = jnp.where(refresh, out_full, out_cached)
    feats = jax.tree.map(lambda a, b: jnp.where(refresh, a, b), new_feats, feats)
    x, state = apply_step(denoiser, solver, x, c, out, step_noise(loop_key, i, solver, shape),
                          state)
    return (x, state, feats), None

  rows = table["t"].shape[0]
  carry = (x, solver.init_state(x), _empty_features(denoiser, solver, x, table, cond))
  (x, _, _), _ = jax.lax.scan(body, carry, (jnp.arange(rows), table, flags))
  return x


def _prepared(denoiser, schedule, solver, shape, steps, cond, guidance, x_init):
  run = prepare(denoiser, schedule, solver, shape, steps=steps, cond=cond, guidance=guidance,
                x_init=x_init)
  _check_cacheable(run.denoiser)
  return run.denoiser, run.table, run.cond, run.x_init, run.init_scale, run.shape


def sample_cached(key, denoiser: Denoiser, schedule, solver, shape, *, steps: int,
                  cache: FeatureCache, cond: Any = None, guidance=None, x_init=None):
  """`sample` with feature caching: the full model only at `cache.refresh` rows."""
  check_key(key)
  if not isinstance(cache, FeatureCache):
    raise TypeError(f"cache: expected a FeatureCache, got {type(cache).__name__}")
  den, table, cond, x_init, init_scale, shape = _prepared(denoiser, schedule, solver, shape, steps,
                                                          cond, guidance, x_init)
  rows = table["t"].shape[0]
  if cache.rows != rows:
    raise ValueError(f"cache: the schedule has {cache.rows} rows, this solver with {steps} steps "
                     f"has {rows}")
  return _cached_scan(key, den, table, cond, x_init, init_scale, solver=solver, shape=shape,
                      refresh=cache.refresh)


def compile_sample_cached(denoiser: Denoiser, schedule, solver, shape, *, steps: int,
                          cache: FeatureCache, cond: Any = None, guidance=None):
  """Ahead-of-time compiled `sample_cached`: returns `run(key)` (for timing apart)."""
  den, table, cond, x_init, init_scale, shape = _prepared(denoiser, schedule, solver, shape, steps,
                                                          cond, guidance, None)
  if cache.rows != table["t"].shape[0]:
    raise ValueError(f"cache: the schedule has {cache.rows} rows, the table {table['t'].shape[0]}")
  compiled = _cached_scan.lower(jax.random.key(0), den, table, cond, x_init, init_scale,
                                solver=solver, shape=shape, refresh=cache.refresh).compile()
  return lambda key: compiled(key, den, table, cond, x_init, init_scale)


def sample_masked(key, denoiser: Denoiser, schedule, solver, shape, *, steps: int, flags,
                  cond: Any = None, guidance=None, x_init=None):
  """The slow twin of `sample_cached`: both paths every step, selected by `flags` `[rows]`
  (or `[N, rows]` to evaluate N schedules in one vmapped call, returning `[N, *shape]`)."""
  check_key(key)
  den, table, cond, x_init, init_scale, shape = _prepared(denoiser, schedule, solver, shape, steps,
                                                          cond, guidance, x_init)
  flags = jnp.asarray(flags, bool)
  run = functools.partial(_masked_scan, key, den, table, cond, x_init, init_scale, solver=solver,
                          shape=shape)
  return jax.vmap(run)(flags) if flags.ndim == 2 else run(flags)


# --- calibration -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("solver", "shape"))
def _feature_trace(key, denoiser, table, cond, x_init, init_scale, *, solver, shape):
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  fa = denoiser.spec.features

  def body(carry, inp):
    x, state, prev = carry
    i, c = inp
    out, feats = fa.with_features(denoiser.params, *model_inputs(solver, x, c), cond)
    change = jnp.linalg.norm(feats - prev) / jnp.maximum(jnp.linalg.norm(prev), 1e-12)
    x, state = apply_step(denoiser, solver, x, c, out, step_noise(loop_key, i, solver, shape),
                          state)
    return (x, state, feats), change

  rows = table["t"].shape[0]
  carry = (x, solver.init_state(x), _empty_features(denoiser, solver, x, table, cond))
  _, changes = jax.lax.scan(body, carry, (jnp.arange(rows), table))
  return changes


def feature_changes(key, denoiser: Denoiser, schedule, solver, shape, *, steps: int,
                    cond: Any = None, guidance=None) -> np.ndarray:
  """Relative change ||F_i - F_{i-1}|| / ||F_{i-1}|| of the cached features between adjacent rows
  on a calibration batch (row 0: infinity — it always refreshes)."""
  check_key(key)
  den, table, cond, x_init, init_scale, shape = _prepared(denoiser, schedule, solver, shape, steps,
                                                          cond, guidance, None)
  changes = np.asarray(_feature_trace(key, den, table, cond, x_init, init_scale, solver=solver,
                                      shape=shape), np.float64)
  changes[0] = np.inf
  return changes


def learn_schedule(key, denoiser: Denoiser, schedule, solver, shape, *, steps: int,
                   num_refresh: int, cond: Any = None, guidance=None,
                   rounds: int | None = None) -> tuple[FeatureCache, list]:
  """Greedy backward elimination of refresh rows, minimising the mean squared error of the final
  samples against the uncached sampler on the calibration batch `shape` (same key, same noise).

  Each round evaluates dropping each remaining refresh row (all candidates in one vmapped call)
  and drops the least harmful ones: one per round when `rounds` is None (exact greedy, one round
  per row removed), else about `(refreshes - num_refresh) / rounds` per round, to bound the cost.
  Returns (schedule, [(refreshes, error)] along the path)."""
  check_key(key)
  rows = _rows(solver, schedule, steps)
  _check_budget(num_refresh, rows)
  if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
    raise ValueError(f"rounds: expected None or an int >= 1, got {rounds!r}")
  ref = sample_masked(key, denoiser, schedule, solver, shape, steps=steps,
                      flags=np.ones(rows, bool), cond=cond, guidance=guidance)
  current = np.ones(rows, bool)
  path = [(rows, 0.0)]
  per_round = 1 if rounds is None else max(1, -(-(rows - num_refresh) // rounds))
  while current.sum() > num_refresh:
    candidates = np.array([i for i in np.flatnonzero(current) if i > 0])
    flags = np.repeat(current[None], len(candidates), axis=0)
    flags[np.arange(len(candidates)), candidates] = False
    outs = sample_masked(key, denoiser, schedule, solver, shape, steps=steps, flags=flags,
                         cond=cond, guidance=guidance)
    errors = np.asarray(jnp.mean(jnp.square(outs - ref[None]), axis=tuple(range(1, outs.ndim))))
    drop = candidates[np.argsort(errors)[: min(per_round, int(current.sum()) - num_refresh)]]
    current = current.copy()
    current[drop] = False
    if len(drop) == 1:
      err = float(errors[np.argsort(errors)[0]])
    else:  # the joint effect of several removals is not the sum: measure it
      err = float(jnp.mean(jnp.square(sample_masked(
          key, denoiser, schedule, solver, shape, steps=steps, flags=current, cond=cond,
          guidance=guidance) - ref)))
    path.append((int(current.sum()), err))
  return FeatureCache(tuple(bool(f) for f in current)), path


def _rows(solver, schedule, steps) -> int:
  return len(solver.table(schedule, steps)["t"])
