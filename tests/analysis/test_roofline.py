"""The roofline's FLOP counts against XLA's, and its devices, predictions and bad input.

The independent source is XLA's `HloCostAnalysis` of the very function jaxinf runs (each family's
`prefill` and `step`, the DiT's forward), taken on the program with its loops unrolled
(`tests/analysis/xla_flops.py`: XLA counts a loop body once). XLA counts a matmul as 2 m k n and
every elementwise add / multiply / compare / select and reduced element as one flop, exactly the
convention `jaxinf.analysis.roofline` counts in: it itemises the matmuls, attention's masked
softmax, norms, activations, masks and residual adds of each layer, read from the model files.

Margin: 2% of XLA's flops, 1% of its transcendentals (measured on JAX 0.10.2 and 0.12: flops
-0.03% for the DiT, -0.5% to -1.3% for the language models at the "-tiny" sizes, where a layer
is only 32 channels wide so per-row scalars weigh most; transcendentals exact but TransNormer's
+0.04%). What is left of the flops is the scalar and per-row bookkeeping the roofline does
not itemise: loop counters, position and length arithmetic (`positions < lengths`,
`lengths + arange`), the per-row constants of norms (the mean's division, + eps), index math of
the cache writes and the guards of normalisations. It is O(rows) against the counted
O(rows x width), so it shrinks as models widen. The margin catches a wrong matmul shape, a
missed pass over the recurrent state or the attention scores (one missed op per Mamba state
element was 2.3%), or dead code counted as work (TransNormer's unreturned kernel state was 4%);
a single missed op over the 32-wide hidden vector (~0.1%) is below it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxinf.analysis import roofline as rl
from jaxinf.models import families
from jaxinf.models.dit import DiT, dit_config
from jaxinf.models.functional import to_functional
from tests.analysis.xla_flops import cost, unrolled
from tests.bad_input import raises_before_tracing

B, T = 2, 16
FLOP_MARGIN, TRANS_MARGIN = 0.02, 0.01
TINY = ("transformer-tiny", "mamba-tiny", "rwkv7-tiny", "transnormer-tiny")


@pytest.fixture(scope="module", params=TINY)
def family_costs(request):
  """(model, {mode: XLA's cost}) of a family's prefill of B x T tokens into a fresh cache of T
  slots, and a decode step of one token per row at cache length T - 1 (every output returned,
  the cache too, so XLA counts no dead code away). Built with impl="xla": the roofline counts the
  XLA form's ops, and on CPU impl="auto" runs the transformer's decode attention as a custom call
  (`jaxinf.models.cpu_attention`), whose work XLA's cost analysis cannot see."""
  model, params = families.build(request.param, seed=0, impl="xla")
  cache = model.init_cache(B, T)
  tokens = jnp.ones((B, T), jnp.int32)
  lengths = jnp.full((B,), T, jnp.int32)
  decode_cache = dict(cache, length=jnp.full((B,), T - 1, jnp.int32))
  costs = {
      "prefill": cost(lambda p, t, c, l: model.prefill(p, t, c, l), params, tokens, cache,
                      lengths),
      "decode": cost(lambda p, t, c: model.step(p, t, c), params, tokens[:, :1], decode_cache),
  }
  return model, costs


@pytest.fixture(scope="module")
def dit_cost():
  cfg = dit_config("DiT-tiny")
  apply, params = to_functional(DiT(cfg, rngs=nnx.Rngs(0)))
  x = jnp.ones((B,) + cfg.sample_shape)
  return cfg, cost(apply, params, x, jnp.ones((B,)), jnp.ones((B,), jnp.int32))


def _close(ours, xla, margin):
  return abs(ours - xla) <= margin * xla


@pytest.mark.parametrize("mode", rl.MODES)
def test_family_flops_match_xla(family_costs, mode):
  model, costs = family_costs
  ours = rl.totals(rl.count(model, mode, B, T, "float32"))
  xla = costs[mode]
  assert _close(ours["flops"], xla["flops"], FLOP_MARGIN), (ours, xla)
  assert _close(ours["transcendentals"], xla["transcendentals"], TRANS_MARGIN), (ours, xla)


def test_dit_forward_flops_match_xla(dit_cost):
  cfg, xla = dit_cost
  ours = rl.totals(rl.count(cfg, batch=B, dtype="float32"))
  assert _close(ours["flops"], xla["flops"], FLOP_MARGIN), (ours, xla)
  assert _close(ours["transcendentals"], xla["transcendentals"], TRANS_MARGIN), (ours, xla)


def test_xla_counts_a_loop_body_once():
  """Why the comparison unrolls: XLA's count of a 10-step scan of matmuls is one matmul's."""
  def ten_matmuls(x):
    return jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=10)[0]
  x = jnp.ones((32, 32))
  once = jax.jit(ten_matmuls).lower(x).cost_analysis()
  once = once[0] if isinstance(once, list) else once
  assert once["flops"] < 2 * 2 * 32**3
  assert cost(ten_matmuls, x)["flops"] == pytest.approx(10 * 2 * 32**3)
  assert jnp.allclose(unrolled(ten_matmuls)(x), ten_matmuls(x))


def test_layer_kinds_cover_every_family():
  """Every family's ops carry a known kind, and the matmul-heavy kinds are present."""
  for size in TINY:
    kinds = {op.kind for op in rl.count(size, "decode", 1, 8)}
    assert kinds <= set(rl.KINDS), kinds
    assert {"embedding", "norm", "head"} <= kinds
    assert kinds & {"attn_core", "mixer_core"} and kinds & {"attn_proj", "mixer_proj"}
  dit_kinds = {op.kind for op in rl.count("DiT-S/2", batch=8)}
  assert {"embedding", "adaln", "norm", "attn_proj", "attn_core", "mlp", "head"} == dit_kinds


def test_predictions_follow_the_roofline():
  dev = rl.Device("toy", peak_flops=100.0, bandwidth=10.0)  # ridge: 10 flop/byte
  fast = rl.predict_op(rl.Op("a", "mlp", 0, flops=1000.0, transcendentals=0.0, bytes=10.0), dev)
  slow = rl.predict_op(rl.Op("b", "norm", 0, flops=10.0, transcendentals=0.0, bytes=100.0), dev)
  assert (fast.bound, fast.seconds, fast.intensity) == ("compute", 10.0, 100.0)
  assert (slow.bound, slow.seconds, slow.intensity) == ("memory", 10.0, 0.1)
  total = rl.total([rl.Op("a", "mlp", 0, 1000.0, 0.0, 10.0), rl.Op("b", "norm", 0, 10.0, 0.0,
                                                                      100.0)], dev)
  assert total.seconds == 20.0 and total.flops == 1010.0 and total.bytes == 110.0


def test_decode_is_memory_bound_and_batching_raises_intensity():
  """The LLM-Viewer picture on the data-sheet devices: decode at batch 1 streams the weights
  (intensity ~1 flop/byte at bf16), 64 rows reuse them; a long prefill of a 7B-wide layer stack
  is compute-bound (the 384-wide code model's prefill stays under the H100's ridge of ~295
  flop/byte: its per-layer activation traffic is as large as its weights')."""
  for name in rl.DEVICES:
    one = rl.total(rl.count("transformer-12m", "decode", 1, 1024), name)
    many = rl.total(rl.count("transformer-12m", "decode", 64, 1024), name)
    assert one.bound == "memory" and many.intensity > one.intensity
  wide = families.named_config("transformer-12m", hidden_size=4096, mlp_hidden=11008,
                                num_heads=32, num_kv_heads=8, num_layers=2)
  prefill = rl.total(rl.count(wide, "prefill", 8, 1024), "h100-sxm")
  assert prefill.bound == "compute"


def test_weights_dominate_decode_bytes_at_batch_one():
  """At batch 1 and a short cache, decode's bytes are mostly the parameters at the dtype."""
  model, params = families.build("transformer-1m", seed=0)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  ops = rl.count(model, "decode", 1, 8, "bfloat16")
  nbytes = rl.totals(ops)["bytes"]
  assert 2 * n_params <= nbytes <= 1.2 * 2 * n_params


def test_device_table():
  for dev in rl.DEVICES.values():
    assert dev.peak_flops > 1e14 and dev.bandwidth > 5e11 and dev.source
  assert rl.DEVICES["h200"].bandwidth > rl.DEVICES["h100-sxm"].bandwidth
  assert rl.get_device("tpu-v6e") is rl.DEVICES["tpu-v6e"]


def test_measure_host_is_positive_and_finite():
  dev = rl.measure_host(matmul_size=256, copy_mib=8, repeats=2)
  assert math.isfinite(dev.peak_flops) and dev.peak_flops > 1e8
  assert math.isfinite(dev.bandwidth) and dev.bandwidth > 1e8


BAD = [
    (lambda: rl.count("gpt-9b"), ValueError, r"^model: unknown model 'gpt-9b'"),
    (lambda: rl.count(object()), TypeError, r"^model: "),
    (lambda: rl.count("transformer-tiny", batch=0), ValueError, r"^batch: expected >= 1, got 0"),
    (lambda: rl.count("transformer-tiny", batch=2.0), TypeError, r"^batch: "),
    (lambda: rl.count("transformer-tiny", seq=0), ValueError, r"^seq: "),
    (lambda: rl.count("transformer-tiny", dtype="float8"), ValueError, r"^dtype: .*'float8'"),
    (lambda: rl.count("transformer-tiny", mode="train"), ValueError, r"^mode: "),
    (lambda: rl.get_device("a100"), ValueError, r"^device: unknown device 'a100'"),
    (lambda: rl.predict([], "tpu-v4"), ValueError, r"^device: "),
    (lambda: rl.measure_host(repeats=0), ValueError, r"^repeats: "),
    (lambda: rl.measure_host(matmul_size=8), ValueError, r"^matmul_size: "),
]


@pytest.mark.parametrize("call,error,names", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_a_named_error(call, error, names):
  with raises_before_tracing(error, names):
    call()


def test_workload_is_frozen():
  w = rl.Workload("decode", 1, 8)
  with pytest.raises(dataclasses.FrozenInstanceError):
    w.batch = 2
