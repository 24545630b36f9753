"""Prompt lookup and trie Lookahead: greedy output against plain `generate` (a transformer and a
recurrent target, ragged prompts, EOS), the retrieval against plain-Python references, exactness
under sampling by a chi-square test against the closed-form bigram law (with biased rules as
negative controls), and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.lookup import (PromptLookupDrafter, TrieDrafter, prompt_lookup_generate,
                                    trie_lookahead_generate)
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import verify

from . import training_free_cases as cases
from .families import tiny_model

# --- greedy: token for token equal to generate ------------------------------------------------

TRIE = dict(ngram=3, draft_len=5, branches=3, max_candidates=8)


@pytest.mark.parametrize("family,decode,kwargs", [
    ("transformer", prompt_lookup_generate, dict(ngram=3, draft_len=5)),
    ("transformer", trie_lookahead_generate, TRIE),
    ("rwkv7", trie_lookahead_generate, TRIE),   # recurrent: select + rollback of the history
    # compiles slowly on CPU: slow (CI runs it)
    pytest.param("rwkv7", prompt_lookup_generate, dict(ngram=3, draft_len=5),
                 marks=pytest.mark.slow),
], ids=["transformer-prompt_lookup", "transformer-trie", "rwkv7-trie", "rwkv7-prompt_lookup"])
def test_greedy_equals_generate(family, decode, kwargs):
  accepted = cases.check_greedy_and_counters(family, decode, **kwargs)
  assert accepted.sum() > 0  # repetitive prompts: drafts from the context are accepted


# --- retrieval against plain Python -----------------------------------------------------------


def _match_len(ctx, j, ngram):
  m = 0
  while m < ngram and j - m >= 0 and ctx[j - m] == ctx[len(ctx) - 1 - m]:
    m += 1
  return m


def python_prompt_lookup(ctx, ngram, draft_len):
  """Saxena (2023), read plainly: n from ngram down to 1, the occurrences of the last n tokens
  (ending before the last position); the most recent with draft_len tokens after it, else the
  most recent."""
  for n in range(ngram, 0, -1):
    tail = ctx[-n:]
    ends = [j for j in range(n - 1, len(ctx) - 1) if ctx[j - n + 1:j + 1] == tail]
    if ends:
      full = [j for j in ends if j + draft_len <= len(ctx) - 1]
      j = max(full) if full else max(ends)
      return ctx[j + 1:j + 1 + draft_len]
  return []


def python_trie(ctx, ngram, draft_len, branches, max_candidates):
  """A dict trie of the continuations of the context's suffix: occurrences ordered by match
  length then recency (max_candidates of them), identical continuations merged and counted,
  the top branches by (match length, count, most recent occurrence)."""
  occ = [(_match_len(ctx, j, ngram), j) for j in range(len(ctx) - 1)]
  occ = sorted([o for o in occ if o[0] > 0], reverse=True)[:max_candidates]
  trie: dict[tuple, list] = {}
  for m, j in occ:
    path = tuple(ctx[j + 1:j + 1 + draft_len])
    if path not in trie:
      trie[path] = [m, 0, j]
    trie[path][1] += 1
  ranked = sorted(trie.items(), key=lambda kv: tuple(kv[1]), reverse=True)[:branches]
  return [list(path) for path, _ in ranked]


def _contexts(seed, batch=24, width=24, vocab=4):
  rng = np.random.default_rng(seed)
  ctx = rng.integers(0, vocab, (batch, width)).astype(np.int32)
  ctx_len = rng.integers(2, width + 1, batch).astype(np.int32)
  return ctx, ctx_len


def test_prompt_lookup_retrieval_equals_python():
  ctx, ctx_len = _contexts(0)
  drafter = PromptLookupDrafter(ngram=3, draft_len=4, pad_id=0)
  drafts, n, _ = jax.jit(drafter.propose)((), jnp.asarray(ctx), jnp.asarray(ctx_len))
  short = 0
  for b in range(len(ctx)):
    want = python_prompt_lookup(ctx[b, :ctx_len[b]].tolist(), 3, 4)
    assert np.asarray(drafts[b, 0, :n[b, 0]]).tolist() == want
    short += 0 < len(want) < 4
  assert short > 0  # some drafts were cut at the end of the context


def test_trie_retrieval_equals_python():
  ctx, ctx_len = _contexts(1)
  drafter = TrieDrafter(ngram=3, draft_len=3, branches=3, max_candidates=6, pad_id=0)
  drafts, n, _ = jax.jit(drafter.propose)((), jnp.asarray(ctx), jnp.asarray(ctx_len))
  merged = 0
  for b in range(len(ctx)):
    want = python_trie(ctx[b, :ctx_len[b]].tolist(), 3, 3, 3, 6)
    got = [np.asarray(drafts[b, k, :n[b, k]]).tolist() for k in range(3) if n[b, k] > 0]
    assert got == want
    merged += len(want) < min(3, ctx_len[b] - 1)
  assert merged > 0  # some contexts had repeated continuations, merged by the trie


# --- exactness under sampling -----------------------------------------------------------------

PROMPT = [0, 1, 2, 0, 1, 3, 0, 1, 4, 0, 1]  # "0 1" followed by three different continuations


def _sample(drafter, rule=None):
  return cases.sample_rows(drafter, PROMPT, 11, rule)


def independent_branches(key, p, drafts, n_draft, q):
  """Biased: each branch verified with its own coins, the longest kept."""
  b, k, g = drafts.shape
  n, nxt = verify(key, p.reshape(b * k, g + 1, -1), drafts.reshape(b * k, g), None,
                  n_draft.reshape(b * k))
  n, nxt = n.reshape(b, k), nxt.reshape(b, k)
  best = jnp.argmax(n, axis=1)
  rows = jnp.arange(b)
  return best, n[rows, best], nxt[rows, best]


def test_the_closed_form_is_the_samplers_law():
  cases.check_transition_is_the_samplers()


def test_prompt_lookup_is_exact_under_sampling_and_the_test_rejects_no_residual():
  drafter = PromptLookupDrafter(ngram=3, draft_len=3, pad_id=0)
  out, (p123, p234) = _sample(drafter)
  assert int(out.accepted.sum()) > cases.ROWS // 2  # drafts were accepted, so were tested
  assert min(p123, p234) > 1e-3, (p123, p234)
  _, (b123, b234) = _sample(drafter, cases.no_residual)
  assert min(b123, b234) < 1e-6, (b123, b234)


def test_trie_is_exact_under_sampling_and_the_test_rejects_independent_branches():
  drafter = TrieDrafter(ngram=3, draft_len=3, branches=3, max_candidates=8, pad_id=0)
  out, (p123, p234) = _sample(drafter)
  assert int(out.accepted.sum()) > cases.ROWS // 2
  assert min(p123, p234) > 1e-3, (p123, p234)
  _, (b123, b234) = _sample(drafter, independent_branches)
  assert min(b123, b234) < 1e-6, (b123, b234)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", [prompt_lookup_generate, trie_lookahead_generate])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ngram=0), ValueError, "ngram"),
    (dict(draft_len=0), ValueError, "draft_len"),
    (dict(draft_len=2.5), ValueError, "draft_len"),
    (dict(sampler="greedy"), TypeError, "sampler"),
    (dict(sampler=SamplerConfig(temperature=1.0, mirostat=2)), ValueError, "sampler"),
    (dict(sampler=SamplerConfig(temperature=1.0, repetition_penalty=1.2)), ValueError,
     "sampler"),
    (dict(sampler=SamplerConfig(temperature=1.0, top_k=99)), ValueError, "top_k"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(eos_id=16), ValueError, "eos_id"),
    (dict(prompt_lengths=np.array([2])), ValueError, "prompt_lengths"),
    (dict(prompt_lengths=np.array([0, 2])), ValueError, "prompt_lengths"),
])
def test_bad_input_is_named(decode, kwargs, error, match):
  model, params = tiny_model("rwkv7")
  args = dict(max_new_tokens=4, draft_len=3)
  args.update(kwargs)
  prompts = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
  with pytest.raises(error, match=match):
    decode(model, params, prompts, jax.random.key(0), **args)


@pytest.mark.parametrize("prompts,match", [
    (np.zeros((2, 3, 1), np.int32), "prompts"),
    (np.zeros((2, 3), np.float32), "prompts"),
    (np.array([[1, 99]], np.int32), "prompts"),
    ([], "prompts"),
])
def test_bad_prompts_are_named(prompts, match):
  model, params = tiny_model("rwkv7")
  with pytest.raises(ValueError, match=match):
    prompt_lookup_generate(model, params, prompts, jax.random.key(0), max_new_tokens=4)


def test_branch_options_and_context_are_checked():
  model, params = tiny_model("transformer")  # max_len 128
  prompts = np.array([[1, 2, 3]], np.int32)
  with pytest.raises(ValueError, match="branches"):
    trie_lookahead_generate(model, params, prompts, jax.random.key(0), max_new_tokens=4,
                            branches=0)
  with pytest.raises(ValueError, match="max_candidates"):
    trie_lookahead_generate(model, params, prompts, jax.random.key(0), max_new_tokens=4,
                            branches=4, max_candidates=2)
  with pytest.raises(ValueError, match="max_len"):
    prompt_lookup_generate(model, params, prompts, jax.random.key(0), max_new_tokens=4,
                           draft_len=4, max_len=8)
  with pytest.raises(ValueError, match="context"):
    prompt_lookup_generate(model, params, prompts, jax.random.key(0), max_new_tokens=120,
                           draft_len=7)
