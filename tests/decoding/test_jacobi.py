"""Jacobi decoding, lookahead decoding and Speculative Jacobi Decoding: greedy output against plain
`generate` (a transformer and a recurrent target, ragged prompts, EOS), the n-gram pool against a
plain-Python trajectory, exactness under sampling by a chi-square test against the closed-form
bigram law (with a biased rule as negative control), and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.jacobi import (JacobiDrafter, LookaheadDrafter, SJDDrafter, jacobi_generate,
                                    lookahead_generate, sjd_generate)
from jaxinf.decoding.sampling import SamplerConfig

from . import training_free_cases as cases
from .bigram import BigramModel
from .families import tiny_model

# --- greedy: token for token equal to generate ------------------------------------------------

METHODS = [
    (jacobi_generate, dict(window=5)),
    (lookahead_generate, dict(window=4, ngram=3, candidates=3)),
    (sjd_generate, dict(window=5)),
]


# the recurrent target compiles slowly on CPU: slow (CI runs them)
@pytest.mark.parametrize("family", ["transformer", pytest.param("rwkv7", marks=pytest.mark.slow)])
@pytest.mark.parametrize("decode,kwargs", METHODS, ids=["jacobi", "lookahead", "sjd"])
def test_greedy_equals_generate(family, decode, kwargs):
  accepted = cases.check_greedy_and_counters(family, decode, **kwargs)
  assert accepted.sum() > 0  # some guesses are right on these repetitive outputs


def test_lookahead_pool_beats_plain_jacobi_on_a_bigram():
  """In a bigram model a Jacobi guess is conditioned on the (wrong) guess before it, so plain
  Jacobi gains little on a chain without self-loops (this one cycles through 3 tokens), while
  the pool's n-grams (each token predicted after the previous one along the trajectory) are the
  model's own chains and get accepted."""
  model = BigramModel(vocab_size=8)
  params = model.init_params(jax.random.key(0))
  prompts = [[1, 2, 3, 1, 2], [4, 5]]
  jac = jacobi_generate(model, params, prompts, jax.random.key(0), max_new_tokens=16, window=4)
  la = lookahead_generate(model, params, prompts, jax.random.key(0), max_new_tokens=16,
                          window=4, ngram=4, candidates=2)
  np.testing.assert_array_equal(np.asarray(la.tokens), np.asarray(jac.tokens))
  assert int(la.accepted.sum()) > 4 * int(jac.accepted.sum())
  assert (np.asarray(la.target_calls) < np.asarray(jac.target_calls)).all()


# --- the lookahead branch's n-grams against a plain-Python trajectory -------------------------


def test_pool_holds_the_diagonal_ngrams_of_the_jacobi_trajectory():
  """Runs LookaheadDrafter.update on hand-made rounds with no acceptance (the window shifts by
  one: guess i of iteration t was predicted after guess i of iteration t-1) and checks the pool
  against the n-grams assembled in Python from the trajectory: (guess i at t-2, at t-1, at t,
  the prediction after it at t)."""
  w, n, v = 3, 4, 8
  drafter = LookaheadDrafter(window=w, ngram=n, candidates=2, pool_size=4, vocab_size=v,
                             pad_id=0)
  rng = np.random.default_rng(0)
  ctx = jnp.asarray(rng.integers(0, v, (1, 8)), jnp.int32)
  state = drafter.init(jax.random.key(0), ctx, jnp.array([8]), jnp.array([8]))
  update = jax.jit(drafter.update)
  windows, grams = [], set()
  for t in range(5):
    windows.append(np.asarray(state["window"][0]).tolist())
    pred = rng.integers(0, v, w + 1).tolist()       # the step's argmax at [c, y_1..y_W]
    logits = jax.nn.one_hot(jnp.asarray(pred), v)[None, None] * 10.0
    state = update(state, None, logits, None, None, jnp.array([0]), None)
    assert np.asarray(state["window"][0]).tolist() == pred[1:]
    if t >= n - 2:
      grams |= {(windows[t - 2][i], windows[t - 1][i], windows[t][i], pred[i + 1])
                for i in range(w)}
  pool, pool_n = np.asarray(state["pool"][0]), np.asarray(state["pool_n"][0])
  assert pool_n.max() <= 4  # no ring overwrite in this case, so the pool holds every n-gram
  got = {(k,) + tuple(pool[k, s].tolist()) for k in range(v) for s in range(pool_n[k])}
  assert got == grams and len(grams) > 3


# --- exactness under sampling -----------------------------------------------------------------

PROMPT = [1, 2, 3]


def _sample(drafter, rule=None):
  return cases.sample_rows(drafter, PROMPT, 12, rule)


def test_sjd_is_exact_under_sampling_and_the_test_rejects_no_residual():
  drafter = SJDDrafter(window=3, vocab_size=cases.V)
  out, (p123, p234) = _sample(drafter)
  assert int(out.accepted.sum()) > cases.ROWS // 2
  assert min(p123, p234) > 1e-3, (p123, p234)
  _, (b123, b234) = _sample(drafter, cases.no_residual)
  assert min(b123, b234) < 1e-6, (b123, b234)


@pytest.mark.parametrize("drafter", [
    JacobiDrafter(window=3),
    LookaheadDrafter(window=3, ngram=3, candidates=2, pool_size=2, vocab_size=cases.V, pad_id=0),
], ids=["jacobi", "lookahead"])
def test_jacobi_and_lookahead_are_exact_under_sampling(drafter):
  out, (p123, p234) = _sample(drafter)
  assert int(out.accepted.sum()) > 0
  assert min(p123, p234) > 1e-3, (p123, p234)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("decode,kwargs,error,match", [
    (jacobi_generate, dict(window=0), ValueError, "window"),
    (sjd_generate, dict(window=-1), ValueError, "window"),
    (lookahead_generate, dict(window=0), ValueError, "window"),
    (lookahead_generate, dict(ngram=1), ValueError, "ngram"),
    (lookahead_generate, dict(candidates=0), ValueError, "candidates"),
    (lookahead_generate, dict(candidates=3, pool_size=2), ValueError, "pool_size"),
    (sjd_generate, dict(sampler=SamplerConfig(temperature=1.0, mirostat=1)), ValueError,
     "sampler"),
    (jacobi_generate, dict(sampler=None), TypeError, "sampler"),
    (lookahead_generate, dict(pad_id=-1), ValueError, "pad_id"),
    (sjd_generate, dict(prompt_lengths=np.array([3, 3, 3])), ValueError, "prompt_lengths"),
])
def test_bad_input_is_named(decode, kwargs, error, match):
  model, params = tiny_model("rwkv7")
  prompts = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
  with pytest.raises(error, match=match):
    decode(model, params, prompts, jax.random.key(0), max_new_tokens=4, **kwargs)
