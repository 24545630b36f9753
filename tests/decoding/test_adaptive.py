"""Entropy Adaptive Decoding: the compiled loop (lazy catch-up of the idle model through a fixed
buffer + rollback) against plain `generate` at the never/always-switch extremes, and against a
plain host loop (both models stepped one token at a time, the rolling entropy in numpy float64)
on a Mamba small model and a transformer large model; bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.decoding import sampling
from jaxinf.decoding.adaptive import EADConfig, ead_config, ead_generate, large_token_share
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models.mamba import MambaLM, mamba_config
from jaxinf.models.transformer import TransformerLM, transformer_config

from .bigram import BigramModel

N = 20
PROMPTS = [[1, 2, 3, 4, 5], [7, 8]]


@pytest.fixture(scope="module")
def pair():
  """Random tiny models whose entropies spread over ~2-5 bits (the default init scales give
  near-uniform distributions, where every switch would hang on rounding)."""
  small = MambaLM(mamba_config("mamba-tiny", init_std=0.2), max_step=8)
  large = TransformerLM(transformer_config("transformer-tiny", init_std=0.3))
  return small, small.init_params(1), large, large.init_params(2)


def entropy_np(logits):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1) / np.log(2.0)


def reference_ead(small, sp, large, lp, prompts, n, cfg, sampler, key, eos_id=None, pad_id=0):
  """The rule read plainly: both models see every token as it is made (k = 1 steps), the rolling
  mean over the last `window` entropies in float64, switches allowed after `min_run` tokens."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  b, t = len(prompts), int(lengths.max())
  arr = np.zeros((b, t), np.int32)
  for r, p in enumerate(prompts):
    arr[r, :len(p)] = p
  models, params, caches, logits = (small, large), (sp, lp), [], []
  for m, p in zip(models, params):
    lg, cache = m.prefill(p, arr, m.init_cache(b, t + n), lengths)
    caches.append(cache)
    logits.append(np.asarray(lg)[np.arange(b), lengths - 1])
  use = entropy_np(logits[0]) > cfg.threshold
  run = np.zeros(b, int)
  done = np.zeros(b, bool)
  toks, flags, hs, margins = [], [], [], []
  state = sampling.init_state(sampler, b)
  for i in range(n):
    lg = np.where(use[:, None], logits[1], logits[0])
    tok, state, _ = sampling.sample_token(sampler, jax.random.fold_in(key, i),
                                          lg.astype(np.float32), state)
    tok = np.where(done, pad_id, np.asarray(tok))
    toks.append(tok)
    flags.append(use & ~done)
    hs.append(entropy_np(lg))
    if eos_id is not None:
      done = done | (tok == eos_id)
    run += 1
    mean = np.mean(hs[max(0, i - cfg.window + 1):], axis=0)
    margins.append(np.abs(mean - cfg.threshold))
    want = mean > cfg.threshold
    switch = (want != use) & (run >= cfg.min_run)
    use, run = np.where(switch, want, use), np.where(switch, 0, run)
    for j, (m, p) in enumerate(zip(models, params)):
      lg, caches[j] = m.step(p, tok[:, None].astype(np.int32), caches[j])
      logits[j] = np.asarray(lg)[:, 0]
  return np.stack(toks, 1), np.stack(flags, 1), np.stack(hs, 1), np.min(margins)


def test_threshold_inf_is_the_small_model_and_minus_inf_the_large(pair):
  small, sp, large, lp = pair
  key = jax.random.key(0)
  for thr, model, params, share in ((np.inf, small, sp, 0.0), (-np.inf, large, lp, 1.0)):
    out = ead_generate(small, sp, large, lp, PROMPTS, key, max_new_tokens=N,
                       config=EADConfig(window=3, threshold=thr, catch_up=4))
    ref = generate(model, params, PROMPTS, key, max_new_tokens=N)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert large_token_share(out) == share
    assert np.asarray(out.large).all() == bool(share) and np.asarray(out.large).any() == bool(share)
    # the model never needed never steps (its catch-up is deferred to when it is needed)
    steps = np.asarray(out.model_steps)
    assert steps[int(share)] == N - 1 and steps[1 - int(share)] == 0


@pytest.mark.parametrize("cfg,sampler", [
    (EADConfig(window=3, threshold=4.0, catch_up=3), sampling.GREEDY),
    (EADConfig(window=2, threshold=4.2, eager=True, min_run=3), SamplerConfig(temperature=0.8)),
])
def test_mixed_switching_equals_host_loop(pair, cfg, sampler):
  small, sp, large, lp = pair
  key = jax.random.key(7)
  toks, flags, hs, margin = reference_ead(small, sp, large, lp, PROMPTS, N, cfg, sampler, key)
  # a meaningful case: both models make tokens, and no rolling mean sits at the threshold
  # (float32 against float64 rounding could flip such a switch)
  assert 0 < flags.mean() < 1 and margin > 1e-3
  out = ead_generate(small, sp, large, lp, PROMPTS, key, max_new_tokens=N, config=cfg,
                     sampler=sampler)
  np.testing.assert_array_equal(out.tokens, toks)
  np.testing.assert_array_equal(out.large, flags)
  np.testing.assert_allclose(out.entropy, hs, rtol=1e-4, atol=1e-4)
  assert large_token_share(out) == flags.sum() / flags.size
  steps = np.asarray(out.model_steps)
  if cfg.eager:
    assert steps.tolist() == [N - 1, N - 1]
  else:  # catching up on more than C missed tokens took several C-token steps
    made = [(~flags[:, 1:]).any(0).sum(), flags[:, 1:].any(0).sum()]
    assert (steps >= made).all() and (steps > made).any()


def test_rows_stop_at_their_own_eos(pair):
  small, sp, large, lp = pair
  cfg, key = EADConfig(window=3, threshold=4.0, catch_up=4), jax.random.key(7)
  toks, *_ = reference_ead(small, sp, large, lp, PROMPTS, N, cfg, sampling.GREEDY, key)
  row1 = toks[1].tolist()
  eos = next(x for i, x in enumerate(row1) if i >= 3 and x not in row1[:i])
  ref, flags, *_ = reference_ead(small, sp, large, lp, PROMPTS, N, cfg, sampling.GREEDY, key,
                                 eos_id=eos)
  out = ead_generate(small, sp, large, lp, PROMPTS, key, max_new_tokens=N, config=cfg,
                     eos_id=eos)
  lengths = np.asarray(out.lengths)
  assert lengths[1] == row1.index(eos) + 1
  for r in range(2):
    np.testing.assert_array_equal(out.tokens[r, :lengths[r]], ref[r, :lengths[r]])
    np.testing.assert_array_equal(out.large[r, :lengths[r]], flags[r, :lengths[r]])
    assert (np.asarray(out.tokens[r, lengths[r]:]) == 0).all()
    assert not np.asarray(out.large[r, lengths[r]:]).any()


class TestBadInput:
  def test_vocab_mismatch(self, pair):
    small, sp, *_ = pair
    other = BigramModel(vocab_size=32)
    with pytest.raises(ValueError, match="large: its vocabulary"):
      ead_generate(small, sp, other, other.init_params(jax.random.key(0)), PROMPTS,
                   jax.random.key(0), max_new_tokens=4)

  @pytest.mark.parametrize("kw,match", [
      (dict(window=0), "window"), (dict(catch_up=0), "catch_up"), (dict(min_run=1.5), "min_run"),
      (dict(eager=1), "eager"),
      (dict(threshold=float("nan")), "threshold"), (dict(windw=3), "unknown EAD option"),
  ])
  def test_config(self, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
      ead_config(**kw)

  @pytest.mark.parametrize("kw,match", [
      (dict(prompts=[[1, 64]]), "prompts"),
      (dict(prompts=np.zeros((2, 3), np.float32)), "prompts"),
      (dict(prompts=np.zeros((2, 3), np.int32), prompt_lengths=[3, 4]), "lengths"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(eos_id=64), "eos_id"),
      (dict(max_new_tokens=60), "context"),
  ])
  def test_decode_args(self, pair, kw, match):
    small, sp, large, lp = pair
    args = dict(prompts=PROMPTS, max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
      ead_generate(small, sp, large, lp, key=jax.random.key(0), **args)

  def test_types(self, pair):
    small, sp, large, lp = pair
    with pytest.raises(TypeError, match="config"):
      ead_generate(small, sp, large, lp, PROMPTS, jax.random.key(0), max_new_tokens=4,
                   config=dict(window=3))
    with pytest.raises(TypeError, match="sampler"):
      ead_generate(small, sp, large, lp, PROMPTS, jax.random.key(0), max_new_tokens=4,
                   sampler="greedy")
