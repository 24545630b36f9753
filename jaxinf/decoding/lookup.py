"""Training-free drafts retrieved from the context: prompt lookup and Alipay's trie Lookahead,
and the draft → verify loop every training-free accelerator here runs in (also `jacobi.py`).

    out = prompt_lookup_generate(model, params, prompts, key, max_new_tokens=64, ngram=3,
                                 draft_len=7)
    out.lengths / out.target_calls        # tokens per target call (SpeculativeOutput)

One round (the lead's speculative round, widened to K branches): the cache holds the context but
its last token c (pending); a drafter proposes K branches of γ tokens (padded, `n_draft` real
ones); the target runs one `step` over [c, d_1..d_γ] on B·K rows (each prompt row expanded into K
cache rows with `model.select` once, after prefill); the acceptance rule picks the accepted prefix
and the next token; the winner's cache is selected back into all K rows and `rollback(keep = 1 +
n_accept)` undoes the rest exactly — a length pointer for a KV cache, the kept state history for
the recurrent families. Fixed buffers throughout: the context [B, T + max_new + γ + 1], the
output [B, max_new + γ + 1], the cache of T + max_new + γ positions.

Acceptance. One branch (K = 1): `verify.verify`, with q = None for point-mass drafts (everything
here but SJD, which passes the distribution its guesses were drawn from). K branches of point-mass
drafts: `verify_branches`, the rule "draw y ~ p and keep the draft while y = x" of `verify.py`
taken over a tree: at depth i all branches share one Gumbel noise vector, so branches with the
same prefix draw the same y_i (Gumbel-max: y = argmax(log p + g) is an exact draw from p); the
accepted path is the one the draws follow, and the emitted tokens are exact draws from p along it.
Verifying each branch with its own coins and keeping the longest is *not* exact (it favours
drafted tokens); tests/decoding/test_lookup.py shows the chi-square test rejecting it. Greedy
targets reduce both rules to "accept while the draft is the argmax".

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
import numpy as np

from jaxinf.decoding import sampling
from jaxinf.decoding.checks import check_block, check_prompts, check_sampler
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import SpeculativeOutput, append_tokens, probs, verify
from jaxinf.models.functional import check_int

# ---------------------------------------------------------------------------------------------
# The acceptance rule for several point-mass branches


def verify_branches(key, p: jax.Array, drafts: jax.Array,
                    n_draft: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exact acceptance of K deterministic draft branches at once.

  p: `[B, K, γ+1, V]` target probabilities of each branch's verified block (as in `verify`).
  drafts: `[B, K, γ]` ids; n_draft: `[B, K]` real drafts per branch (the rest never accepted).

  At depth i every branch draws y_i = argmax(log p_i + g_i) with the same Gumbel noise g_i, so
  branches that agree up to depth i draw the same token there; a branch is accepted while its
  drafts equal the draws. The longest accepted branch wins. Every emitted token is an exact draw
  from p given the tokens before it, whatever the branches are (the branches only decide where
  the round stops). Returns (best [B], n_accept [B], next_token [B]).
  """
  b, k, g1, v = p.shape
  g = g1 - 1
  noise = jax.random.gumbel(key, (b, 1, g1, v), jnp.float32)
  logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
  draws = jnp.argmax(logp + noise, axis=-1).astype(jnp.int32)          # [B, K, γ+1]
  match = (draws[..., :g] == drafts) & (jnp.arange(g) < n_draft[..., None])
  n = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)  # [B, K]
  best = jnp.argmax(n, axis=-1).astype(jnp.int32)
  rows = jnp.arange(b)
  n_accept = n[rows, best].astype(jnp.int32)
  return best, n_accept, draws[rows, best, n_accept]


def _single_branch_rule(key, p, drafts, n_draft, q):
  """K = 1: the shared `verify` (q None for point masses)."""
  n_accept, nxt = verify(key, p[:, 0], drafts[:, 0], None if q is None else q[:, 0],
                         n_draft[:, 0])
  return jnp.zeros_like(n_accept), n_accept, nxt


def _branches_rule(key, p, drafts, n_draft, q):
  del q  # multi-branch drafts are point masses
  return verify_branches(key, p, drafts, n_draft)


# ---------------------------------------------------------------------------------------------
# Input checks shared by every training-free decoder (run before tracing)


@dataclasses.dataclass(frozen=True)
class Checked:
  prompts: np.ndarray   # [B, T] int32
  lengths: np.ndarray   # [B] int32
  cap: int              # cache positions


def check_inputs(model, prompts, prompt_lengths, *, max_new_tokens, sampler, eos_id, pad_id,
                 max_len, step_tokens: int, step_arg: str = "draft_len") -> Checked:
  """`generate`'s checks (`checks.check_prompts`), plus: the sampler is stateless, one step of
  `step_tokens` tokens fits the model's `max_step`, and the cache holds the longest prompt, the
  new tokens and one block of drafts past them (T + max_new_tokens + γ, γ = step_tokens - 1).
  `step_arg` names the option that sets γ in the messages."""
  prompts, lengths, cap = check_prompts(model, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, max_len=max_len, extra=step_tokens - 1)
  check_sampler(sampler, model.vocab_size, stateless=True)
  check_block(model, "model", step_tokens, step_arg)
  return Checked(prompts, lengths, cap)


# ---------------------------------------------------------------------------------------------
# The draft -> verify loop


def draft_verify_loop(model, params, prompts, lengths, key, *, drafter, sampler: SamplerConfig,
                      max_new_tokens: int, eos_id: int | None, pad_id: int, cap: int,
                      rule=None) -> SpeculativeOutput:
  """Prefill, then one `lax.while_loop` of draft → step → accept → rollback rounds (jittable;
  the public functions check their inputs and jit this).

  `drafter` (static, hashable) provides `branches` K, `draft_len` γ, and
    `init(key, ctx, ctx_len, prompt_lengths) -> state`,
    `propose(state, ctx, ctx_len) -> (drafts [B, K, γ], n_draft [B, K], q [B, K, γ, V] | None)`
      (q: the distributions sampled drafts were drawn from; None for point masses),
    `update(state, key, logits [B, K, γ+1, V], p, best, n_accept, next_token) -> state`.
  `rule(key, p, drafts, n_draft, q) -> (best, n_accept, next_token)` defaults to `verify` (K = 1)
  or `verify_branches` (K > 1); tests pass biased rules here as negative controls.

  Round r draws with fold_in(key, r) (r = 0: the first token, from the prefill logits).
  Counters: target_calls counts rounds in which the row was still running; drafted counts the real
  drafts of all K branches, accepted the drafts kept.
  """
  b, t = prompts.shape
  k, g = drafter.branches, drafter.draft_len
  if rule is None:
    rule = _single_branch_rule if k == 1 else _branches_rule
  rows = jnp.arange(b)
  cache = model.init_cache(b, cap)
  logits, cache = model.prefill(params, prompts, cache, lengths)
  first, _, _ = sampling.sample_token(sampler, jax.random.fold_in(key, 0),
                                      logits[rows, lengths - 1], {})
  first = first.astype(jnp.int32)
  if k > 1:
    cache = model.select(cache, jnp.repeat(rows, k))

  width = t + max_new_tokens + g + 1
  valid = jnp.arange(t)[None] < lengths[:, None]
  ctx = jnp.full((b, width), pad_id, jnp.int32).at[:, :t].set(jnp.where(valid, prompts, pad_id))
  ctx = ctx.at[rows, lengths].set(first)
  ctx_len = lengths + 1
  out = jnp.full((b, max_new_tokens + g + 1), pad_id, jnp.int32).at[:, 0].set(first)
  pos = jnp.ones((b,), jnp.int32)
  done = (first == eos_id) if eos_id is not None else jnp.zeros((b,), bool)
  zeros = jnp.zeros((b,), jnp.int32)
  state = drafter.init(jax.random.fold_in(jax.random.fold_in(key, 0), 1), ctx, ctx_len, lengths)

  def cond(carry):
    _, _, _, _, pos, done, *_ = carry
    return jnp.any(~done & (pos < max_new_tokens))

  def body(carry):
    r, cache, ctx, ctx_len, pos, done, out, state, calls, drafted, accepted = carry
    active = ~done & (pos < max_new_tokens)
    kr = jax.random.fold_in(key, r)
    pending = ctx[rows, ctx_len - 1]
    drafts, n_draft, q = drafter.propose(state, ctx, ctx_len)
    block = jnp.concatenate([jnp.broadcast_to(pending[:, None, None], (b, k, 1)), drafts], -1)
    logits, cache = model.step(params, block.reshape(b * k, g + 1), cache)
    logits = logits.reshape(b, k, g + 1, -1)
    p = probs(sampler, logits)
    best, n_acc, nxt = rule(jax.random.fold_in(kr, 0), p, drafts, n_draft, q)

    # the emitted block: the winner's accepted drafts, then the next token
    idx = jnp.arange(g + 1)[None]
    won = jnp.concatenate([drafts[rows, best], jnp.zeros((b, 1), jnp.int32)], -1)
    new = jnp.where(idx < n_acc[:, None], won, jnp.where(idx == n_acc[:, None], nxt[:, None],
                                                          pad_id))
    n_new = jnp.where(active, n_acc + 1, 0)
    out, pos, done, n_written = append_tokens(out, pos, new, n_new, done, eos_id)
    cols = ctx_len[:, None] + idx
    ctx = ctx.at[rows[:, None], cols].set(jnp.where(idx < n_written[:, None], new,
                                                    ctx[rows[:, None], cols]))
    ctx_len = ctx_len + n_written

    # the winner's cache into all K rows, then keep its pending token and accepted drafts
    keep = jnp.where(active, 1 + n_acc, 0)
    if k > 1:
      cache = model.select(cache, jnp.repeat(rows * k + best, k))
      keep = jnp.repeat(keep, k)
    cache = model.rollback(cache, keep)
    state = drafter.update(state, jax.random.fold_in(kr, 1), logits, p, best, n_acc, nxt)

    n_real = jnp.sum(n_draft, axis=1).astype(jnp.int32)
    calls = calls + active.astype(jnp.int32)
    drafted = drafted + jnp.where(active, n_real, 0)
    accepted = accepted + jnp.where(active, n_acc, 0)
    return r + 1, cache, ctx, ctx_len, pos, done, out, state, calls, drafted, accepted

  carry = (jnp.int32(1), cache, ctx, ctx_len, pos, done, out, state, zeros, zeros, zeros)
  carry = jax.lax.while_loop(cond, body, carry)
  _, _, _, _, pos, _, out, _, calls, drafted, accepted = carry
  n = jnp.minimum(pos, max_new_tokens)
  tokens = jnp.where(jnp.arange(max_new_tokens)[None] < n[:, None], out[:, :max_new_tokens],
                     pad_id)
  return SpeculativeOutput(tokens, n, calls, drafted, accepted)


_STATIC = ("model", "drafter", "sampler", "max_new_tokens", "eos_id", "pad_id", "cap", "rule")
run_drafted = jax.jit(draft_verify_loop, static_argnames=_STATIC)


def run_checked(model, params, checked: Checked, key, drafter, *, sampler, max_new_tokens, eos_id,
                pad_id, rule=None) -> SpeculativeOutput:
  """Runs the jitted loop on checked inputs and waits for it (as `generate` does)."""
  out = run_drafted(model, params, jnp.asarray(checked.prompts), jnp.asarray(checked.lengths),
                    key, drafter=drafter, sampler=sampler, max_new_tokens=max_new_tokens,
                    eos_id=eos_id, pad_id=pad_id, cap=checked.cap, rule=rule)
  return jax.block_until_ready(out)


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
  the cache. One step takes draft_len + 1 tokens, which must fit the model's `max_step`.
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


__all__ = ["prompt_lookup_generate", "trie_lookahead_generate", "verify_branches",
           "draft_verify_loop", "suffix_match_lengths", "check_inputs", "PromptLookupDrafter",
           "TrieDrafter"]

