"""Sequence-parallel prefill (`jaxinf.parallel.sequence`) equals one device (8 forced host devices:
tests/conftest.py).

LASP-2 (Sun et al. 2025) against `pallas_kernels.lightning_attention` on one device (its XLA form,
the same per-chunk op), outputs and final state; Ring Attention (Liu et al. 2023) against
`pallas_kernels.attention` (reference form), causal, non-causal and GQA. Meshes: sequence=8 and
data=2 x sequence=4.

Tolerance (fp32): atol 1e-5 + rtol 1e-5 (kernel_checks.TOL for fp32): the sharded forms sum the
same terms in another order (the prefix state as a sum of chunk states; the softmax over blocks
with an online rescale), and outputs are O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxinf.parallel import mesh as mesh_lib
from jaxinf.parallel import sequence

TOL = {"atol": 1e-5, "rtol": 1e-5}
B, T, H, D = 2, 32, 4, 8
# near 0, moderate, near 1, exactly 1
DECAY = np.array([1e-3, 0.5, 0.99, 1.0], np.float32)
MESHES = {"seq8": {"sequence": 8}, "data2_seq4": {"data": 2, "sequence": 4}}


@pytest.fixture(scope="module")
def meshes():
  return {name: mesh_lib.make_mesh(**sizes) for name, sizes in MESHES.items()}


@pytest.fixture(scope="module")
def qkv():
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (0.3 * jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys[:3])
  state = jax.random.normal(keys[3], (B, H, D, D), jnp.float32)
  return q, k, v, jnp.asarray(DECAY), state


@pytest.fixture(scope="module")
def lightning_oracle(qkv):
  q, k, v, decay, state = qkv
  return {init: pallas_kernels.lightning_attention(
      q, k, v, decay, initial_state=state if init else None, return_final_state=True, impl="xla")
      for init in (False, True)}


# (mesh, initial state): each mesh with a state, and the zero-state path once
@pytest.mark.parametrize("mesh_name,init",
                         [("seq8", False), ("seq8", True), ("data2_seq4", True)])
def test_lasp2_equals_one_device(meshes, qkv, lightning_oracle, mesh_name, init):
  q, k, v, decay, state = qkv
  mesh = meshes[mesh_name]
  out, final = jax.jit(lambda q, k, v, d, s: sequence.lasp2_lightning_attention(
      q, k, v, d, mesh=mesh, initial_state=s if init else None, impl="xla"))(q, k, v, decay, state)
  want_out, want_final = lightning_oracle[init]
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), **TOL)
  np.testing.assert_allclose(np.asarray(final), np.asarray(want_final), **TOL)
  assert out.sharding.spec[1] == "sequence"


def test_prefix_free_chunks_differ(qkv, lightning_oracle):
  """Negative control: the chunks of sequence=8 run from zero states (LASP-2 without its prefix
  term) miss the one-device outputs by far more than TOL, so the tests above would catch it."""
  q, k, v, decay, _ = qkv
  chunk = T // 8
  parts = [pallas_kernels.lightning_attention(q[:, s:s + chunk], k[:, s:s + chunk],
                                              v[:, s:s + chunk], decay, impl="xla")
           for s in range(0, T, chunk)]
  want = np.asarray(lightning_oracle[False][0])
  gap = np.abs(np.asarray(jnp.concatenate(parts, axis=1)) - want).max()
  assert gap > 100 * (TOL["atol"] + TOL["rtol"] * np.abs(want).max())


# (mesh, causal, kv heads): causal and not, full heads and GQA (2 query heads per key head)
@pytest.mark.parametrize("mesh_name,causal,kv_heads",
                         [("seq8", True, H), ("seq8", False, 2), ("data2_seq4", True, 2)])
def test_ring_attention_equals_one_device(meshes, qkv, mesh_name, causal, kv_heads):
  q, k, v, _, _ = qkv
  k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
  out = sequence.ring_attention(q, k, v, mesh=meshes[mesh_name], causal=causal)
  want = pallas_kernels.attention(q, k, v, causal=causal, impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOL)
  assert out.sharding.spec[1] == "sequence"


def test_errors_before_tracing(meshes, qkv):
  q, k, v, decay, _ = qkv
  mesh = meshes["seq8"]
  short = slice(0, T - 4)  # 28 positions: not divisible by 8
  with pytest.raises(ValueError, match="q: the length T=28"):
    sequence.lasp2_lightning_attention(q[:, short], k[:, short], v[:, short], decay, mesh=mesh)
  with pytest.raises(ValueError, match="q: the length T=28"):
    sequence.ring_attention(q[:, short], k[:, short], v[:, short], mesh=mesh)
  no_sequence = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="axis: expected a mesh axis name"):
    sequence.lasp2_lightning_attention(q, k, v, decay, mesh=no_sequence)
  with pytest.raises(ValueError, match="axis: expected a mesh axis name"):
    sequence.ring_attention(q, k, v, mesh=no_sequence)


def test_transnormer_prefill_built_from_lasp2(meshes, monkeypatch):
  """A whole TransNormerLLM prefill whose lightning attention is LASP-2 on sequence=8 equals the
  model's own prefill (logits and per-layer states), ragged lengths included."""
  from jaxinf.models import transnormer
  from tests.decoding.families import tiny_model

  model, params = tiny_model("transnormer")
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 16)
  lengths = jnp.array([16, 11], jnp.int32)
  want_logits, want_cache = model.prefill(params, tokens, model.init_cache(2, 32), lengths)
  calls = []

  def lasp2(q, k, v, decay, *, initial_state=None, impl="auto", interpret=False):
    calls.append(q.shape)
    return sequence.lasp2_lightning_attention(q, k, v, decay, mesh=meshes["seq8"],
                                              initial_state=initial_state, impl=impl,
                                              interpret=interpret)[0]

  monkeypatch.setattr(transnormer, "lightning_attention", lasp2)
  logits, cache = model.prefill(params, tokens, model.init_cache(2, 32), lengths)
  assert len(calls) == 2  # one per layer: the sharded form really ran
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), **TOL)
  for got, want in zip(cache["state"]["kv"], want_cache["state"]["kv"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_transformer_prefill_built_from_ring_attention(meshes, monkeypatch):
  """A whole transformer prefill (GQA: 4 query heads, 2 key heads) whose attention is Ring
  Attention on data=2 x sequence=4 equals the model's own causal logits. Full-length rows, so the
  prefill's kv_lengths mask nothing and the ring form (which takes none) computes the same."""
  from jaxinf.models import transformer
  from tests.decoding.families import tiny_model

  model, params = tiny_model("transformer")
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 16)
  want = model(params, tokens)
  calls = []

  def ring(q, k, v, *, causal, kv_lengths=None, impl="auto", interpret=False, **_):
    calls.append(q.shape)
    return sequence.ring_attention(q, k, v, mesh=meshes["data2_seq4"], causal=causal)

  monkeypatch.setattr(transformer.mesh_kernels, "attention", ring)
  logits, _ = model.prefill(params, tokens, model.init_cache(2, 32), jnp.full((2,), 16, jnp.int32))
  assert len(calls) == 2  # one per layer: the sharded form really ran
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), **TOL)
