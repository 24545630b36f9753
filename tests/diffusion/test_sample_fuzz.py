"""Hypothesis fuzz of `sample`: a named error, or a finite sample of the requested shape.

Draws the solver (by name, every one in `solvers.SOLVERS`), steps (including 0, 1, T-1, T, T+1
and non-ints), shapes (including zeros, negatives, floats, too few dims), the key (a key, an int,
a batch of keys), x_init (every dtype kind, wrong shapes, NaN/inf entries) and a guidance scale
(including NaN/inf), always with `check_finite=True`. The outcome must be one of: a
ValueError/TypeError whose message starts with the argument's name ("name: ..."), a
`NonFiniteSampleError` (only when non-finite values were put in), or finite output of exactly
`shape`. Never another exception, never a silent NaN. The denoiser is closed-form (an exact
posterior-mean-like linear map), so examples compile in well under a second; few examples and a
small value set keep the number of distinct compiled loops down.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import NonFiniteSampleError, sample

T = 50
NAMED = re.compile(r"^[A-Za-z_][A-Za-z_0-9, ]*:")  # "steps: ...", "beta_start, beta_end: ..."


def _apply(params, x, t, cond):
  del params, cond
  return 0.5 * x * (t.reshape((-1,) + (1,) * (x.ndim - 1)) + 1.0) / (T + 1.0)


def _cond_apply(params, x, t, cond):
  return _apply(params, x, t, None) + 0.01 * cond.reshape((-1,) + (1,) * (x.ndim - 1))


VP = Denoiser({}, DenoiserSpec(_apply))
FLOW = Denoiser({}, DenoiserSpec(_apply, prediction_type="flow"))
COND = Denoiser({}, DenoiserSpec(_cond_apply, num_classes=3, null_cond=3))

DTYPES = [np.float32, np.float16, np.int32, np.complex64, np.bool_]
dim = st.sampled_from([1, 2, 3, 0, -1, 2.0])


@st.composite
def requests(draw):
  name = draw(st.sampled_from(sorted(solvers.SOLVERS)))
  steps = draw(st.sampled_from([1, 2, 3, T - 1, T, 0, T + 1, 2.0, True, None]))
  shape = tuple(draw(st.lists(dim, min_size=1, max_size=3)))
  key_kind = draw(st.sampled_from(["key", "key", "key", "int", "batch"]))
  x_kind = draw(st.sampled_from(["none", "none", "good", "good", "dtype", "shape", "nonfinite"]))
  guided = draw(st.sampled_from([None, None, 2.0, float("nan"), float("inf")]))
  return name, steps, shape, key_kind, x_kind, guided, draw(st.sampled_from(DTYPES))


def _build(name, steps, shape, key_kind, x_kind, guided, dtype):
  flow = name.startswith("flow")
  schedule = schedules.FlowSchedule(T) if flow else schedules.NoiseSchedule("linear", T)
  denoiser = FLOW if flow else (COND if guided is not None else VP)
  key = {"key": jax.random.key(0), "int": 0,
         "batch": jax.random.split(jax.random.key(0), 2)}[key_kind]
  good_shape = all(isinstance(d, int) and d > 0 for d in shape) and len(shape) >= 2
  x_init, nonfinite = None, False
  if x_kind != "none":
    x_shape = shape if good_shape else (2, 2)
    if x_kind == "shape":
      x_shape = (*x_shape[:-1], x_shape[-1] + 1)
    x = np.random.default_rng(0).standard_normal(x_shape)
    if x_kind == "nonfinite":
      x.flat[0] = np.nan
      nonfinite = True
    x_init = x.astype(dtype if x_kind == "dtype" else np.float32)
    if x_kind == "nonfinite" or x_kind != "dtype":
      x_init = x_init.astype(np.float32)
  kw = dict(steps=steps, x_init=x_init, check_finite=True)
  if guided is not None and not flow:
    kw["cond"] = jnp.zeros(shape[0] if good_shape else 1, jnp.int32)
  return key, denoiser, schedule, solvers.make_solver(name), shape, kw, guided, nonfinite


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_sample_is_named_error_or_finite(request):
  name, *_ = request
  key, denoiser, schedule, solver, shape, kw, guided, nonfinite = _build(*request)
  try:
    if guided is not None:
      kw["guidance"] = CFG(guided)
    out = sample(key, denoiser, schedule, solver, shape, **kw)
  except NonFiniteSampleError as e:
    event("non-finite reported")
    assert nonfinite, f"{name}: non-finite values reported from finite input: {e}"
    return
  except (TypeError, ValueError) as e:
    message = str(e)
    event(f"refused: {message.split(':')[0]}")
    # Python's own "sample() got an unexpected keyword" is not expected here: all names are valid
    assert NAMED.match(message), f"{name}: unnamed error {type(e).__name__}: {message}"
    return
  assert not nonfinite, f"{name}: NaN x_init passed check_finite silently"
  event("sampled")
  out = np.asarray(out)
  assert out.shape == tuple(shape), (out.shape, shape)
  assert np.isfinite(out).all(), f"{name}: silent non-finite output for {request}"
