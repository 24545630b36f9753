"""quantize_params (selection, bytes report, bad input), AdaRound against round-to-nearest on the
calibration objective (recomputed in float64), and the matmul-input recorder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.quant import QArray, QuantConfig, param_bytes, quantize_params
from jaxinf.quant.adaround import AdaRoundConfig, adaround, record_matmul_inputs
from tests.bad_input import raises_before_tracing

RNG = np.random.default_rng(0)


def _tree():
  f = lambda *s: jnp.asarray(RNG.normal(size=s).astype(np.float32))
  return {"embed_tokens": {"embedding": f(10, 16)},
          "layers": [{"mlp": {"up": {"kernel": f(16, 32)}, "down": {"kernel": f(32, 16)}},
                      "norm": {"weight": f(16)}}],
          "lm_head": {"kernel": f(16, 10)}}


def _apply(p, x):
  h = x @ p["layers"][0]["mlp"]["up"]["kernel"]
  return jax.nn.relu(h) @ p["layers"][0]["mlp"]["down"]["kernel"]


def test_quantize_params_selection_and_bytes():
  p = _tree()
  q, rep = quantize_params(p, QuantConfig(format="int4", group_size=8))
  assert [leaf.path for leaf in rep.leaves] == ["layers/0/mlp/down/kernel",
                                                "layers/0/mlp/up/kernel"]
  assert isinstance(q["layers"][0]["mlp"]["up"]["kernel"], QArray)
  assert q["lm_head"]["kernel"] is p["lm_head"]["kernel"]
  # 512 weights per kernel: 256 packed bytes + (512 / 8) fp32 scales.
  per_kernel = 256 + 4 * 64
  assert rep.bytes_before == 4 * (160 + 512 + 512 + 16 + 160)
  assert rep.bytes_after == rep.bytes_before - 2 * (4 * 512 - per_kernel) == param_bytes(q)
  _, rep_all = quantize_params(p, QuantConfig(format="int8", exclude=()))
  assert len(rep_all.leaves) == 3  # the head too; the embedding table is not a kernel


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1"])
def test_adaround_never_worse_than_nearest(fmt):
  w = RNG.normal(size=(24, 8)).astype(np.float32)
  base = RNG.normal(size=(128, 6)).astype(np.float32)
  x = base @ RNG.normal(size=(6, 24)).astype(np.float32) + 0.1 * RNG.normal(size=(128, 24))
  x = x.astype(np.float32)  # correlated inputs: where learned rounding pays
  res = adaround(w, x, fmt, config=AdaRoundConfig(iterations=300))

  def objective(w_hat):
    r = x.astype(np.float64) @ (w.astype(np.float64) - np.asarray(w_hat, np.float64))
    return float(np.mean(r * r))

  from jaxinf.quant.qarray import quantize
  obj_rtn = objective(quantize(w, fmt).dequantize())
  obj_ada = objective(res.weight.dequantize())
  assert obj_ada <= obj_rtn
  assert res.objective_nearest == pytest.approx(obj_rtn, rel=1e-4)
  assert res.learned_kept and obj_ada < 0.8 * obj_rtn  # and it does learn something here


def test_record_matmul_inputs_and_adaround_params():
  p = _tree()
  x = jnp.asarray(RNG.normal(size=(2, 5, 16)).astype(np.float32))
  calib = record_matmul_inputs(jax.jit(lambda pp: _apply(pp, x)), p)
  assert sorted(calib) == ["layers/0/mlp/down/kernel", "layers/0/mlp/up/kernel"]
  np.testing.assert_array_equal(calib["layers/0/mlp/up/kernel"], np.asarray(x).reshape(10, 16))
  h = jax.nn.relu(x @ p["layers"][0]["mlp"]["up"]["kernel"])
  np.testing.assert_allclose(calib["layers/0/mlp/down/kernel"], np.asarray(h).reshape(10, 32),
                             rtol=1e-6)
  cfg = QuantConfig(format="int4", rounding="adaround", adaround=AdaRoundConfig(iterations=50))
  q, rep = quantize_params(p, cfg, calibration=calib)
  for leaf in rep.leaves:
    assert leaf.objective <= leaf.objective_nearest
  assert _apply(q, x).shape == (2, 5, 16)


def test_ptq_bad_input():
  p = _tree()
  with raises_before_tracing(ValueError, "params: no 2-D floating parameter"):
    quantize_params(p, QuantConfig(include=(r"nothing",)))
  with raises_before_tracing(ValueError, "group_size: 5 does not divide"):
    quantize_params(p, QuantConfig(format="int4", group_size=5))
  with raises_before_tracing(ValueError, r"format.*fp3"):
    QuantConfig(format="fp3")
  with raises_before_tracing(ValueError, "calibration.*adaround"):
    quantize_params(p, QuantConfig(rounding="adaround"))
  with raises_before_tracing(TypeError, "config"):
    quantize_params(p, {"format": "int8"})
  with raises_before_tracing(ValueError, "rounding"):
    QuantConfig(rounding="stochastic")
  with raises_before_tracing(ValueError, "params: no 2-D floating"):
    quantize_params({"kernel": jnp.ones((4, 4), jnp.int32)}, QuantConfig())
