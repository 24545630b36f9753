"""The SequenceModel contract for the recurrent families with a kept state history (RWKV-7 and
TransNormerLLM), each against its own other form: prefill-then-step against one longer prefill,
rollback against stepping one by one, ragged rows against the row alone (padding replaced by other
tokens, so a leak would show), greedy `generate` against a greedy chain of padded prefills."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.models.rwkv import rwkv7_model
from jaxinf.models.transnormer import transnormer_model
from sequence_contract import check_select
from test_rwkv import CFG as RWKV_CFG
from test_transnormer import CFG as TRANSNORMER_CFG

ATOL = 2e-5  # fp32, two different evaluation orders of the same recurrence
FAMILIES = {"rwkv7": (rwkv7_model, RWKV_CFG), "transnormer": (transnormer_model, TRANSNORMER_CFG)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm(request):
  build, cfg = FAMILIES[request.param]
  model, params = build(cfg, jax.random.key(0))
  return model, params, jax.jit(model.prefill), jax.jit(model.step), jax.jit(model.rollback)


def _tokens(model, b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, model.vocab_size, jnp.int32)


def test_prefill_then_step_equals_longer_prefill(lm):
  model, params, prefill, step, _ = lm
  toks = _tokens(model, 2, 9)
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
  toks = _tokens(model, 2, 10, seed=2)
  _, base = prefill(params, toks[:, :3], model.init_cache(2, 16), jnp.array([3, 3]))
  # draft 4 tokens, keep 1 in row 0 and 3 in row 1, then continue with different tokens
  _, cache = step(params, toks[:, 3:7], base)
  cache = rollback(cache, jnp.array([1, 3], jnp.int32))
  np.testing.assert_array_equal(cache["length"], [4, 6])
  new = _tokens(model, 2, 2, seed=3)
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


def test_select_reorders_and_repeats_rows_exactly(lm):
  model, params = lm[:2]
  seq = np.asarray(_tokens(model, 3, 11, seed=4))
  check_select(model, params, seq, prompt_len=5, k=3, rows=[2, 0, 0, 1], keep=[0, 3, 1, 2])


def test_ragged_batch_rows_equal_alone(lm):
  model, params, prefill, step, _ = lm
  toks = _tokens(model, 2, 8, seed=4)
  lengths = jnp.array([5, 8], jnp.int32)
  logits, cache = prefill(params, toks, model.init_cache(2, 16), lengths)
  nxt = _tokens(model, 2, 1, seed=5)
  stepped, _ = step(params, nxt, cache)
  for row in (0, 1):
    n = int(lengths[row])
    # the row alone, its padding replaced by other tokens (padding must not matter)
    alone = jnp.where(jnp.arange(8) < n, toks[row], (toks[row] + 7) % model.vocab_size)
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
