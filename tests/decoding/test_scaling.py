"""Inference-time scaling methods against independent sources: pass@k by enumerating every
k-subset, the power-law fit on synthetic curves, votes against plain Python, resampling against
numpy and exact probabilities, and the particle filter against closed forms on a bigram toy (with
negative controls) and against a fresh forward pass of a transformer (cache rows reindexed)."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinf.decoding import scaling
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models import transformer as transformer_lib

from .bigram import BigramModel

# --- pass@k and the power law -----------------------------------------------------------------


def test_pass_at_k_matches_enumeration_of_subsets():
  for n in range(1, 8):
    for c in range(n + 1):
      correct = [True] * c + [False] * (n - c)
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(correct, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert scaling.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
  # vectorised, and stable where C(n, k) overflows a float
  got = scaling.pass_at_k(np.array([2000, 2000]), np.array([1, 0]), 1000)
  assert got == pytest.approx([0.5, 0.0], abs=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(ValueError, match="k: k=5 exceeds"):
    scaling.pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match="k: expected >= 1"):
    scaling.pass_at_k(4, 1, 0)
  with pytest.raises(ValueError, match="c: expected"):
    scaling.pass_at_k(4, 5, 1)
  with pytest.raises(TypeError, match="c: expected integers"):
    scaling.pass_at_k(4, 1.5, 1)


def test_fit_power_law_recovers_parameters():
  ks = np.arange(1, 65)
  truth = scaling.PowerLaw(a=-1.3, b=-0.45)
  fit = scaling.fit_power_law(ks, truth(ks))
  assert (fit.a, fit.b) == pytest.approx((-1.3, -0.45), rel=1e-9)
  # with 1% multiplicative noise on -log coverage the fit stays close
  noisy = np.exp(-1.3 * ks**-0.45 * np.exp(0.01 * np.random.default_rng(0).normal(size=64)))
  fit = scaling.fit_power_law(ks, noisy)
  assert fit.a == pytest.approx(-1.3, rel=0.02) and fit.b == pytest.approx(-0.45, abs=0.01)
  with pytest.raises(ValueError, match="at least two k"):
    scaling.fit_power_law([1, 2], [1.0, 1.0])
  with pytest.raises(ValueError, match="coverage: expected values"):
    scaling.fit_power_law([1, 2], [0.5, 1.5])
  with pytest.raises(ValueError, match="ks, coverage"):
    scaling.fit_power_law([1, 2, 3], [0.5, 0.6])


# --- voting and best-of-N ---------------------------------------------------------------------

def _python_vote(answers, valid, weights):
  """Largest total weight; ties go to the answer seen first. None if nothing is valid."""
  totals, order = defaultdict(float), []
  for a, ok, w in zip(answers, valid, weights):
    if ok:
      if a not in totals:
        order.append(a)
      totals[a] += w
  if not order:
    return None
  best = max(totals[a] for a in order)
  return next(a for a in order if totals[a] == best)


def test_votes_match_plain_python():
  rng = np.random.default_rng(0)
  answers = rng.integers(0, 4, size=(200, 7))
  valid = rng.random((200, 7)) < 0.8
  valid[0] = False
  logprob = -rng.random((200, 7)) * 20
  lengths = rng.integers(1, 30, size=(200, 7))
  weights = np.exp(logprob / lengths)
  for method, w in (("self_consistency", np.ones((200, 7))), ("weighted_consistency", weights)):
    got, has = scaling.select_answers(method, answers, valid, logprob=logprob, lengths=lengths)
    for i in range(200):
      want = _python_vote(answers[i].tolist(), valid[i].tolist(), w[i].tolist())
      assert has[i] == (want is not None)
      if want is not None:
        assert got[i] == want, (method, i)
  # hand-made: 2 votes for 5 beat 1 for 7 by count, but not by a heavy weight
  a, v = np.array([[5, 7, 5]]), np.ones((1, 3), bool)
  assert scaling.self_consistency(a, v)[0][0] == 5
  assert scaling.weighted_vote(a, v, np.array([[1.0, 3.0, 1.0]]))[0][0] == 7
  assert scaling.self_consistency(np.array([[3, 9]]), np.ones((1, 2), bool))[0][0] == 3  # tie


def test_best_of_n_matches_python():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 5, size=(50, 6)).astype(float)   # ties on purpose
  valid = rng.random((50, 6)) < 0.7
  idx = scaling.best_of_n(scores, valid)
  for i in range(50):
    cands = [j for j in range(6) if valid[i, j]] or list(range(6))
    best = max(scores[i, j] for j in cands) if valid[i].any() else -math.inf
    want = next((j for j in cands if scores[i, j] == best), 0)
    assert idx[i] == want


def test_selection_bad_input():
  a, v = np.zeros((2, 3), int), np.ones((2, 3), bool)
  with pytest.raises(ValueError, match="method: unknown 'beam'"):
    scaling.select_answers("beam", a, v)
  with pytest.raises(ValueError, match="valid: shape"):
    scaling.select_answers("self_consistency", a, np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="scores"):
    scaling.select_answers("best_of_n", a, v)
  with pytest.raises(ValueError, match="scores: shape"):
    scaling.select_answers("best_of_n", a, v, scores=np.zeros((3, 3)))
  with pytest.raises(ValueError, match="logprob, lengths"):
    scaling.select_answers("weighted_consistency", a, v)
  with pytest.raises(ValueError, match="weights"):
    scaling.weighted_vote(a, v, -np.ones((2, 3)))
  with pytest.raises(ValueError, match="answers"):
    scaling.self_consistency(np.zeros(3), np.ones(3, bool))


# --- resampling -------------------------------------------------------------------------------

def test_systematic_resample_matches_numpy():
  key = jax.random.key(3)
  logw = jax.random.normal(jax.random.key(4), (64, 8)) * 2
  got = np.asarray(scaling.systematic_resample(key, logw))
  u = np.asarray(jax.random.uniform(key, (64, 1)))
  w = np.exp(np.asarray(logw, np.float64))
  w /= w.sum(1, keepdims=True)
  for i in range(64):
    cdf, want = np.cumsum(w[i]), []
    for j in range(8):
      pos = (u[i, 0] + j) / 8
      want.append(min(int(np.sum(cdf <= pos)), 7))
    assert got[i].tolist() == want
  # uniform weights: every particle is its own ancestor
  ident = scaling.systematic_resample(key, jnp.zeros((64, 8)))
  assert (np.asarray(ident) == np.arange(8)[None]).all()


def test_multinomial_resample_frequencies():
  logw = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
  logw = jnp.repeat(logw, 4000, axis=0)
  idx = np.asarray(scaling.multinomial_resample(jax.random.key(0), logw))
  counts = np.bincount(idx.ravel(), minlength=4)
  assert stats.chisquare(counts, 16000 * np.array([0.1, 0.2, 0.3, 0.4])).pvalue > 1e-3
  assert stats.chisquare(counts, 16000 * np.full(4, 0.25)).pvalue < 1e-6   # negative control


# --- the particle filter on a bigram toy ------------------------------------------------------

V, DELIM, EOS, PAD = 6, 3, 4, 5


@jax.jit
def constant_score(params, tokens, lengths):
  return jnp.zeros(tokens.shape[0])


def _sequence_probs(table, prompt_token, max_new):
  """Exact probability of every generated sequence (to EOS, or cut at max_new) of a bigram."""
  t = np.asarray(table, np.float64)
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = {}

  def walk(prev, seq, prob):
    for t in range(V):
      s, q = seq + (t,), prob * p[prev, t]
      if t == EOS or len(s) == max_new:
        out[s] = out.get(s, 0.0) + q
      else:
        walk(t, s, q)

  walk(prompt_token, (), 1.0)
  return out


def _chi_square_pvalue(observed, probs):
  keys = sorted(probs, key=lambda s: -probs[s])
  total = sum(observed.values())
  big = [k for k in keys if probs[k] * total >= 5]
  exp = np.array([probs[k] for k in big] + [max(1 - sum(probs[k] for k in big), 0.0)])
  obs = [observed.get(k, 0) for k in big] + [total - sum(observed.get(k, 0) for k in big)]
  return stats.chisquare(obs, total * exp / exp.sum()).pvalue


@pytest.fixture(scope="module")
def bigram():
  model = BigramModel(V)
  table = 1.5 * jax.random.normal(jax.random.key(0), (V, V))
  table = table.at[:, DELIM].add(1.0).at[:, EOS].add(0.5)   # several steps, some early EOS
  return model, {"table": table}


def _particle0_counts(out):
  toks, lens = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
  counts = defaultdict(int)
  for t, n in zip(toks, lens):
    counts[tuple(t[:n].tolist())] += 1
  return counts


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_constant_scorer_is_plain_sampling(bigram, resampling):
  """Uniform weights preserve each particle's marginal: particle 0 of each group is a plain
  sample, checked by a chi-square test against the bigram's exact sequence probabilities; the same
  test rejects samples at temperature 0.7 (negative control)."""
  model, params = bigram
  groups, max_new = 3000, 3
  probs = _sequence_probs(params["table"], 0, max_new)
  out = scaling.particle_filter(model, params, np.zeros((groups, 1), np.int32),
                                jax.random.key(1), n=4, scorer=constant_score,
                                scorer_params=None, delimiter_id=DELIM, eos_id=EOS,
                                max_new_tokens=max_new, resampling=resampling, pad_id=PAD)
  assert int(out.steps) >= 2                       # the delimiter split sequences into steps
  assert _chi_square_pvalue(_particle0_counts(out), probs) > 1e-3
  # logprob is the model's log-likelihood of what it generated
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  for g in range(5):
    for j in range(4):
      seq = tuple(toks[g, j, :lens[g, j]].tolist())
      assert float(out.logprob[g, j]) == pytest.approx(
          math.log(np.prod([np.asarray(jax.nn.softmax(params["table"][a]))[b]
                            for a, b in zip((0,) + seq[:-1], seq)])), abs=1e-4)
  cold = scaling.particle_filter(model, params, np.zeros((groups, 1), np.int32),
                                 jax.random.key(1), n=4, scorer=constant_score,
                                 scorer_params=None, delimiter_id=DELIM, eos_id=EOS,
                                 max_new_tokens=max_new, resampling=resampling, pad_id=PAD,
                                 sampler=SamplerConfig(temperature=0.7))
  assert _chi_square_pvalue(_particle0_counts(cold), probs) < 1e-6


@jax.jit
def prefers_one(beta, tokens, lengths):
  """beta if the first generated token (after a 1-token prompt) is token 1."""
  return beta * (tokens[:, 1] == 1)


def test_scorer_shifts_mass_by_closed_form():
  """One step ('x EOS'), then one multinomial resampling by softmax(beta [x = 1]): particle 0 is
  token 1 with probability E[M e^b / (M e^b + N - M)], M ~ Binomial(N, p). Checked with a
  binomial bound; plain p and the N -> infinity tilt p e^b / (p e^b + 1 - p) are both rejected."""
  model = BigramModel(V)
  p, beta, n, groups = 0.3, 1.5, 4, 6000
  table = np.full((V, V), -30.0)
  table[0, 1], table[0, 2] = math.log(p), math.log(1 - p)
  table[1, EOS] = table[2, EOS] = 0.0
  out = scaling.particle_filter(model, {"table": jnp.asarray(table)},
                                np.zeros((groups, 1), np.int32), jax.random.key(2), n=n,
                                scorer=prefers_one, scorer_params=jnp.float32(beta),
                                delimiter_id=DELIM, eos_id=EOS, max_new_tokens=4, pad_id=PAD)
  first = np.asarray(out.tokens[:, 0, 0])
  assert set(first.tolist()) <= {1, 2} and bool(np.all(out.finished))
  e = math.exp(beta)
  exact = sum(stats.binom.pmf(m, n, p) * m * e / (m * e + n - m) for m in range(1, n + 1))
  freq, sigma = np.mean(first == 1), math.sqrt(exact * (1 - exact) / groups)
  assert abs(freq - exact) < 4.5 * sigma
  for wrong in (p, p * e / (p * e + 1 - p)):
    assert abs(freq - wrong) > 4.5 * sigma
  # scores report the scorer's value of each final particle
  assert np.allclose(np.asarray(out.scores), beta * (np.asarray(out.tokens[:, :, 0]) == 1))


# --- the particle filter on a transformer: cache rows follow their particles ------------------

def test_particles_keep_their_own_cache_through_select():
  """With a scorer that forces real resampling and steps that pause particles at different times,
  the log-likelihood accumulated from the cached `step` logits must equal a fresh forward pass of
  each final sequence: a cache row not moved with its particle (or a paused row advanced) would
  condition later tokens on another particle's past."""
  cfg = transformer_lib.transformer_config("transformer-tiny", max_len=40)
  model = transformer_lib.TransformerLM(cfg)
  params = jax.tree.map(lambda x: x * 8.0, model.init_params(0))   # a peaked, history-dependent LM

  @jax.jit
  def hashy(params, tokens, lengths):
    valid = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    return 3.0 * jnp.sin(0.37 * jnp.sum(jnp.where(valid, tokens * (jnp.arange(tokens.shape[1]) + 1),
                                                  0), -1))

  prompts = [[1, 2, 3, 4, 5], [6, 7]]
  out = scaling.particle_filter(model, params, prompts, jax.random.key(5), n=3, scorer=hashy,
                                scorer_params=None, delimiter_id=9, eos_id=10,
                                max_new_tokens=12, max_step_tokens=3, pad_id=0)
  assert int(out.steps) >= 3
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  assert len({tuple(t[:n]) for t, n in zip(toks.reshape(6, -1), lens.reshape(-1))}) > 1
  for b, prompt in enumerate(prompts):
    for j in range(3):
      seq = prompt + toks[b, j, :lens[b, j]].tolist()
      logits = model(params, jnp.asarray([seq]))[0]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      want = sum(float(logp[len(prompt) - 1 + i, t])
                 for i, t in enumerate(toks[b, j, :lens[b, j]]))
      assert float(out.logprob[b, j]) == pytest.approx(want, abs=2e-3)


def test_sample_n_is_one_batch_with_exact_logprob(bigram):
  model, params = bigram
  s = scaling.sample_n(model, params, [[0], [1, 2]], jax.random.key(0), n=5, max_new_tokens=4,
                       eos_id=EOS, pad_id=PAD)
  assert s.tokens.shape == (2, 5, 4) and s.logprob.shape == (2, 5)
  p = np.asarray(jax.nn.softmax(params["table"], -1), np.float64)
  for b, last in enumerate((0, 2)):
    for j in range(5):
      seq = s.tokens[b, j, :s.lengths[b, j]].tolist()
      want = sum(math.log(p[a, c]) for a, c in zip([last] + seq[:-1], seq))
      assert s.logprob[b, j] == pytest.approx(want, abs=1e-4)
  assert len({tuple(t) for t in s.tokens[0]}) > 1


def test_particle_filter_bad_input(bigram):
  model, params = bigram
  kw = dict(scorer=constant_score, scorer_params=None, delimiter_id=DELIM, eos_id=EOS,
            max_new_tokens=3, pad_id=PAD)
  with pytest.raises(ValueError, match="n: expected an int >= 1"):
    scaling.particle_filter(model, params, [[0]], jax.random.key(0), n=0, **kw)
  with pytest.raises(ValueError, match="resampling: unknown 'stratified'"):
    scaling.particle_filter(model, params, [[0]], jax.random.key(0), n=2,
                            resampling="stratified", **kw)
  with pytest.raises(ValueError, match="delimiter_id"):
    scaling.particle_filter(model, params, [[0]], jax.random.key(0), n=2,
                            **dict(kw, delimiter_id=V))
  with pytest.raises(ValueError, match="temperature"):
    scaling.particle_filter(model, params, [[0]], jax.random.key(0), n=2, temperature=0.0, **kw)
  with pytest.raises(ValueError, match="prompt_lengths"):
    scaling.particle_filter(model, params, np.zeros((2, 3), np.int32), jax.random.key(0), n=2,
                            prompt_lengths=np.array([1]), **kw)
  with pytest.raises(ValueError, match="sampler: mirostat"):
    scaling.particle_filter(model, params, [[0]], jax.random.key(0), n=2,
                            sampler=SamplerConfig(mirostat=2), **kw)
  with pytest.raises(ValueError, match="n: expected"):
    scaling.sample_n(model, params, [[0]], jax.random.key(0), n=0, max_new_tokens=3)
