"""Training-free drafts retrieved from the context: prompt lookup and Alipay's trie Lookahead,
both run in the draft → verify loop of `draft_verify.py`.

    out = prompt_lookup_generate(model, params, prompts, key, max_new_tokens=64, ngram=3,
                                 draft_len=7)
    out.lengths / out.target_calls        # tokens per target call (SpeculativeOutput)

Both drafts are point masses: one branch is verified by `verify.verify`, K branches by
`verify.verify_branches` (exact: the coupled Gumbel draws of `verify.py`).

Drafters:

- Prompt lookup decoding (Saxena 2023): the last n context tokens, n from `ngram` down to 1, are
  matched against every earlier position of the context buffer with array ops; the γ tokens
  that followed an occurrence of the longest matching n-gram are the draft: the most recent
  occurrence with γ tokens after it, else the most recent one (fewer real tokens: `n_draft`
  counts them).
- Lookahead (Zhao et al. 2024, "Lookahead: An Inference Acceleration Framework for Large Language
  Model with Lossless Generation Accuracy", Sec. 3-4): multi-branch retrieval from the n-grams of
  the prompt and the generated text. Their trie maps a token prefix to the continuations that
  followed it, with frequencies. The equivalent fixed-size array form used here: every occurrence
  of a suffix of the context (longest match first, then most recent, `max_candidates` of them) is a
  branch holding the γ tokens that followed it; identical branches are merged and counted (the
  trie's node frequency); the K distinct branches with the longest match, then highest frequency,
  then most recent occurrence are verified, in parallel, as K rows ("parallel multi-branch" of
  their Sec. 3.2, not the hierarchical single-row tree, which needs a tree attention mask the
  SequenceModel contract has no place for). The trie is rebuilt from the context each round
  (prompt and generated tokens alike), so it is per request: the paper's global trie shared across
  requests and its pruning are not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinf.decoding import sampling
from jaxinf.decoding.draft_verify import check_inputs, run_checked
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import SpeculativeOutput
from jaxinf.config import check_int

# ---------------------------------------------------------------------------------------------
# Retrieval from the context buffer


def suffix_match_lengths(ctx: jax.Array, ctx_len: jax.Array, ngram: int) -> jax.Array:
  """m[b, j] = how many of the last `ngram` context tokens match the tokens ending at position j
  (ctx[j - i] == ctx[len - 1 - i] for i < m), for j < len - 1 (something follows j); 0 elsewhere.
  `[B, L]` int32, ngram·L comparisons per row."""
  b, width = ctx.shape
  j = jnp.arange(width)[None]
  run = jnp.ones((b, width), bool)
  m = jnp.zeros((b, width), jnp.int32)
  rows = jnp.arange(b)[:, None]
  for i in range(ngram):
    src, tail = j - i, ctx_len[:, None] - 1 - i
    same = ctx[rows, jnp.maximum(src, 0)] == ctx[rows, jnp.maximum(tail, 0)]
    run = run & same & (src >= 0) & (tail >= 0)
    m = m + run
  return jnp.where(j < ctx_len[:, None] - 1, m, 0)


def _continuations(ctx, ctx_len, ends, draft_len, pad_id):
  """The draft_len tokens after positions `ends` [B, M]: ([B, M, γ] ids, [B, M] real counts)."""
  b = ctx.shape[0]
  idx = ends[..., None] + 1 + jnp.arange(draft_len)
  n = jnp.clip(ctx_len[:, None] - 1 - ends, 0, draft_len)
  toks = ctx[jnp.arange(b)[:, None, None], jnp.minimum(idx, ctx.shape[1] - 1)]
  return jnp.where(jnp.arange(draft_len) < n[..., None], toks, pad_id), n.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PromptLookupDrafter:
  """Saxena (2023) prompt lookup: one branch, the continuation of an occurrence of the longest
  suffix (n <= ngram) of the context: the most recent occurrence followed by a full draft_len
  tokens, else the most recent one (its continuation cut at the end of the context).

  Saxena's code takes the earliest occurrence with a full continuation; the most recent is the
  better guess in generated text that repeats itself with a short period, where the last
  occurrence sits just before the end: on held-out stdlib prompts with the trained
  transformer-1m, greedy, 128 new tokens, draft_len 7, this rule gives 3.6 tokens per target call
  against 2.8 for the earliest and 1.9 for the plain most recent occurrence."""

  ngram: int
  draft_len: int
  pad_id: int
  branches: int = 1

  def init(self, key, ctx, ctx_len, prompt_lengths):
    return ()

  def propose(self, state, ctx, ctx_len):
    m = suffix_match_lengths(ctx, ctx_len, self.ngram)
    width = ctx.shape[1]
    j = jnp.arange(width)[None]
    longest = jnp.max(m, axis=1, keepdims=True)
    full = j + self.draft_len <= ctx_len[:, None] - 1
    score = jnp.where((m == longest) & (longest > 0), j + width * full, -1)
    end = jnp.argmax(score, axis=1)
    drafts, n = _continuations(ctx, ctx_len, end[:, None], self.draft_len, self.pad_id)
    return drafts, jnp.where(longest > 0, n, 0), None

  def update(self, state, key, logits, p, best, n_accept, next_token):
    return state


@dataclasses.dataclass(frozen=True)
class TrieDrafter:
  """Lookahead's multi-branch retrieval (Zhao et al. 2024) as arrays: the `max_candidates`
  occurrences of the context's suffix with the longest match (most recent first) are trie paths
  of γ tokens; identical paths merge and count; the top `branches` paths by (match length,
  count, recency) are the drafts."""

  ngram: int
  draft_len: int
  branches: int
  max_candidates: int
  pad_id: int

  def init(self, key, ctx, ctx_len, prompt_lengths):
    return ()

  def propose(self, state, ctx, ctx_len):
    m = suffix_match_lengths(ctx, ctx_len, self.ngram)
    width = ctx.shape[1]
    c = min(self.max_candidates, width)
    score = jnp.where(m > 0, m * width + jnp.arange(width)[None], -1)
    top, ends = jax.lax.top_k(score, c)                           # [B, C]
    ok = top >= 0
    m_c = jnp.where(ok, top // width, 0)
    paths, n = _continuations(ctx, ctx_len, ends, self.draft_len, self.pad_id)
    same = (jnp.all(paths[:, :, None] == paths[:, None], -1) & (n[:, :, None] == n[:, None])
            & ok[:, :, None] & ok[:, None])                        # [B, C, C]
    count = jnp.sum(same, axis=2)
    earlier = jnp.tril(jnp.ones((c, c), bool), -1)
    first = ok & ~jnp.any(same & earlier[None], axis=2)
    rank = jnp.where(first, (m_c * (c + 1) + count) * width + ends, -1)
    kk = min(self.branches, c)
    chosen, at = jax.lax.top_k(rank, kk)
    rows = jnp.arange(ctx.shape[0])[:, None]
    drafts = paths[rows, at]
    n_draft = jnp.where(chosen >= 0, n[rows, at], 0)
    if kk < self.branches:  # fewer positions than branches: empty branches
      pad = self.branches - kk
      drafts = jnp.pad(drafts, ((0, 0), (0, pad), (0, 0)), constant_values=self.pad_id)
      n_draft = jnp.pad(n_draft, ((0, 0), (0, pad)))
    return drafts, n_draft, None

  def update(self, state, key, logits, p, best, n_accept, next_token):
    return state


# ---------------------------------------------------------------------------------------------
# Public decoders


def prompt_lookup_generate(model, params, prompts, key, *, max_new_tokens: int, ngram: int = 3,
                           draft_len: int = 7, sampler: SamplerConfig = sampling.GREEDY,
                           eos_id: int | None = None, prompt_lengths=None, pad_id: int = 0,
                           max_len: int | None = None) -> SpeculativeOutput:
  """Prompt lookup decoding (Saxena 2023), exact for any stateless sampler: the draft is the
  continuation of an earlier occurrence of the context's last n tokens (n = ngram down to 1; the
  most recent occurrence with `draft_len` tokens after it, else the most recent), a point mass
  verified by `verify.verify`; `draft_len` γ tokens per round (fewer real ones when only a late
  occurrence exists, none without a match: then the round is one plain step).

  Arguments as `generate`; `max_len` (default: longest prompt + max_new_tokens + draft_len) sizes
  the cache. One step takes draft_len + 1 tokens (a recurrent model's `max_step` is raised to
  fit: `checks.check_block`).
  """
  check_int("ngram", ngram)
  check_int("draft_len", draft_len)
  checked = check_inputs(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                         sampler=sampler, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                         step_tokens=draft_len + 1)
  drafter = PromptLookupDrafter(ngram=ngram, draft_len=draft_len, pad_id=pad_id)
  return run_checked(model, params, checked, key, drafter, sampler=sampler,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def trie_lookahead_generate(model, params, prompts, key, *, max_new_tokens: int, ngram: int = 3,
                            draft_len: int = 7, branches: int = 4, max_candidates: int = 32,
                            sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
                            prompt_lengths=None, pad_id: int = 0,
                            max_len: int | None = None) -> SpeculativeOutput:
  """Alipay's Lookahead (Zhao et al. 2024) with parallel multi-branch drafts: `branches` K
  continuations retrieved from the n-grams (n <= ngram) of the prompt and the generated text
  (`TrieDrafter`: the trie as arrays, `max_candidates` occurrences considered per round), verified
  as K cache rows per prompt row in one target step, the longest accepted branch kept
  (`verify_branches`, exact under any stateless sampler). The cache holds K rows per prompt.

  Arguments as `prompt_lookup_generate`.
  """
  check_int("ngram", ngram)
  check_int("draft_len", draft_len)
  check_int("branches", branches)
  check_int("max_candidates", max_candidates)
  if max_candidates < branches:
    raise ValueError(f"max_candidates: expected >= branches ({branches}), got {max_candidates}")
  checked = check_inputs(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                         sampler=sampler, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                         step_tokens=draft_len + 1)
  drafter = TrieDrafter(ngram=ngram, draft_len=draft_len, branches=branches,
                        max_candidates=max_candidates, pad_id=pad_id)
  return run_checked(model, params, checked, key, drafter, sampler=sampler,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


__all__ = ["prompt_lookup_generate", "trie_lookahead_generate", "suffix_match_lengths",
           "PromptLookupDrafter", "TrieDrafter"]

