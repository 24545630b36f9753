"""TransNormerLLM: LRPE's relative-position property, the decay schedule, bad input, matched
sizes. The contract checks (`lightning_attention_step` token by token against the parallel prefill
with the closed-form state at each row's length, exact rollback, ragged batches, `generate`, bad
input) run for every family in tests/models/test_families.py. Parity:
tests/parity/test_transnormer_vs_release.py (the released model code) and
tests/parity/test_lightning_vs_minimax.py (transformers' MiniMax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models.transnormer import TransNormerConfig, alibi_slopes, layer_decay, lrpe


def test_decay_schedule():
  # ALiBi slopes 2^(-8(h+1)/H) for a power of two; the layer scale (1 - l/(L-1) + 1e-5)
  np.testing.assert_allclose(alibi_slopes(4), 2.0 ** (-8 * np.arange(1, 5) / 4), rtol=1e-15)
  np.testing.assert_allclose(alibi_slopes(6)[:4], alibi_slopes(4), rtol=1e-15)
  np.testing.assert_allclose(alibi_slopes(6)[4:], alibi_slopes(8)[0:4:2], rtol=1e-15)
  np.testing.assert_allclose(layer_decay(4, 0, 3), np.exp(-alibi_slopes(4) * (1 + 1e-5)),
                             rtol=1e-7)
  np.testing.assert_allclose(layer_decay(4, 2, 3), np.exp(-alibi_slopes(4) * 1e-5), rtol=1e-7)


def test_lrpe_is_relative():
  # q_t . k_s depends on t - s only
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  theta = jax.random.uniform(jax.random.key(1), (1, 8))
  enc = lambda x, t: lrpe(x, theta, jnp.array([[t]]))
  dot = lambda t, s: float(jnp.sum(enc(q, t) * enc(k, s)))
  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  assert abs(dot(7, 3) - dot(7, 5)) > 1e-3


def test_bad_config_raises():
  with pytest.raises(ValueError, match="n_layers"):
    TransNormerConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=4)
  with pytest.raises(ValueError, match="lrpe"):
    TransNormerConfig(vocab_size=10, d_model=32, n_layers=2, n_heads=4, lrpe=(True,))


def test_named_small_configs_are_matched_in_size():
  from flax import nnx

  from jaxinf.data.tokenizer import ByteTokenizer
  from jaxinf.models.rwkv import RWKV7, RWKV7_1M
  from jaxinf.models.transnormer import TRANSNORMER_1M, TransNormerLLM

  count = lambda make: sum(int(np.prod(x.shape)) for x in
                           jax.tree.leaves(nnx.state(nnx.eval_shape(make))))
  n_rwkv = count(lambda: RWKV7(RWKV7_1M, rngs=nnx.Rngs(0)))
  n_tnl = count(lambda: TransNormerLLM(TRANSNORMER_1M, rngs=nnx.Rngs(0)))
  assert RWKV7_1M.vocab_size == TRANSNORMER_1M.vocab_size == ByteTokenizer().vocab_size
  assert 0.8e6 < n_rwkv < 1.2e6 and 0.8e6 < n_tnl < 1.2e6
  assert abs(n_rwkv - n_tnl) / max(n_rwkv, n_tnl) < 0.05
