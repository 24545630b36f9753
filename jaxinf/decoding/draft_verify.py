"""The draft → verify loop every training-free accelerator runs in (prompt lookup and trie
Lookahead in `lookup.py`; Jacobi, lookahead and Speculative Jacobi Decoding in `jacobi.py`):
prefill, then one `lax.while_loop` of rounds over fixed buffers.

One round (the speculative round of Leviathan et al. 2023, widened to K branches): the cache holds
the context but its last token c (pending); a drafter proposes K branches of γ tokens (padded,
`n_draft` real ones); the target runs one `step` over [c, d_1..d_γ] on B·K rows (each prompt row
expanded into K cache rows with `model.select` once, after prefill); the acceptance rule picks the
accepted prefix and the next token; the winner's cache is selected back into all K rows and
`rollback(keep = 1 + n_accept)` undoes the rest exactly — a length pointer for a KV cache, the
kept state history for the recurrent families. Fixed buffers throughout: the context
[B, T + max_new + γ + 1], the output [B, max_new + γ + 1], the cache of T + max_new + γ positions.

Acceptance (`verify.py`): one branch (K = 1) by `verify.verify`, with q = None for point-mass
drafts (everything but SJD, which passes the distribution its guesses were drawn from); K
branches of point-mass drafts by `verify.verify_branches`. Greedy targets reduce both rules to
"accept while the draft is the argmax", so greedy output equals `generate`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding import sampling
from jaxinf.decoding.checks import (check_block, check_key, check_params, check_prompts,
                                    check_sampler)
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import (SpeculativeOutput, append_tokens, probs, verify,
                                    verify_branches)


class Drafter(Protocol):
  """What `draft_verify_loop` asks of a drafter (a frozen dataclass: static and hashable).

  branches: K, draft branches per prompt row. draft_len: γ, drafts per branch (padded).
  init(key, ctx, ctx_len, prompt_lengths) -> state: the drafter's own loop state (fixed shapes).
  propose(state, ctx, ctx_len) -> (drafts [B, K, γ], n_draft [B, K], q [B, K, γ, V] | None):
    q is the distributions sampled drafts were drawn from; None for point masses.
  update(state, key, logits [B, K, γ+1, V], p, best, n_accept, next_token) -> state: after the
    round's acceptance (p the target's sampler distributions of the verified block).
  """

  @property
  def branches(self) -> int: ...

  @property
  def draft_len(self) -> int: ...

  def init(self, key: jax.Array, ctx: jax.Array, ctx_len: jax.Array,
           prompt_lengths: jax.Array) -> Any: ...

  def propose(self, state: Any, ctx: jax.Array,
              ctx_len: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]: ...

  def update(self, state: Any, key: jax.Array, logits: jax.Array, p: jax.Array, best: jax.Array,
             n_accept: jax.Array, next_token: jax.Array) -> Any: ...


# --- the default acceptance rules ---------------------------------------------------------------

def _single_branch_rule(key, p, drafts, n_draft, q):
  """K = 1: the shared `verify` (q None for point masses)."""
  n_accept, nxt = verify(key, p[:, 0], drafts[:, 0], None if q is None else q[:, 0],
                         n_draft[:, 0])
  return jnp.zeros_like(n_accept), n_accept, nxt


def _branches_rule(key, p, drafts, n_draft, q):
  del q  # multi-branch drafts are point masses
  return verify_branches(key, p, drafts, n_draft)


# --- input checks, run before tracing -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Checked:
  """Prompts and cache size after `check_inputs`."""

  prompts: np.ndarray   # [B, T] int32
  lengths: np.ndarray   # [B] int32
  cap: int              # cache positions
  model: Any = None     # the model to run (`checks.check_block` may widen a recurrent history)


def check_inputs(model, prompts, prompt_lengths, *, max_new_tokens, sampler, eos_id, pad_id,
                 max_len, step_tokens: int, step_arg: str = "draft_len") -> Checked:
  """`generate`'s checks (`checks.check_prompts`), plus: the sampler is stateless, one step of
  `step_tokens` tokens fits the model's `max_step` (a jaxinf recurrent family's is raised to fit:
  `Checked.model`, `checks.check_block`), and the cache holds the longest prompt, the
  new tokens and one block of drafts past them (T + max_new_tokens + γ, γ = step_tokens - 1).
  `step_arg` names the option that sets γ in the messages."""
  prompts, lengths, cap = check_prompts(model, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, max_len=max_len, extra=step_tokens - 1)
  check_sampler(sampler, model.vocab_size, stateless=True)
  run_model = check_block(model, "model", step_tokens, step_arg)
  return Checked(prompts, lengths, cap, run_model)


# --- the loop -----------------------------------------------------------------------------------

def draft_verify_loop(model, params, prompts, lengths, key, *, drafter: Drafter,
                      sampler: SamplerConfig, max_new_tokens: int, eos_id: int | None,
                      pad_id: int, cap: int, rule=None) -> SpeculativeOutput:
  """Prefill, then one `lax.while_loop` of draft → step → accept → rollback rounds (jittable;
  the public functions check their inputs and jit this).

  `drafter`: a `Drafter` (static, hashable), K branches of γ drafts per round.
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
  """Checks `params` and `key`, then runs the jitted loop on checked inputs and waits for it (as
  `generate` does)."""
  check_params("params", model, params)
  check_key(key)
  model = model if checked.model is None else checked.model
  out = run_drafted(model, params, jnp.asarray(checked.prompts), jnp.asarray(checked.lengths),
                    key, drafter=drafter, sampler=sampler, max_new_tokens=max_new_tokens,
                    eos_id=eos_id, pad_id=pad_id, cap=checked.cap, rule=rule)
  return jax.block_until_ready(out)


__all__ = ["Checked", "Drafter", "check_inputs", "draft_verify_loop", "run_checked",
           "run_drafted"]
