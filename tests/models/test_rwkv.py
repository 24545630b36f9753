"""RWKV-7 behind the SequenceModel contract: the recurrent step against the parallel prefill (two
different code paths: `wkv7_step` token by token vs `wkv7`), exact rollback, ragged batches,
`generate`, converter round trip, and bad input. Parity with the `rwkv` package is in
tests/parity/test_rwkv_vs_rwkv_package.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.checkpoints.rwkv import _expected_map, rwkv7_params_from_state_dict
from jaxinf.decoding.generate import generate
from jaxinf.models.rwkv import RWKV7Config, rwkv7_model

CFG = RWKV7Config(vocab_size=40, d_model=32, n_layers=2, head_size=16, d_ffn=48, decay_lora=8,
                  a_lora=8, v_lora=4, gate_lora=8, max_step=4, impl="xla")
ATOL = 2e-5  # fp32, two different evaluation orders of the same recurrence


@pytest.fixture(scope="module")
def lm():
  model, params = rwkv7_model(CFG, jax.random.key(0))
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


def test_converter_round_trip_and_strict_keys(lm):
  model, params, prefill, _, _ = lm
  flat = {}
  for src, (dst, transpose) in _expected_map(CFG).items():
    arr = params
    for part in dst.split("/"):
      arr = arr[int(part) if part.isdigit() else part]
    arr = np.asarray(arr)
    flat[src] = arr.T if transpose else (arr[None, None] if src.split(".")[-1] in (
        "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a") else arr)
  flat["blocks.0.att.v0"] = np.zeros((1, 1, CFG.d_model), np.float32)  # unused in layer 0: dropped
  back = rwkv7_params_from_state_dict(flat, CFG)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  with pytest.raises(ValueError, match=r"missing keys \['head.weight'\]"):
    rwkv7_params_from_state_dict({k: v for k, v in flat.items() if k != "head.weight"}, CFG)
  with pytest.raises(ValueError, match=r"unexpected keys \['blocks.5.att.x_r'\]"):
    rwkv7_params_from_state_dict(dict(flat, **{"blocks.5.att.x_r": flat["blocks.0.att.x_r"]}),
                                 CFG)


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
  short, _ = rwkv7_model(RWKV7Config(**{**CFG.__dict__, "max_len": 4}), jax.random.key(0))
  with pytest.raises(ValueError, match="exceed the model's context of 4"):
    short.prefill(params, jnp.ones((2, 6), jnp.int32), short.init_cache(2, 4),
                  jnp.array([6, 6]))
  _, stepped = step(params, jnp.ones((2, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= the last step's \[2, 2\]"):
    model.rollback(stepped, jnp.array([3, 0]))
  with pytest.raises(ValueError, match="head_size"):
    RWKV7Config(vocab_size=10, d_model=30, n_layers=1, head_size=16)
