"""Each sampling rule against its definition; Mirostat's surprise control."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinf.decoding import sampling
from jaxinf.decoding.sampling import SamplerConfig, sample_token

V = 50


@pytest.fixture(scope="module")
def logits():
  return jax.random.normal(jax.random.key(0), (4, V)) * 2.0


def draws(cfg, logits, n=4000, seen=None):
  keys = jax.random.split(jax.random.key(1), n)
  state = sampling.init_state(cfg, logits.shape[0])
  fn = jax.jit(jax.vmap(lambda k: sample_token(cfg, k, logits, state, seen)[0]))
  return np.asarray(fn(keys))  # [n, B]


def probs_np(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_temperature_one_matches_softmax_chi_square(logits):
  toks = draws(SamplerConfig(), logits)
  p = probs_np(logits)
  for row in range(logits.shape[0]):
    counts = np.bincount(toks[:, row], minlength=V)
    expected = p[row] * len(toks)
    keep = expected > 5  # chi-square validity; pool the rest
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_top_k_never_leaves_the_top_k(logits):
  toks = draws(SamplerConfig(top_k=5), logits)
  top = np.argsort(-np.asarray(logits), -1)[:, :5]
  for row in range(logits.shape[0]):
    assert set(np.unique(toks[:, row])) <= set(top[row])


def test_top_p_never_leaves_the_nucleus_and_renormalises(logits):
  p = probs_np(logits)
  toks = draws(SamplerConfig(top_p=0.7), logits)
  for row in range(logits.shape[0]):
    order = np.argsort(-p[row])
    cum = np.cumsum(p[row][order])
    nucleus = order[: int(np.searchsorted(cum, 0.7) + 1)]
    assert set(np.unique(toks[:, row])) <= set(nucleus)
    q = np.zeros(V)
    q[nucleus] = p[row][nucleus] / p[row][nucleus].sum()
    counts = np.bincount(toks[:, row], minlength=V)[nucleus]
    assert stats.chisquare(counts, q[nucleus] * len(toks)).pvalue > 1e-3


def test_min_p(logits):
  p = probs_np(logits)
  toks = draws(SamplerConfig(min_p=0.2), logits)
  for row in range(logits.shape[0]):
    allowed = np.flatnonzero(p[row] >= 0.2 * p[row].max())
    assert set(np.unique(toks[:, row])) <= set(allowed)


def test_typical_keeps_tokens_closest_to_the_entropy(logits):
  p = probs_np(logits)
  toks = draws(SamplerConfig(typical_p=0.5), logits)
  for row in range(logits.shape[0]):
    h = -(p[row] * np.log(p[row])).sum()
    order = np.argsort(np.abs(-np.log(p[row]) - h))
    cum = np.cumsum(p[row][order])
    allowed = order[: int(np.searchsorted(cum, 0.5) + 1)]
    assert set(np.unique(toks[:, row])) <= set(allowed)


def test_low_temperature_equals_greedy(logits):
  greedy = np.asarray(sample_token(sampling.GREEDY, jax.random.key(0), logits, {})[0])
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  cold = draws(SamplerConfig(temperature=1e-3), logits, n=200)
  assert (cold == greedy[None]).all()


def test_repetition_penalty_definition(logits):
  seen = jnp.zeros((4, V), bool).at[:, :10].set(True)
  out = sampling.process_logits(SamplerConfig(repetition_penalty=1.5), logits, seen)
  x = np.asarray(logits)
  expected = x.copy()
  expected[:, :10] = np.where(x[:, :10] > 0, x[:, :10] / 1.5, x[:, :10] * 1.5)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def zipf_logits(n_steps, key, s_start=1.1, s_end=1.4):
  """Zipf-like distributions over 1000 tokens whose exponent drifts from 1.1 to 1.4: the entropy
  falls from 6.8 to 4.8 bits and the top token's surprise from 2.9 to 1.6 bits, so a target of
  tau = 4 bits stays reachable throughout (between the two)."""
  s = jnp.linspace(s_start, s_end, n_steps)[:, None]
  ranks = jnp.arange(1, 1001, dtype=jnp.float32)[None]
  perm = jax.vmap(lambda k: jax.random.permutation(k, 1000))(jax.random.split(key, n_steps))
  base = -s * jnp.log(ranks)
  return jnp.take_along_axis(base, jnp.argsort(perm, -1), -1)


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_holds_surprise_near_tau_where_top_k_drifts(version):
  n, tau = 3000, 4.0
  stream = zipf_logits(n, jax.random.key(3))

  def run(cfg):
    def body(state, inp):
      i, logits = inp
      _, state, surprise = sample_token(cfg, jax.random.fold_in(jax.random.key(4), i),
                                        logits[None], state)
      return state, surprise[0]
    return np.asarray(jax.lax.scan(body, sampling.init_state(cfg, 1), (jnp.arange(n), stream))[1])

  miro = run(SamplerConfig(mirostat=version, mirostat_tau=tau, mirostat_eta=0.1))
  topk = run(SamplerConfig(top_k=40))
  thirds = np.array_split(np.arange(200, n), 3)  # skip mu's warm-up
  miro_means = [miro[idx].mean() for idx in thirds]
  topk_means = [topk[idx].mean() for idx in thirds]
  # stated band: each third's mean surprise within 0.25 bits of tau
  assert max(abs(m - tau) for m in miro_means) < 0.25, miro_means
  # top-k's surprise follows the drifting entropy
  assert topk_means[0] - topk_means[-1] > 0.5, topk_means


class TestBadOptions:
  @pytest.mark.parametrize("kw,match", [
      (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"),
      (dict(typical_p=0.0), "typical_p"), (dict(temperature=-1.0), "temperature"),
      (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(mirostat=3), "mirostat"),
      (dict(mirostat=2, top_k=5), "mirostat"), (dict(topk=5), "topk")])
  def test_raises(self, kw, match):
    with pytest.raises(ValueError, match=match):
      sampling.sampler(**kw)


def test_argmax_is_jnp_argmax():
  """`sampling.argmax` (max, then the least index holding it) against `jnp.argmax` on rows with
  ties, NaNs, infinities and all -inf, in fp32 and bf16."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 50)).astype(np.float32)
  x[1, [3, 7, 40]] = 9.0                      # tie: the first
  x[2, [5, 30]] = np.nan                      # NaN: the first NaN
  x[3, 11] = np.inf
  x[3, 12] = np.nan
  x[4] = -np.inf                              # all -inf: 0
  x[5, [0, 49]] = np.inf                      # +inf tie
  x[6] = 0.0                                  # all equal: 0
  x[7, 49] = 100.0                            # the last
  x[8] = np.round(x[8])                       # many ties
  for dtype in (jnp.float32, jnp.bfloat16):
    xs = jnp.asarray(x, dtype)
    got = jax.jit(sampling.argmax)(xs)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(xs, -1)))
    np.testing.assert_array_equal(np.asarray(sampling.argmax(xs.reshape(3, 4, 50))),
                                  np.asarray(jnp.argmax(xs.reshape(3, 4, 50), -1)))
