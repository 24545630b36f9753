"""Parallel decoding from the target's own guesses: Jacobi decoding, lookahead decoding and
Speculative Jacobi Decoding. All run in `draft_verify.draft_verify_loop` (one target `step` over the
pending token and a fixed window of guesses per round, exact `rollback`, fixed buffers) and return
`SpeculativeOutput`.

    out = lookahead_generate(model, params, prompts, key, max_new_tokens=64, window=4, ngram=4,
                             candidates=4)

- Jacobi decoding (Santilli et al. 2023, Sec. 3, eqs. 2-4): the window y_1..y_W of guesses for the
  next W positions is refined in parallel, y_i ← argmax p(· | context, y_<i), by one step per
  iteration. Here the step's input is [c, y_1..y_W] (c the pending token), the guesses are
  verified as point-mass drafts (`verify.verify`: the accepted prefix is the one a greedy loop
  would emit, so the output is the greedy one, the fixed point; under a sampler, exact samples),
  and the next window is the current iteration's argmax at the positions after the next token
  (the positions past the refined ones repeat the last prediction).
- Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
  Lookahead Decoding", Sec. 3, Algorithm 1), in a static form for the SequenceModel contract,
  which has causal steps but no custom attention masks: each prompt row runs as 1 + G cache rows.
  Row 0 is the lookahead branch: a Jacobi window of W guesses on one row (the 2D window's levels
  become the history of each guess: `chain` holds, for guess i, the N-2 guesses it was predicted
  after in earlier iterations, i.e. the diagonal of the paper's 2D window); every iteration it
  emits, for each guess, the n-gram (chain, guess, prediction after it) into the n-gram pool, a
  fixed [V, P, N-1] table per row (keyed by the first token; duplicates skipped; a ring of P per
  key). Rows 1..G are the verification branch: the G most recent pool n-grams whose first token is
  the pending token c, their N-1 tokens as drafts. Row 0's window is itself a candidate (plain
  Jacobi). All 1 + G candidates are verified together by `verify.verify_branches` (exact: the
  paper's greedy rule, and its sampling verification as the coupled point-mass rule). Not
  implemented: the paper's initial-level warm-up from the prompt and its multi-GPU lookahead
  parallelism.
- Speculative Jacobi Decoding (Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image
  Generation with Training-free Speculative Jacobi Decoding", Sec. 3.2, Algorithm 1): the window
  holds *sampled* guesses, each drawn from q_i = the distribution the previous iteration gave
  its position; the guesses are accepted with min(1, p(x)/q(x)) against the current p and the
  first rejected one is resampled from norm(max(0, p − q)) (`verify.verify` with q), and the rest
  of the window is redrawn from the current iteration's distributions (conditioned on the current,
  partly rejected guesses: the Jacobi update). Initial guesses are uniform random tokens with
  q = uniform (the paper's random initialisation); positions past the refined ones are drawn from
  the last distribution of the window. Exact for any stateless sampler.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinf.config import check_int
from jaxinf.decoding import sampling
from jaxinf.decoding.checks import check_model
from jaxinf.decoding.draft_verify import check_inputs, run_checked
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import SpeculativeOutput


def _random_prompt_tokens(key, ctx, prompt_lengths, width):
  """`width` tokens per row drawn uniformly from the row's prompt (the initial guesses)."""
  b = ctx.shape[0]
  at = jax.random.randint(key, (b, width), 0, prompt_lengths[:, None])
  return ctx[jnp.arange(b)[:, None], at]


def _shift(n_accept, window):
  """Index, in the verified block [c, y_1..y_W], of the input each next-window guess follows:
  the next token sits at block position n_accept + 1, guess i' of the next window at
  n_accept + 2 + i', predicted after input n_accept + 1 + i' (clipped to the block's end:
  guesses past the refined ones repeat the last prediction). Returns ([B, W] indices, valid)."""
  src = n_accept[:, None] + 1 + jnp.arange(window)[None]
  return jnp.minimum(src, window), src <= window


@dataclasses.dataclass(frozen=True)
class JacobiDrafter:
  """Santilli et al. (2023): a window of greedy guesses refined by one step per iteration."""

  window: int
  branches: int = 1

  @property
  def draft_len(self) -> int:
    return self.window

  def init(self, key, ctx, ctx_len, prompt_lengths):
    return _random_prompt_tokens(key, ctx, prompt_lengths, self.window)

  def propose(self, state, ctx, ctx_len):
    b = state.shape[0]  # the state is the window of guesses [B, W]
    return state[:, None], jnp.full((b, 1), self.window, jnp.int32), None

  def update(self, state, key, logits, p, best, n_accept, next_token):
    guess = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)   # [B, W+1]
    src, _ = _shift(n_accept, self.window)
    return guess[jnp.arange(guess.shape[0])[:, None], src]


@dataclasses.dataclass(frozen=True)
class LookaheadDrafter:
  """Fu et al. (2024): a one-row Jacobi lookahead branch feeding an n-gram pool, and G pool
  n-grams starting with the pending token as the verification branch (see the module docstring).
  Branch 0 is the Jacobi window (W drafts), branches 1..G pool n-grams (N-1 drafts), padded to
  γ = max(W, N-1)."""

  window: int
  ngram: int
  candidates: int
  pool_size: int
  vocab_size: int
  pad_id: int

  @property
  def branches(self) -> int:
    return 1 + self.candidates

  @property
  def draft_len(self) -> int:
    return max(self.window, self.ngram - 1)

  def init(self, key, ctx, ctx_len, prompt_lengths):
    b, w, n = ctx.shape[0], self.window, self.ngram
    return {"window": _random_prompt_tokens(key, ctx, prompt_lengths, w),
            "chain": jnp.zeros((b, w, n - 2), jnp.int32),
            "chain_n": jnp.zeros((b, w), jnp.int32),
            "pool": jnp.zeros((b, self.vocab_size, self.pool_size, n - 1), jnp.int32),
            "pool_n": jnp.zeros((b, self.vocab_size), jnp.int32)}

  def propose(self, state, ctx, ctx_len):
    b, g, w = ctx.shape[0], self.draft_len, self.window
    rows = jnp.arange(b)
    pending = ctx[rows, ctx_len - 1]
    lookahead = jnp.pad(state["window"], ((0, 0), (0, g - w)), constant_values=self.pad_id)
    filled = state["pool_n"][rows, pending]                               # [B]
    j = jnp.arange(self.candidates)[None]
    slot = jnp.mod(filled[:, None] - 1 - j, self.pool_size)               # most recent first
    grams = state["pool"][rows[:, None], pending[:, None], slot]          # [B, G, N-1]
    grams = jnp.pad(grams, ((0, 0), (0, 0), (0, g - (self.ngram - 1))),
                    constant_values=self.pad_id)
    have = j < jnp.minimum(filled, self.pool_size)[:, None]
    drafts = jnp.concatenate([lookahead[:, None], grams], axis=1)
    n_draft = jnp.concatenate([jnp.full((b, 1), w, jnp.int32),
                               jnp.where(have, self.ngram - 1, 0).astype(jnp.int32)], axis=1)
    return drafts, n_draft, None

  def _insert(self, pool, pool_n, gram, ok):
    """Adds n-gram `gram` [B, N] under its first token unless present (ring of pool_size)."""
    rows = jnp.arange(gram.shape[0])
    first, rest = gram[:, 0], gram[:, 1:]
    slots = pool[rows, first]                                             # [B, P, N-1]
    n = pool_n[rows, first]
    filled = jnp.arange(self.pool_size)[None] < jnp.minimum(n, self.pool_size)[:, None]
    present = jnp.any(jnp.all(slots == rest[:, None], -1) & filled, -1)
    write = ok & ~present
    at = jnp.mod(n, self.pool_size)
    pool = pool.at[rows, first, at].set(jnp.where(write[:, None], rest, pool[rows, first, at]))
    return pool, pool_n.at[rows, first].add(write.astype(jnp.int32))

  def update(self, state, key, logits, p, best, n_accept, next_token):
    w, n = self.window, self.ngram
    window, chain, chain_n = state["window"], state["chain"], state["chain_n"]
    guess = jnp.argmax(logits[:, 0, : w + 1], axis=-1).astype(jnp.int32)   # [B, W+1]
    # n-grams along each guess's diagonal: (its chain, the guess, the prediction after it)
    grams = jnp.concatenate([chain, window[..., None], guess[:, 1:, None]], axis=-1)  # [B, W, N]
    ok = chain_n >= n - 2

    def insert(i, pools):
      return self._insert(*pools, grams[:, i], ok[:, i])

    pool, pool_n = jax.lax.fori_loop(0, w, insert, (state["pool"], state["pool_n"]))
    # the next window and each guess's chain (what it was predicted after)
    rows = jnp.arange(window.shape[0])[:, None]
    src, valid = _shift(n_accept, w)
    after = jnp.concatenate([chain, window[..., None]], axis=-1)[rows, src - 1][..., 1:]
    return {"window": guess[rows, src],
            "chain": jnp.where(valid[..., None], after, 0),
            "chain_n": jnp.where(valid, jnp.minimum(chain_n[rows, src - 1] + 1, n - 2), 0),
            "pool": pool, "pool_n": pool_n}


@dataclasses.dataclass(frozen=True)
class SJDDrafter:
  """Teng et al. (2024): sampled Jacobi guesses with the distributions they were drawn from."""

  window: int
  vocab_size: int
  branches: int = 1

  @property
  def draft_len(self) -> int:
    return self.window

  def init(self, key, ctx, ctx_len, prompt_lengths):
    b, w, v = ctx.shape[0], self.window, self.vocab_size
    return {"window": jax.random.randint(key, (b, w), 0, v, jnp.int32),
            "q": jnp.full((b, w, v), 1.0 / v, jnp.float32)}

  def propose(self, state, ctx, ctx_len):
    b = ctx.shape[0]
    return (state["window"][:, None], jnp.full((b, 1), self.window, jnp.int32),
            state["q"][:, None])

  def update(self, state, key, logits, p, best, n_accept, next_token):
    rows = jnp.arange(p.shape[0])[:, None]
    src, _ = _shift(n_accept, self.window)
    q = p[:, 0][rows, src]                                                # [B, W, V]
    logq = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
    window = jax.random.categorical(key, logq, axis=-1).astype(jnp.int32)
    return {"window": window, "q": q}


# ---------------------------------------------------------------------------------------------


def jacobi_generate(model, params, prompts, key, *, max_new_tokens: int, window: int = 7,
                    sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
                    prompt_lengths=None, pad_id: int = 0,
                    max_len: int | None = None) -> SpeculativeOutput:
  """Jacobi decoding (Santilli et al. 2023): `window` W guesses refined per target step, the
  verified prefix emitted. Greedy output equals `generate`'s; other stateless samplers are exact
  (the guesses are point-mass drafts). One step takes W + 1 tokens (`checks.check_block`).
  Arguments otherwise as `generate`; `max_len` defaults to longest prompt + max_new_tokens + W."""
  check_int("window", window)
  checked = check_inputs(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                         sampler=sampler, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                         step_tokens=window + 1, step_arg="window")
  return run_checked(model, params, checked, key, JacobiDrafter(window), sampler=sampler,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def lookahead_generate(model, params, prompts, key, *, max_new_tokens: int, window: int = 4,
                       ngram: int = 4, candidates: int = 4, pool_size: int | None = None,
                       sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
                       prompt_lengths=None, pad_id: int = 0,
                       max_len: int | None = None) -> SpeculativeOutput:
  """Lookahead decoding (Fu et al. 2024) with window W = `window`, n-gram size N = `ngram` (>= 2)
  and G = `candidates` verification n-grams per step, from a pool of `pool_size` (default G)
  n-grams per first token. Each prompt row runs as 1 + G cache rows; one step takes
  max(W, N-1) + 1 tokens. Greedy output equals `generate`'s; stateless samplers are exact."""
  check_model("model", model)
  check_int("window", window)
  check_int("ngram", ngram, low=2)
  check_int("candidates", candidates)
  pool_size = candidates if pool_size is None else pool_size
  check_int("pool_size", pool_size)
  if pool_size < candidates:
    raise ValueError(f"pool_size: expected >= candidates ({candidates}), got {pool_size}")
  drafter = LookaheadDrafter(window=window, ngram=ngram, candidates=candidates,
                             pool_size=pool_size, vocab_size=model.vocab_size, pad_id=pad_id)
  checked = check_inputs(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                         sampler=sampler, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                         step_tokens=drafter.draft_len + 1, step_arg="window / ngram")
  return run_checked(model, params, checked, key, drafter, sampler=sampler,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def sjd_generate(model, params, prompts, key, *, max_new_tokens: int, window: int = 7,
                 sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
                 prompt_lengths=None, pad_id: int = 0,
                 max_len: int | None = None) -> SpeculativeOutput:
  """Speculative Jacobi Decoding (Teng et al. 2024): `window` sampled guesses accepted with
  min(1, p/q) against the distributions they were drawn from, residual resampling, the rest of
  the window redrawn from the current iteration. Exact for any stateless sampler (with greedy it
  is Jacobi decoding). One step takes window + 1 tokens."""
  check_int("window", window)
  checked = check_inputs(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                         sampler=sampler, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                         step_tokens=window + 1, step_arg="window")
  drafter = SJDDrafter(window=window, vocab_size=model.vocab_size)
  return run_checked(model, params, checked, key, drafter, sampler=sampler,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
