"""Checks of the SequenceModel contract (`jaxinf.models.functional`) that every language-model
family must pass, and the tiny models they run on (`CONTRACT_MODELS`); tests/models/test_families.py
runs them on every family the registry (`jaxinf.models.families`) holds.

The independent source in each is the model's other form: the cache-free forward (`model(params,
tokens)`), a longer prefill, or the one-token step, never the checked call against itself.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding.generate import generate
from jaxinf.models.mamba import MambaConfig
from jaxinf.models.rwkv import RWKV7Config
from jaxinf.models.transformer import TransformerConfig
from jaxinf.models.transnormer import TransNormerConfig

# Tiny models at decisive scales (logits of order 1-10, so a wrong mask, position or state shows):
# case id -> (config, model options). Every registered family has at least one case.
TRANSFORMER_CFG = TransformerConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, mlp_hidden=64, max_len=48, init_std=0.2)
MAMBA_CFG = MambaConfig(vocab_size=64, hidden_size=32, num_layers=2, state_size=8, init_std=0.5)
RWKV7_CFG = RWKV7Config(vocab_size=40, d_model=32, n_layers=2, head_size=16, d_ffn=48,
                        decay_lora=8, a_lora=8, v_lora=4, gate_lora=8)
# LRPE in layer 0 only (as the release's configs do), so both kinds of layer are exercised.
TRANSNORMER_CFG = TransNormerConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, glu_dim=48,
                                    lrpe=(True, False, False), scale_embedding=True)
CONTRACT_MODELS = {
    "transformer-untied": (TRANSFORMER_CFG, {}),
    "transformer-tied": (dataclasses.replace(TRANSFORMER_CFG, tie_embeddings=True), {}),
    "mamba-tied": (MAMBA_CFG, {"max_step": 4}),
    "mamba-untied-biases": (dataclasses.replace(MAMBA_CFG, tie_embeddings=False, use_bias=True,
                                                use_conv_bias=False, conv_kernel=3),
                            {"max_step": 4}),
    "rwkv7": (RWKV7_CFG, {"max_step": 4, "impl": "xla"}),
    "transnormer": (TRANSNORMER_CFG, {"max_step": 4, "impl": "xla"}),
}

# fp32 on CPU: different association orders of the same sums (chunked scan vs per-token update,
# flash-style attention vs a one-query softmax) differ by a few ulps of the logits (|logit| ~ 10).
ATOL = 2e-5


def random_tokens(model, shape, seed: int) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, model.vocab_size),
                    np.int32)


def copied(cache):
  """A copy of `cache` to step: a family's `step` may donate its cache (the transformer's does),
  and a check that steps twice from one cache keeps the original."""
  return jax.tree.map(jnp.copy, cache)


def step_one_by_one(model, params, cache, tokens: np.ndarray):
  """Logits `[B, n, V]` of stepping `tokens` `[B, n]` one token at a time from a copy of `cache`
  (which stays valid), and the final cache."""
  cache = copied(cache)
  out = []
  for j in range(tokens.shape[1]):
    logits, cache = model.step(params, jnp.asarray(tokens[:, j:j + 1]), cache)
    out.append(np.asarray(logits[:, 0]))
  return np.stack(out, axis=1), cache


def check_prefill_then_step(model, params, seq: np.ndarray, prompt_len: int, chunk: int):
  """prefill(seq[:, :P]) then steps of `chunk` tokens == one prefill of the whole of seq, and both
  equal the cache-free forward."""
  b, t = seq.shape
  full = np.asarray(model(params, jnp.asarray(seq)))
  lengths = jnp.full((b,), t, jnp.int32)
  long_logits, _ = model.prefill(params, jnp.asarray(seq), model.init_cache(b, t), lengths)
  np.testing.assert_allclose(np.asarray(long_logits), full, rtol=0, atol=ATOL)

  cache = model.init_cache(b, t)
  logits, cache = model.prefill(params, jnp.asarray(seq[:, :prompt_len]), cache,
                                jnp.full((b,), prompt_len, jnp.int32))
  pieces = [np.asarray(logits)]
  for start in range(prompt_len, t, chunk):
    logits, cache = model.step(params, jnp.asarray(seq[:, start:start + chunk]), cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(long_logits), rtol=0,
                             atol=ATOL)
  np.testing.assert_array_equal(np.asarray(cache["length"]), np.full((b,), t))


def state_of(model, cache, row: int | None = None):
  """The cache without what only serves rollback (`model.rollback_keys`) or counts tokens; with
  `row`, that row of every leaf (on its declared batch axis)."""
  state = {k: v for k, v in cache.items() if k not in model.rollback_keys + ("length",)}
  if row is None:
    return state
  axes = {k: v for k, v in model.cache_batch_axes(cache).items() if k in state}
  return jax.tree.map(lambda x, axis: np.asarray(jnp.take(x, row, axis=axis)), state, axes)


def check_rollback(model, params, seq: np.ndarray, prompt_len: int, k: int, keep: np.ndarray,
                   n_after: int, compare_state: bool = False):
  """step(k tokens) then rollback(keep) then stepping on == stepping one by one throughout.

  Row b keeps keep[b] of the k drafted tokens and continues with its own next `n_after` tokens
  seq[b, P + keep[b]:]; the reference is every token of seq stepped one at a time. With
  `compare_state` (recurrent families: a KV cache keeps dead slots past its length), the state
  after the rollback must equal the one-by-one state. rollback(k) keeps the whole step,
  rollback(0) restores the state before it, and two rollbacks compose.
  """
  b, t = seq.shape
  assert t >= prompt_len + k + n_after
  lengths = jnp.full((b,), prompt_len, jnp.int32)
  cache0 = model.init_cache(b, t)
  _, cache0 = model.prefill(params, jnp.asarray(seq[:, :prompt_len]), cache0, lengths)
  ref, _ = step_one_by_one(model, params, cache0, seq[:, prompt_len:])

  logits_k, cache = model.step(params, jnp.asarray(seq[:, prompt_len:prompt_len + k]),
                               copied(cache0))
  np.testing.assert_allclose(np.asarray(logits_k), ref[:, :k], rtol=0, atol=ATOL)
  cache = model.rollback(cache, jnp.asarray(keep, jnp.int32))
  np.testing.assert_array_equal(np.asarray(cache["length"]), prompt_len + keep)

  if compare_state:
    for row in range(b):
      row_cache = cache0
      if keep[row]:
        _, row_cache = step_one_by_one(model, params, cache0,
                                       seq[:, prompt_len:prompt_len + keep[row]])
      jax.tree.map(lambda got, want: np.testing.assert_allclose(
          got, want, rtol=0, atol=1e-6, err_msg=f"state of row {row} after rollback"),
                   state_of(model, cache, row), state_of(model, row_cache, row))

  _, full = model.step(params, jnp.asarray(seq[:, prompt_len:prompt_len + k]), copied(cache0))
  same = model.rollback(full, jnp.full((b,), k, jnp.int32))
  undone = model.rollback(full, jnp.zeros((b,), jnp.int32))
  twice = model.rollback(model.rollback(full, jnp.asarray(keep, jnp.int32)),
                         jnp.zeros((b,), jnp.int32))
  np.testing.assert_array_equal(np.asarray(same["length"]), np.asarray(full["length"]))
  for back in (undone, twice):
    np.testing.assert_array_equal(np.asarray(back["length"]), np.asarray(cache0["length"]))
  if compare_state:
    jax.tree.map(np.testing.assert_array_equal, state_of(model, same), state_of(model, full))
    for back in (undone, twice):
      jax.tree.map(np.testing.assert_array_equal, state_of(model, back), state_of(model, cache0))

  rows = np.arange(b)[:, None]
  cont = seq[rows, prompt_len + keep[:, None] + np.arange(n_after)[None]]
  logits_after, _ = step_one_by_one(model, params, cache, cont)
  expected = ref[rows, keep[:, None] + np.arange(n_after)[None]]
  np.testing.assert_allclose(logits_after, expected, rtol=0, atol=ATOL)


def check_ragged_batch(model, params, prompts: list[list[int]], continuation: np.ndarray,
                       pad_id: int):
  """A right-padded batch gives every row the logits it gets alone, in prefill and later steps."""
  b, t = len(prompts), max(len(p) for p in prompts)
  n = continuation.shape[1]
  tokens = np.full((b, t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  cache = model.init_cache(b, t + n)
  logits, cache = model.prefill(params, jnp.asarray(tokens), cache, jnp.asarray(lengths))
  stepped, _ = step_one_by_one(model, params, cache, continuation)
  for i, p in enumerate(prompts):
    alone_cache = model.init_cache(1, t + n)  # one cache shape for all rows: fewer compiles
    alone, alone_cache = model.prefill(params, jnp.asarray([p], jnp.int32), alone_cache,
                                       jnp.asarray([len(p)], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[i, :len(p)]), np.asarray(alone[0]), rtol=0,
                               atol=ATOL, err_msg=f"prefill, row {i}")
    alone_steps, _ = step_one_by_one(model, params, alone_cache, continuation[i:i + 1])
    np.testing.assert_allclose(stepped[i], alone_steps[0], rtol=0, atol=ATOL,
                               err_msg=f"steps, row {i}")


def check_generate_greedy(model, params, prompts: list[list[int]], max_new_tokens: int):
  """`generate` (compiled while_loop, greedy) == a Python loop of argmax over the cache-free
  forward. The forward is causal, so each row's sequence sits right-padded in one fixed-size
  buffer (one compile) and is read at its own last position."""
  out = generate(model, params, prompts, jax.random.key(0), max_new_tokens=max_new_tokens)
  lengths = np.array([len(p) for p in prompts])
  buf = np.zeros((len(prompts), lengths.max() + max_new_tokens), np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  rows = np.arange(len(prompts))
  for j in range(max_new_tokens):
    logits = np.asarray(model(params, jnp.asarray(buf)))
    buf[rows, lengths + j] = np.argmax(logits[rows, lengths + j - 1], axis=-1)
  expected = buf[rows[:, None], lengths[:, None] + np.arange(max_new_tokens)[None]]
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def check_select(model, params, seq: np.ndarray, prompt_len: int, k: int, rows, keep):
  """prefill + a step of k tokens, then `select(rows)` (reordered, repeated rows), `rollback(keep)`
  and a step of each selected row's own next tokens == one prefill (parallel form) of that row."""
  b, t = seq.shape
  n = t - prompt_len - k
  rows, keep = np.asarray(rows, np.int32), np.asarray(keep, np.int32)
  cache = model.init_cache(b, t)
  _, cache = model.prefill(params, jnp.asarray(seq[:, :prompt_len]), cache,
                           jnp.full((b,), prompt_len, jnp.int32))
  _, cache = model.step(params, jnp.asarray(seq[:, prompt_len:prompt_len + k]), cache)
  cache = model.rollback(model.select(cache, jnp.asarray(rows)), jnp.asarray(keep))
  np.testing.assert_array_equal(np.asarray(cache["length"]), prompt_len + keep)
  nxt = np.stack([seq[r, prompt_len + kp:prompt_len + kp + n] for r, kp in zip(rows, keep)])
  logits, _ = model.step(params, jnp.asarray(nxt), cache)
  full = np.asarray(model.prefill(params, jnp.asarray(seq[rows]), model.init_cache(len(rows), t),
                                  jnp.full((len(rows),), t, jnp.int32))[0])
  want = np.stack([full[i, prompt_len + kp:prompt_len + kp + n] for i, kp in enumerate(keep)])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=ATOL)
