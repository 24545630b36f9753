"""Verification of drafted tokens against a target distribution: the acceptance rule every lossless
accelerator shares (draft-model speculative sampling, prompt lookup, Jacobi / lookahead, Medusa).

Speculative sampling (Leviathan et al. 2023, Algorithm 1 and Appendix A.1; Chen et al. 2023,
Algorithm 2): drafts x_1..x_γ were drawn from q_1..q_γ; the target's distributions p_1..p_{γ+1}
come from one `step` over the γ+1 positions. Draft i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection n the next token is drawn from the residual
norm(max(0, p_n − q_n)); if all γ are accepted a bonus token is drawn from p_{γ+1}. Every emitted
token is then distributed exactly as p, whatever q is.

Deterministic drafts (prompt lookup, Jacobi guesses, Medusa's top-k candidates) are point masses
q = δ_x: acceptance is u < p(x) and the residual is p with x removed — the same rule, which is
also "draw y ~ p and keep the draft while y = x". Greedy targets (temperature 0) make p one-hot
at the argmax: a draft is accepted iff it is the argmax, and the next token is the argmax.

K branches of point-mass drafts (trie Lookahead, lookahead decoding): `verify_branches`, the rule
"draw y ~ p and keep the draft while y = x" taken over a tree: at depth i all branches share one
Gumbel noise vector, so branches with the same prefix draw the same y_i (Gumbel-max: y =
argmax(log p + g) is an exact draw from p); the accepted path is the one the draws follow, and the
emitted tokens are exact draws from p along it. Verifying each branch with its own coins and
keeping the longest is *not* exact (it favours drafted tokens); tests/decoding/test_lookup.py
shows the chi-square test rejecting it.

Sampler rules apply to both sides: p = softmax(process_logits(sampler, target logits)) — the very
distribution `generate` draws from — and q likewise with the draft's sampler. Stateful rules
(Mirostat's feedback, the repetition penalty's growing seen-set) change p within a block of drafts
and are refused here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinf.decoding import sampling
from jaxinf.decoding.sampling import SamplerConfig


def probs(sampler: SamplerConfig, logits: jax.Array) -> jax.Array:
  """The distribution `sample_token` draws from, `[..., V]` fp32 (one-hot argmax when greedy)."""
  shape = logits.shape
  flat = sampling.process_logits(sampler, logits.reshape(-1, shape[-1]))
  if sampler.greedy:
    out = jax.nn.one_hot(jnp.argmax(flat, -1), shape[-1], dtype=jnp.float32)
  else:
    out = jax.nn.softmax(flat, axis=-1)
  return out.reshape(shape)


def verify(key, p: jax.Array, drafts: jax.Array, q: jax.Array | None = None,
           n_draft: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Accepts a prefix of `drafts` and draws the token after it.

  p: `[B, γ+1, V]` target probabilities (p[:, i] is the distribution of the token after
    position i of the verified block, i.e. of draft i+1; p[:, γ] is the bonus distribution).
  drafts: `[B, γ]` drafted ids. q: `[B, γ, V]` the draft distributions they were drawn from, or
    None for point-mass (deterministic) drafts. n_draft: `[B]` how many drafts of each row are
    real (the rest are padding and never accepted); None means all γ.

  Returns (n_accept `[B]` in [0, n_draft], next_token `[B]`): the row continues with
  drafts[:, :n_accept] and then next_token — a residual draw at a rejection, a bonus draw otherwise.
  """
  b, g = drafts.shape
  v = p.shape[-1]
  k_accept, k_next = jax.random.split(key)
  q_x = (jnp.take_along_axis(q, drafts[..., None], -1)[..., 0] if q is not None
         else jnp.ones((b, g), p.dtype))
  p_x = jnp.take_along_axis(p[:, :g], drafts[..., None], -1)[..., 0]
  u = jax.random.uniform(k_accept, (b, g), p.dtype)
  # u < p/q, written without the division (q(x) > 0 for a drawn draft; u * 0 < p(x) otherwise)
  accept = u * q_x < p_x
  if n_draft is not None:
    accept = accept & (jnp.arange(g)[None] < n_draft[:, None])
  n_accept = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
  rows = jnp.arange(b)
  p_n = p[rows, n_accept]
  limit = g if n_draft is None else n_draft
  rejected = n_accept < limit
  at = jnp.minimum(n_accept, g - 1)
  q_n = q[rows, at] if q is not None else jax.nn.one_hot(drafts[rows, at], v, dtype=p.dtype)
  residual = jnp.maximum(p_n - q_n, 0.0)
  # the residual is empty only when p_n == q_n, where a rejection has probability zero
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
  dist = jnp.where(rejected[:, None], residual, p_n)
  logits = jnp.where(dist > 0, jnp.log(jnp.where(dist > 0, dist, 1.0)), -jnp.inf)
  next_token = jax.random.categorical(k_next, logits, axis=-1).astype(jnp.int32)
  return n_accept.astype(jnp.int32), next_token



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


class SpeculativeOutput(NamedTuple):
  """What every lossless accelerator returns. `tokens`/`lengths` mean what they mean for
  `generate` (pad_id after a row's EOS); the counters make acceptance measurable:
  target_calls[b] target steps that verified row b (prefill excluded), drafted[b] / accepted[b]
  the real drafts proposed to and accepted by them. Tokens per target call = lengths / calls.
  `rejected[b]` (draft-model speculative sampling; None elsewhere) counts the rounds that ended
  in a rejected draft: every draft the target judged was either accepted or that one rejection,
  so accepted / (accepted + rejected) estimates the per-draft acceptance rate α of Leviathan et
  al. (2023), where accepted / drafted also counts the drafts after a rejection, never judged."""

  tokens: jax.Array        # [B, max_new_tokens]
  lengths: jax.Array       # [B]
  target_calls: jax.Array  # [B]
  drafted: jax.Array       # [B]
  accepted: jax.Array      # [B]
  rejected: jax.Array | None = None  # [B]


def append_tokens(out, pos, new, n_new, done, eos_id: int | None):
  """Writes the first n_new[b] of `new` `[B, m]` at out[b, pos[b]:] for rows not done.

  `out` has room for m tokens past the requested length, so a row still running never writes out
  of bounds. A row stops after its first EOS (later tokens of the block are dropped: they would
  follow the end of the sequence). Returns (out, pos, done, n_written [B])."""
  b, m = new.shape
  idx = jnp.arange(m)[None]
  valid = (idx < n_new[:, None]) & ~done[:, None]
  if eos_id is not None:
    is_eos = (new == eos_id) & valid
    first = jnp.argmax(is_eos, axis=1)
    has = jnp.any(is_eos, axis=1)
    valid = valid & (~has[:, None] | (idx <= first[:, None]))
    done = done | has
  rows = jnp.arange(b)[:, None]
  cols = pos[:, None] + idx
  out = out.at[rows, cols].set(jnp.where(valid, new, out[rows, cols]))
  n = jnp.sum(valid, axis=1).astype(jnp.int32)
  return out, pos + n, done, n
