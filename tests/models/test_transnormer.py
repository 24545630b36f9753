"""TransNormerLLM behind the SequenceModel contract: the recurrent step (`lightning_attention_step`
token by token) against the parallel prefill (`lightning_attention` plus the closed-form state at
each row's length), exact rollback, ragged batches, `generate`, LRPE's relative-position property,
the decay schedule, and bad input. Parity: tests/parity/test_transnormer_vs_release.py (the
released model code) and tests/parity/test_lightning_vs_minimax.py (transformers' MiniMax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.models.transnormer import (TransNormerConfig, alibi_slopes, layer_decay, lrpe,
                                       transnormer_model)

# LRPE in layer 0 only (as the release's configs do), so both kinds of layer are exercised.
CFG = TransNormerConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, glu_dim=48,
                        lrpe=(True, False, False), scale_embedding=True, max_step=4, impl="xla")
ATOL = 2e-5  # fp32, two different evaluation orders of the same recurrence


@pytest.fixture(scope="module")
def lm():
  model, params = transnormer_model(CFG, jax.random.key(0))
  return model, params, jax.jit(model.prefill), jax.jit(model.step), jax.jit(model.rollback)


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size, jnp.int32)


def test_prefill_then_step_equals_longer_prefill(lm):
  model, params, prefill, step, _ = lm
  toks = _tokens(2, 9)
  full, _ = prefill(params, toks, model.init_cache(2, 16), jnp.array([9, 9]))
  _, cache = prefill(params, toks[:, :4], model.init_cache(2, 16), jnp.array([4, 4]))
  got = []
  for i in (4, 5):
    logits, cache = step(params, toks[:, i:i + 1], cache)
    got.append(logits)
  logits, cache = step(params, toks[:, 6:9], cache)  # k = 3
  got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), full[:, 4:], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(cache["length"], [9, 9])


def test_rollback_then_restep_equals_one_by_one(lm):
  model, params, prefill, step, rollback = lm
  toks = _tokens(2, 10, seed=2)
  _, base = prefill(params, toks[:, :3], model.init_cache(2, 16), jnp.array([3, 3]))
  # draft 4 tokens, keep 1 in row 0 and 3 in row 1, then continue with different tokens
  _, cache = step(params, toks[:, 3:7], base)
  cache = rollback(cache, jnp.array([1, 3], jnp.int32))
  np.testing.assert_array_equal(cache["length"], [4, 6])
  new = _tokens(2, 2, seed=3)
  after, _ = step(params, new, cache)
  for row, keep in ((0, 1), (1, 3)):
    c = jax.tree.map(lambda x: x, base)
    for i in range(keep):
      _, c = step(params, toks[:, 3 + i:4 + i], c)
    want = []
    for i in range(2):
      logits, c = step(params, new[:, i:i + 1], c)
      want.append(logits[row, 0])
    np.testing.assert_allclose(after[row], np.stack(want), atol=ATOL, rtol=0)
  # keep = k restores the full step; keep = 0 the state before it
  _, full = step(params, toks[:, 3:7], base)
  same = rollback(full, jnp.array([4, 4], jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, same["state"], full["state"])
  undone = rollback(full, jnp.array([0, 0], jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, undone["state"], base["state"])
  twice = rollback(rollback(full, jnp.array([3, 2], jnp.int32)), jnp.array([0, 0], jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, twice["state"], base["state"])
  np.testing.assert_array_equal(twice["length"], base["length"])


def test_ragged_batch_rows_equal_alone(lm):
  model, params, prefill, step, _ = lm
  toks = _tokens(2, 8, seed=4)
  lengths = jnp.array([5, 8], jnp.int32)
  logits, cache = prefill(params, toks, model.init_cache(2, 16), lengths)
  nxt = _tokens(2, 1, seed=5)
  stepped, _ = step(params, nxt, cache)
  for row in (0, 1):
    n = int(lengths[row])
    # the row alone, its padding replaced by other tokens (padding must not matter)
    alone = jnp.where(jnp.arange(8) < n, toks[row], (toks[row] + 7) % CFG.vocab_size)
    alone = jnp.broadcast_to(alone, (2, 8))
    want, c = prefill(params, alone, model.init_cache(2, 16), jnp.array([n, n]))
    np.testing.assert_allclose(logits[row, :n], want[0, :n], atol=ATOL, rtol=0)
    want_step, _ = step(params, jnp.broadcast_to(nxt[row], (2, 1)), c)
    np.testing.assert_allclose(stepped[row], want_step[0], atol=ATOL, rtol=0)


def test_generate_greedy_matches_parallel_form(lm):
  model, params, prefill, _, _ = lm
  prompts = [[1, 2, 3, 4, 5], [7, 8]]
  out = generate(model, params, prompts, jax.random.key(0), max_new_tokens=4)
  buf = np.zeros((2, 16), np.int32)
  for row, p in enumerate(prompts):
    seq = list(p)
    for _ in range(4):  # greedy oracle from the parallel form: one padded prefill per token
      buf[0, :len(seq)] = seq
      logits, _ = prefill(params, jnp.asarray(buf), model.init_cache(2, 16),
                          jnp.array([len(seq), len(seq)], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    np.testing.assert_array_equal(out.tokens[row], seq[len(p):])


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


def test_bad_input_raises(lm):
  model, params, _, step, _ = lm
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match=r"tokens: token ids \[40\] outside the vocabulary"):
    model.prefill(params, jnp.array([[1, 40], [1, 2]]), cache, jnp.array([2, 2]))
  with pytest.raises(TypeError, match="tokens: expected integer token ids"):
    model.prefill(params, jnp.zeros((2, 3)), cache, jnp.array([3, 3]))
  with pytest.raises(ValueError, match="lengths: expected values in"):
    model.prefill(params, jnp.ones((2, 3), jnp.int32), cache, jnp.array([3, 4]))
  with pytest.raises(ValueError, match="exceed max_step=4"):
    model.step(params, jnp.ones((2, 5), jnp.int32), cache)
  with pytest.raises(ValueError, match="max_len: the longest prompt"):
    generate(model, params, [[1, 2, 3, 4, 5, 6]], jax.random.key(0), max_new_tokens=4, max_len=8)
  short, _ = transnormer_model(TransNormerConfig(**{**CFG.__dict__, "max_len": 4}),
                               jax.random.key(0))
  with pytest.raises(ValueError, match="exceed the model's context of 4"):
    short.prefill(params, jnp.ones((2, 6), jnp.int32), short.init_cache(2, 4),
                  jnp.array([6, 6]))
  _, stepped = step(params, jnp.ones((2, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= the last step's \[2, 2\]"):
    model.rollback(stepped, jnp.array([3, 0]))
  with pytest.raises(ValueError, match="n_layers"):
    TransNormerConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=4)
  with pytest.raises(ValueError, match="lrpe"):
    TransNormerConfig(vocab_size=10, d_model=32, n_layers=2, n_heads=4, lrpe=(True,))


def test_named_small_configs_are_matched_in_size():
  from flax import nnx

  from jaxinf.decoding.tokenizer import ByteTokenizer
  from jaxinf.models.rwkv import RWKV7, RWKV7_1M
  from jaxinf.models.transnormer import TRANSNORMER_1M, TransNormerLLM

  count = lambda make: sum(int(np.prod(x.shape)) for x in
                           jax.tree.leaves(nnx.state(nnx.eval_shape(make))))
  n_rwkv = count(lambda: RWKV7(RWKV7_1M, rngs=nnx.Rngs(0)))
  n_tnl = count(lambda: TransNormerLLM(TRANSNORMER_1M, rngs=nnx.Rngs(0)))
  assert RWKV7_1M.vocab_size == TRANSNORMER_1M.vocab_size == ByteTokenizer().vocab_size
  assert 0.8e6 < n_rwkv < 1.2e6 and 0.8e6 < n_tnl < 1.2e6
  assert abs(n_rwkv - n_tnl) / max(n_rwkv, n_tnl) < 0.05
