"""Contrastive decoding: the compiled loop against the rule written in numpy (float64) on bigram
models (exact next-token tables) and on tiny random models (a weaker model, and the same model
given a weaker prompt); the edge cases alpha = 1 and an identical amateur against `generate`;
sampling by a chi-square test against the closed-form CD distribution, with a negative control;
bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.decoding.contrastive import (
    CDConfig,
    cd_config,
    contrastive_generate,
    last_tokens,
)
from jaxinf.decoding.generate import generate
from jaxinf.models.mamba import MambaLM, mamba_config
from jaxinf.models.transformer import TransformerLM, transformer_config

from .bigram import BigramModel
from .stats import counts_pvalue

V = 16
N = 12


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def cd_np(expert_logits, amateur_logits, cfg):
  """The paper's eqs. 2-4 read plainly, in probability space: ([B, V] scores with -inf outside
  V_head, log p_EXP, the smallest distance of any p_EXP / max p_EXP to alpha)."""
  lpe = log_softmax(expert_logits)
  lpa = log_softmax(np.asarray(amateur_logits, np.float64) / cfg.amateur_temperature)
  ratio = np.exp(lpe) / np.exp(lpe).max(-1, keepdims=True)
  head = ratio >= cfg.alpha
  edge = np.abs(ratio - cfg.alpha).min() if cfg.alpha > 0 else np.inf  # alpha = 0 keeps all
  return np.where(head, lpe - lpa, -np.inf), lpe, edge


def cd_distribution(expert_logits, amateur_logits, cfg):
  scores, _, _ = cd_np(expert_logits, amateur_logits, cfg)
  return np.exp(log_softmax(scores / cfg.temperature))


def reference_cd(expert, ep, amateur, ap, prompts, amateur_prompts, n, cfg):
  """Greedy CD in a host loop: both models stepped one token at a time, the rule in numpy."""
  pairs, caches, logits = ((expert, ep, prompts), (amateur, ap, amateur_prompts)), [], []
  for m, p, pr in pairs:
    lengths = np.array([len(x) for x in pr], np.int32)
    arr = np.zeros((len(pr), lengths.max()), np.int32)
    for r, x in enumerate(pr):
      arr[r, :len(x)] = x
    lg, cache = m.prefill(p, arr, m.init_cache(len(pr), int(lengths.max()) + n), lengths)
    caches.append(cache)
    logits.append(np.asarray(lg)[np.arange(len(pr)), lengths - 1])
  toks, margin = [], np.inf
  for _ in range(n):
    scores, lpe, head_margin = cd_np(logits[0], logits[1], cfg)
    best = scores.max(-1, keepdims=True)
    tok = np.argmax(np.where(scores >= best, lpe, -np.inf), -1)
    gaps = np.sort(scores, -1)
    finite = np.isfinite(gaps[:, -2])
    gap = np.where(finite, gaps[:, -1] - gaps[:, -2], np.inf).min()
    margin = min(margin, head_margin, gap)
    toks.append(tok)
    for j, (m, p, _) in enumerate(pairs):
      lg, caches[j] = m.step(p, tok[:, None].astype(np.int32), caches[j])
      logits[j] = np.asarray(lg)[:, 0]
  return np.stack(toks, 1), margin


@pytest.fixture(scope="module")
def bigrams():
  expert, amateur = BigramModel(vocab_size=V), BigramModel(vocab_size=V)
  return expert, expert.init_params(jax.random.key(1)), amateur, amateur.init_params(
      jax.random.key(2), scale=1.0)


@pytest.fixture(scope="module")
def tiny():
  expert = TransformerLM(transformer_config("transformer-tiny", init_std=0.3))
  amateur = MambaLM(mamba_config("mamba-tiny", init_std=0.2))
  return expert, expert.init_params(3), amateur, amateur.init_params(4)


@pytest.mark.parametrize("cfg", [CDConfig(alpha=0.1), CDConfig(alpha=0.0),
                                 CDConfig(alpha=0.3, amateur_temperature=0.5)])
def test_bigram_greedy_equals_numpy_rule(bigrams, cfg):
  expert, ep, amateur, ap = bigrams
  prompts = [[1, 2, 3], [4], [5, 6]]
  ref, margin = reference_cd(expert, ep, amateur, ap, prompts, prompts, N, cfg)
  assert margin > 1e-4  # no token sits at the V_head edge or ties for the best score
  out = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N,
                             amateur=amateur, amateur_params=ap, config=cfg)
  np.testing.assert_array_equal(out.tokens, ref)
  # the expert's log-probability of each token, from the table
  lpe = log_softmax(np.asarray(ep["table"]))
  prev = np.concatenate([[[p[-1]] for p in prompts], ref[:, :-1]], 1)
  np.testing.assert_allclose(out.expert_logp, lpe[prev, ref], rtol=1e-5, atol=1e-5)


def test_weaker_model_and_weaker_prompt_equal_numpy_rule(tiny):
  expert, ep, amateur, ap = tiny
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 10, 11]]
  cfg = CDConfig(alpha=0.1)
  ref, margin = reference_cd(expert, ep, amateur, ap, prompts, prompts, N, cfg)
  assert margin > 1e-4
  out = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N,
                             amateur=amateur, amateur_params=ap, config=cfg)
  np.testing.assert_array_equal(out.tokens, ref)
  # the amateur is the expert itself, reading only the last 2 prompt tokens
  arr = np.array([prompts[0], prompts[1] + [0] * 4])
  weak, weak_len = last_tokens(arr, [7, 3], 2)
  assert weak.tolist() == [[6, 7], [10, 11]] and weak_len.tolist() == [2, 2]
  ref, margin = reference_cd(expert, ep, expert, ep, prompts, weak.tolist(), N, cfg)
  assert margin > 1e-4
  out = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N,
                             amateur_prompts=weak, amateur_prompt_lengths=weak_len, config=cfg)
  np.testing.assert_array_equal(out.tokens, ref)


def test_alpha_one_and_identical_amateur_are_the_experts_greedy(tiny):
  expert, ep, amateur, ap = tiny
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 10, 11]]
  ref = generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N).tokens
  out = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N,
                             amateur=amateur, amateur_params=ap, config=CDConfig(alpha=1.0))
  np.testing.assert_array_equal(out.tokens, ref)
  same = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N)
  np.testing.assert_array_equal(same.tokens, ref)
  # and CD does change the decoding when the amateur differs (else these tests prove little)
  cd = contrastive_generate(expert, ep, prompts, jax.random.key(0), max_new_tokens=N,
                            amateur=amateur, amateur_params=ap, config=CDConfig(alpha=0.1))
  assert (np.asarray(cd.tokens) != np.asarray(ref)).any()


def test_sampling_matches_closed_form_chi_square(bigrams):
  """Two sampled tokens per row, 20,000 rows: the joint (x0, x1) against the closed form
  P(x0) P(x1 | x0) from the tables (the amateur reads a different prompt, so step 0 differs from
  step 1's pairing of tables); a sampler that ignores the amateur is rejected by the same test."""
  expert, ep, amateur, ap = bigrams
  cfg, rows = CDConfig(alpha=0.05, temperature=0.7), 20_000
  e, a = np.asarray(ep["table"]), np.asarray(ap["table"])
  p0 = cd_distribution(e[3][None], a[8][None], cfg)[0]
  p1 = cd_distribution(e, a, cfg)  # row x0: P(x1 | x0)
  joint = (p0[:, None] * p1).ravel()
  out = contrastive_generate(expert, ep, np.full((rows, 1), 3), jax.random.key(11),
                             max_new_tokens=2, amateur=amateur, amateur_params=ap,
                             amateur_prompts=np.full((rows, 1), 8), config=cfg)
  toks = np.asarray(out.tokens)
  counts = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
  # (a draw outside V_head, where the joint is 0, makes the p-value 0)
  assert counts_pvalue(counts, joint) > 1e-3
  # negative control: the expert alone, truncated to V_head and tempered the same way
  no_amateur = CDConfig(alpha=cfg.alpha, temperature=cfg.temperature)
  wrong0 = cd_distribution(e[3][None], np.zeros((1, V)), no_amateur)[0]
  wrong = (wrong0[:, None] * cd_distribution(e, np.zeros((V, V)), no_amateur)).ravel()
  wrong_counts = np.random.default_rng(0).multinomial(rows, wrong)
  assert counts_pvalue(wrong_counts, joint) < 1e-6
  assert counts_pvalue(counts, wrong) < 1e-6


class TestBadInput:
  def test_vocab_mismatch(self, bigrams, tiny):
    expert, ep, *_ = tiny
    _, _, amateur, ap = bigrams
    with pytest.raises(ValueError, match="amateur: its vocabulary"):
      contrastive_generate(expert, ep, [[1, 2]], jax.random.key(0), max_new_tokens=4,
                           amateur=amateur, amateur_params=ap)

  @pytest.mark.parametrize("kw,match", [
      (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(temperature=-1.0),
                                                              "temperature"),
      (dict(amateur_temperature=0.0), "amateur_temperature"), (dict(alpa=0.1), "unknown"),
  ])
  def test_config(self, kw, match):
    with pytest.raises(ValueError, match=match):
      cd_config(**kw)

  @pytest.mark.parametrize("kw,match", [
      (dict(amateur_prompts=[[1], [2], [3]]), "amateur_prompts: batch"),
      (dict(amateur_prompts=[[1, 99], [2]]), "amateur_prompts"),
      (dict(amateur_prompt_lengths=[1, 1]), "amateur_prompt_lengths"),
      (dict(prompts=[[1, V]]), "prompts"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(eos_id=-1), "eos_id"),
      (dict(amateur=BigramModel(vocab_size=V)), "amateur_params"),
  ])
  def test_decode_args(self, bigrams, kw, match):
    expert, ep, *_ = bigrams
    args = dict(prompts=[[1, 2], [3]], max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
      contrastive_generate(expert, ep, key=jax.random.key(0), **args)

  def test_context_and_types(self, tiny):
    expert, ep, *_ = tiny
    with pytest.raises(ValueError, match="context"):
      contrastive_generate(expert, ep, [[1, 2]], jax.random.key(0), max_new_tokens=63)
    with pytest.raises(TypeError, match="config"):
      contrastive_generate(expert, ep, [[1, 2]], jax.random.key(0), max_new_tokens=4,
                           config={"alpha": 0.1})
    with pytest.raises(ValueError, match="m"):
      last_tokens([[1, 2]], [2], 0)
