"""Speculative sampling against independent sources: greedy `generate` token for token (every
family as target and as draft), the target's own distribution by a chi-square test (closed form for
bigram tables, exact enumeration for a recurrent target), and the recurrent target's state after
verification with rejections against a prefill of the accepted tokens."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import GREEDY, SamplerConfig
from jaxinf.decoding.speculative import expected_tokens_per_call, speculative_generate

from .bigram import BigramModel
from .families import tiny_model
from .stats import chi_square_pvalue

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 9, 1]]


# --- greedy: identical to generate --------------------------------------------------------------

@pytest.mark.parametrize("target,draft,opts", [
    ("transformer", "rwkv7", {}),
    ("rwkv7", "mamba", dict(gamma_schedule="heuristic")),
    ("mamba", "transnormer", {}),
    ("transnormer", "transformer", dict(draft_confidence=0.5)),
    # self-drafts (the target model with other weights) stepping in the target's cache: the
    # transformer's mark is a length pointer, RWKV-7's a copy of its state
    ("transformer", "transformer", dict(share_cache=True)),
    ("rwkv7", "rwkv7", dict(share_cache=True, gamma_schedule="heuristic")),
])
def test_greedy_equals_generate(target, draft, opts):
  tm, tp = tiny_model(target)
  dm, dp = tiny_model(draft, seed=1)
  key = jax.random.key(0)
  want = generate(tm, tp, PROMPTS, key, max_new_tokens=17, eos_id=5)
  got = speculative_generate(tm, tp, dm, dp, PROMPTS, key, max_new_tokens=17, gamma=4, eos_id=5,
                             **opts)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  assert (np.asarray(got.accepted) <= np.asarray(got.drafted)).all()


# --- exactness under sampling: chi-square against the target's own law --------------------------

V = 6
ROWS = 24_000


@pytest.fixture(scope="module")
def bigrams():
  target = BigramModel(V)
  tp = target.init_params(jax.random.key(0), scale=1.5)
  dp = {"table": -tp["table"]}  # a draft far from the target: its likeliest tokens are p's rarest
  return target, tp, dp


def _bigram_joint(table, start, sampler: SamplerConfig, n: int):
  """Exact law of the first n tokens after `start` under `sampler` (temperature, top-k)."""
  logits = table / sampler.temperature
  if sampler.top_k is not None:
    kth = np.sort(logits, axis=1)[:, -sampler.top_k][:, None]
    logits = np.where(logits >= kth, logits, -np.inf)
  cond = np.exp(logits - logits.max(1, keepdims=True))
  cond /= cond.sum(1, keepdims=True)
  joint = np.zeros((V,) * n)
  for seq in itertools.product(range(V), repeat=n):
    prob, prev = 1.0, start
    for tok in seq:
      prob *= cond[prev, tok]
      prev = tok
    joint[seq] = prob
  return joint.ravel()


def _codes(tokens, n):
  return sum(np.asarray(tokens)[:, i] * V ** (n - 1 - i) for i in range(n))


@pytest.mark.parametrize("sampler,share", [(SamplerConfig(temperature=1.0), False),
                                           (SamplerConfig(temperature=0.7, top_k=4), False),
                                           (SamplerConfig(temperature=1.0), True)])
def test_bigram_distribution_is_the_targets(bigrams, sampler, share):
  target, tp, dp = bigrams
  prompts = np.full((ROWS, 1), 2, np.int32)
  out = speculative_generate(target, tp, target, dp, prompts, jax.random.key(3),
                             max_new_tokens=3, gamma=3, sampler=sampler, share_cache=share)
  exact = _bigram_joint(np.asarray(tp["table"]), 2, sampler, 3)
  assert chi_square_pvalue(_codes(out.tokens, 3), exact) > 1e-3
  acc = np.asarray(out.accepted).sum() / np.asarray(out.drafted).sum()
  assert 0.0 < acc < 0.9  # rejections happen: the residual path is exercised
  # every judged draft is accepted or the round's one rejection; later drafts go unjudged
  rej = np.asarray(out.rejected)
  assert (rej <= np.asarray(out.target_calls)).all()
  assert (np.asarray(out.accepted) + rej <= np.asarray(out.drafted)).all()
  assert rej.sum() > 0


def test_negative_control_draft_law_is_rejected(bigrams):
  """The same test has the power to see the draft's law leaking through."""
  target, _, dp = bigrams
  prompts = np.full((ROWS, 1), 2, np.int32)
  out = generate(target, dp, prompts, jax.random.key(3), max_new_tokens=3,
                 sampler=SamplerConfig(temperature=1.0))
  exact = _bigram_joint(-np.asarray(dp["table"]), 2, SamplerConfig(temperature=1.0), 3)
  assert chi_square_pvalue(_codes(out.tokens, 3), exact) < 1e-6


@pytest.fixture(scope="module")
def recurrent_pair():
  return tiny_model("rwkv7", vocab_size=V), tiny_model("transformer", vocab_size=V, seed=3)


def _two_token_law(tm, tp, prompt):
  """The exact joint law (temperature 1) of the two tokens after `prompt` [1, 3], enumerated."""
  seqs = np.concatenate([np.repeat(prompt, V, 0), np.arange(V)[:, None]], 1).astype(np.int32)
  logits, _ = tm.prefill(tp, jnp.asarray(seqs), tm.init_cache(V, 4), jnp.full((V,), 4))
  first = np.asarray(jax.nn.softmax(logits[0, 2]), np.float64)
  second = np.asarray(jax.nn.softmax(logits[:, 3]), np.float64)
  return (first[:, None] * second).ravel()


def test_recurrent_target_distribution_is_exact(recurrent_pair):
  """RWKV-7 target, transformer draft: the first two tokens' joint law by enumeration."""
  (tm, tp), (dm, dp) = recurrent_pair
  prompt = np.array([[1, 4, 2]], np.int32)
  sampler = SamplerConfig(temperature=1.0)
  exact = _two_token_law(tm, tp, prompt)
  out = speculative_generate(tm, tp, dm, dp, np.repeat(prompt, 8000, 0), jax.random.key(5),
                             max_new_tokens=2, gamma=3, sampler=sampler)
  assert chi_square_pvalue(_codes(out.tokens, 2), exact) > 1e-3


def test_shared_cache_self_draft_distribution_is_exact():
  """A transformer self-draft (other weights) stepping in the target's KV cache, which goes back to
  its mark by pointer: the first two tokens' joint law by enumeration, with rejections."""
  tm, tp = tiny_model("transformer", vocab_size=V)
  _, dp = tiny_model("transformer", vocab_size=V, seed=3)
  prompt = np.array([[1, 4, 2]], np.int32)
  exact = _two_token_law(tm, tp, prompt)
  out = speculative_generate(tm, tp, tm, dp, np.repeat(prompt, 8000, 0), jax.random.key(5),
                             max_new_tokens=2, gamma=3, sampler=SamplerConfig(temperature=1.0),
                             share_cache=True)
  assert chi_square_pvalue(_codes(out.tokens, 2), exact) > 1e-3
  assert 0 < np.asarray(out.rejected).sum()  # the draft's law differs: rejections happen


@pytest.mark.parametrize("family", ["transformer", "rwkv7", "mamba", "transnormer"])
def test_restore_returns_the_cache_to_its_mark(family):
  """`mark`, three more steps, `restore`: the next step's logits equal those from an untouched
  copy of the marked cache (the transformer restores by pointer, the others from a copy)."""
  m, p = tiny_model(family)
  cache = m.prefill(p, jnp.asarray([[1, 2, 3, 4]]), m.init_cache(1, 16), jnp.array([4]))[1]
  copy = jax.tree.map(jnp.copy, cache)
  mark = m.mark(cache)
  for tok in (5, 6, 7):
    _, cache = m.step(p, jnp.asarray([[tok]]), cache)
  cache = m.restore(cache, mark)
  got, _ = m.step(p, jnp.asarray([[9, 10]]), cache)
  want, _ = m.step(p, jnp.asarray([[9, 10]]), copy)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0)


def test_recurrent_rollback_state_equals_prefill_of_accepted(recurrent_pair):
  """After rounds with rejections, the target's state is that of the emitted tokens alone."""
  (tm, tp), (dm, dp) = recurrent_pair
  prompts = np.array([[1, 4, 2], [3, 0, 5]], np.int32)
  out, state = speculative_generate(tm, tp, dm, dp, prompts, jax.random.key(1), max_new_tokens=24,
                                    gamma=4, sampler=SamplerConfig(temperature=1.0),
                                    return_state=True)
  assert 0 < int(np.sum(out.accepted)) < int(np.sum(out.drafted))
  written = np.asarray(state["written"])
  buf = np.asarray(state["buffer"])
  for row in range(2):
    # the cache holds the prompt and every emitted token but the last (the pending one)
    seq = np.concatenate([prompts[row], buf[row, :written[row] - 1]])[None].astype(np.int32)
    _, ref = tm.prefill(tp, jnp.asarray(seq), tm.init_cache(1, seq.shape[1]),
                        jnp.array([seq.shape[1]]))
    got = jax.tree.map(lambda x: x[:, row:row + 1], state["target_cache"]["state"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=2e-5, rtol=0), got, ref["state"])
    assert int(state["target_cache"]["length"][row]) == seq.shape[1]


# --- counters and adaptivity --------------------------------------------------------------------

def test_identical_draft_accepts_everything_and_matches_the_closed_form(bigrams):
  target, tp, _ = bigrams
  prompts = np.full((4, 1), 1, np.int32)
  out = speculative_generate(target, tp, target, tp, prompts, jax.random.key(0),
                             max_new_tokens=1 + 5 * 6, gamma=5,
                             sampler=SamplerConfig(temperature=1.0))
  np.testing.assert_array_equal(out.accepted, out.drafted)
  np.testing.assert_array_equal(out.rejected, 0)
  per_call = (np.asarray(out.lengths) - 1) / np.asarray(out.target_calls)
  np.testing.assert_allclose(per_call, expected_tokens_per_call(1.0, 5))
  assert expected_tokens_per_call(0.0, 5) == 1.0
  np.testing.assert_allclose(expected_tokens_per_call(0.5, 2), 1.75)


def test_adaptive_gamma_drafts_less_for_a_bad_draft(bigrams):
  target, tp, dp = bigrams
  prompts = np.full((16, 1), 1, np.int32)
  kw = dict(max_new_tokens=40, gamma=6, sampler=GREEDY)
  fixed = speculative_generate(target, tp, target, dp, prompts, jax.random.key(0), **kw)
  adaptive = speculative_generate(target, tp, target, dp, prompts, jax.random.key(0),
                                  gamma_schedule="heuristic", **kw)
  np.testing.assert_array_equal(adaptive.tokens, fixed.tokens)
  per_call = lambda o: np.sum(o.drafted) / np.sum(o.target_calls)
  assert per_call(fixed) == 6 and per_call(adaptive) < 3
  confident = speculative_generate(target, tp, target, dp, prompts, jax.random.key(0),
                                   max_new_tokens=40, gamma=6,
                                   sampler=SamplerConfig(temperature=1.0), draft_confidence=1.0)
  np.testing.assert_array_equal(confident.drafted, confident.target_calls)  # one draft a round


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_refused(bigrams):
  target, tp, dp = bigrams
  prompts = np.ones((2, 3), np.int32)
  key = jax.random.key(0)
  run = lambda **kw: speculative_generate(**{**dict(
      target=target, target_params=tp, draft=target, draft_params=dp, prompts=prompts, key=key,
      max_new_tokens=4), **kw})
  with pytest.raises(ValueError, match="gamma"):
    run(gamma=0)
  with pytest.raises(ValueError, match="draft: its vocabulary"):
    run(draft=BigramModel(V + 1), draft_params={"table": jnp.zeros((V + 1, V + 1))})
  with pytest.raises(ValueError, match="prompt_lengths"):
    run(prompt_lengths=np.array([3, 3, 3]))
  with pytest.raises(ValueError, match="sampler"):
    run(sampler=SamplerConfig(temperature=1.0, mirostat=2))
  with pytest.raises(ValueError, match="gamma_schedule"):
    run(gamma_schedule="sometimes")
  with pytest.raises(ValueError, match="draft_confidence"):
    run(draft_confidence=1.5)
  with pytest.raises(TypeError, match="draft"):
    run(draft=object())
  with pytest.raises(TypeError, match="share_cache"):
    run(share_cache="yes")
  with pytest.raises(ValueError, match="share_cache: the draft must be the target model"):
    run(draft=BigramModel(V, max_len=99), share_cache=True)
