"""Draft-model speculative sampling for any pair of SequenceModels, in one `lax.while_loop`.

    out = speculative_generate(target, t_params, draft, d_params, prompts, key,
                               max_new_tokens=256, gamma=4, sampler=SamplerConfig(temperature=0.8))

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1)
and Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling",
Algorithm 2): the draft proposes γ tokens autoregressively, the target scores all of them in one
`step` over γ+1 positions, and `jaxinf.decoding.verify` accepts a prefix with probability
min(1, p/q) per token, resamples the first rejection from norm(max(0, p − q)) and draws a bonus
token when all are accepted. Every emitted token is distributed exactly as under `generate` with
the same sampler; greedy (temperature 0) output equals greedy `generate` token for token.

Any family can be draft or target. Undoing rejected drafts is the contract's `rollback`: a length
pointer for the transformer's KV cache, the per-position state history for the recurrent families
(RWKV-7, Mamba, TransNormerLLM) — exact, so recurrent targets verify drafts too (transformers'
assisted generation refuses stateful models). One round:

1. the draft ingests, in one `step` of γ+1 slots, the tokens it has not seen (the last round's
   accepted drafts and the target's token: 1 to γ+1 of them), then `rollback` to their count; the
   logits at the last of them give q_1;
2. γ−1 more one-token draft steps give x_2..x_γ and q_2..q_γ on a scratch copy of the draft
   cache (the kept draft cache stays at step 1's state, so nothing needs undoing there);
3. the target steps [pending token, x_1..x_γ], `verify`, `rollback(keep = 1 + accepted)`.

A self-draft — the target model itself with other parameters, e.g. its weights at int8 / int4
(`jaxinf.quant`) — can share the target's cache (`share_cache=True`): no draft prefill and no
catch-up step. Each round the draft steps the pending token and its own drafts x_1..x_{γ−1} in the
target's cache, which then goes back to its mark (`mark` / `restore`: a length pointer for the
transformer, so nothing is copied), and the target's step over [pending, x_1..x_γ] writes its own
entries over the draft's before it reads them. The target never reads a draft-written entry, so
the output is exactly as above; the draft attends to the target's own entries for every
committed token. A round costs γ one-token draft steps and one target step.

Adaptive γ (all lossless: the number of drafts depends on the draft and on past rounds only):
`gamma_schedule="heuristic"` grows a row's γ by 2 after a fully accepted round and shrinks it by
one otherwise (the schedule of transformers' assisted generation), within [1, gamma];
`draft_confidence=c` stops a row's drafting before a token whose draft probability max q < c
(at least one draft per round). The target always scores γ+1 static slots; unproposed slots are
masked, so adaptivity saves draft steps, not target work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_flag
from jaxinf.decoding import sampling
from jaxinf.decoding.checks import (check_block, check_context, check_key, check_params,
                                    check_prompts, check_same_vocab, check_sampler)
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import SpeculativeOutput, append_tokens, probs, verify

GAMMA_SCHEDULES = ("fixed", "heuristic")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """gamma: the most drafts per round (the static block is gamma + 1 target positions).
  gamma_schedule: "fixed" or "heuristic" (see the module docstring); gamma_init: its start.
  draft_confidence: stop drafting below this draft probability (None: never)."""

  gamma: int = 4
  gamma_schedule: str = "fixed"
  gamma_init: int | None = None
  draft_confidence: float | None = None

  def __post_init__(self):
    if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
      raise ValueError(f"gamma: expected an int >= 1 (drafts per round), got {self.gamma!r}")
    if self.gamma_schedule not in GAMMA_SCHEDULES:
      raise ValueError(f"gamma_schedule: expected one of {GAMMA_SCHEDULES}, got "
                       f"{self.gamma_schedule!r}")
    if self.gamma_init is not None and (isinstance(self.gamma_init, bool)
                                        or not isinstance(self.gamma_init, int)
                                        or not 1 <= self.gamma_init <= self.gamma):
      raise ValueError(f"gamma_init: expected an int in [1, gamma={self.gamma}], got "
                       f"{self.gamma_init!r}")
    if self.draft_confidence is not None and (
        isinstance(self.draft_confidence, bool)
        or not isinstance(self.draft_confidence, (int, float, np.integer, np.floating))):
      raise TypeError(f"draft_confidence: expected a number in [0, 1] or None, got "
                      f"{type(self.draft_confidence).__name__} {self.draft_confidence!r}")
    if self.draft_confidence is not None and not 0.0 <= self.draft_confidence <= 1.0:
      raise ValueError(f"draft_confidence: expected in [0, 1], got {self.draft_confidence!r}")


def speculative_generate(target, target_params, draft, draft_params, prompts, key, *,
                         max_new_tokens: int, gamma: int = 4,
                         sampler: SamplerConfig = sampling.GREEDY,
                         draft_sampler: SamplerConfig | None = None,
                         gamma_schedule: str = "fixed", gamma_init: int | None = None,
                         draft_confidence: float | None = None, eos_id: int | None = None,
                         prompt_lengths=None, pad_id: int = 0, max_len: int | None = None,
                         share_cache: bool = False, return_state: bool = False):
  """Generates up to `max_new_tokens` per prompt from `target`'s distribution under `sampler`,
  with `draft` proposing. Arguments as `generate`; `draft_sampler` (default: `sampler`) shapes the
  draft's proposals q (any choice is exact; matching the target's usually accepts most).
  `share_cache`: a self-draft (`draft` the target model itself, other parameters) steps in the
  target's cache (module docstring); the state's `draft_cache` is then None.

  Returns `SpeculativeOutput`; with `return_state=True` also a dict with the final
  `target_cache`, `draft_cache`, the raw token `buffer` [B, max_new_tokens + gamma + 1] and
  `written` [B] (tokens emitted, including any past max_new_tokens in the last round).
  """
  check_same_vocab("target", target, "draft", draft)
  check_params("target_params", target, target_params, "target")
  check_params("draft_params", draft, draft_params, "draft")
  check_key(key)
  check_flag("share_cache", share_cache)
  if share_cache and draft != target:
    raise ValueError("share_cache: the draft must be the target model itself (a self-draft: the "
                     f"same model with other parameters, e.g. quantized ones); got draft {draft!r} "
                     f"for target {target!r}")
  spec = SpeculativeConfig(gamma, gamma_schedule, gamma_init, draft_confidence)
  # a recurrent model's rollback history is sized from gamma (checks.check_block)
  target = check_block(target, "target", gamma + 1, "gamma")
  draft = check_block(draft, "draft", gamma + 1, "gamma")
  check_sampler(sampler, target.vocab_size, stateless=True)
  draft_sampler = sampler if draft_sampler is None else draft_sampler
  check_sampler(draft_sampler, draft.vocab_size, "draft_sampler", stateless=True)
  prompts, lengths, cap = check_prompts(target, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, max_len=max_len, extra=gamma + 1)
  check_context("draft", draft, cap)
  out, state = _speculative(target, draft, target_params, draft_params, jnp.asarray(prompts),
                            jnp.asarray(lengths), key, spec=spec, sampler=sampler,
                            draft_sampler=draft_sampler, max_new_tokens=max_new_tokens,
                            eos_id=eos_id, pad_id=pad_id, cap=cap, share=share_cache)
  return (out, state) if return_state else out


def draw(key, sampler: SamplerConfig, dist: jax.Array) -> jax.Array:
  """A token per row from the probabilities `dist` [B, V] (argmax when greedy)."""
  if sampler.greedy:
    return sampling.argmax(dist)
  logits = jnp.where(dist > 0, jnp.log(jnp.where(dist > 0, dist, 1.0)), -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("target", "draft", "spec", "sampler",
                                             "draft_sampler", "max_new_tokens", "eos_id",
                                             "pad_id", "cap", "share"))
def _speculative(target, draft, tparams, dparams, prompts, lengths, key, *, spec, sampler,
                 draft_sampler, max_new_tokens, eos_id, pad_id, cap, share):
  b = prompts.shape[0]
  g = spec.gamma
  rows = jnp.arange(b)
  tcache = target.init_cache(b, cap)
  tlogits, tcache = target.prefill(tparams, prompts, tcache, lengths)
  dcache = None  # share: the draft steps in the target's cache
  if not share:
    dcache = draft.init_cache(b, cap)
    _, dcache = draft.prefill(dparams, prompts, dcache, lengths)

  first = draw(jax.random.fold_in(key, 0), sampler, probs(sampler, tlogits[rows, lengths - 1]))
  out = jnp.full((b, max_new_tokens + g + 1), pad_id, jnp.int32)
  zeros = jnp.zeros((b,), jnp.int32)
  out, pos, done, _ = append_tokens(out, zeros, first[:, None], jnp.ones((b,), jnp.int32),
                                    jnp.zeros((b,), bool), eos_id)
  unseen = jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(first)
  gam = jnp.full((b,), spec.gamma_init or g, jnp.int32)

  def cond(carry):
    _, _, _, _, pos, done, *_ = carry
    return jnp.any(~done & (pos < max_new_tokens))

  def body(carry):
    (r, tcache, dcache, out, pos, done, unseen, n_unseen, gam, calls, drafted, accepted,
     rejected) = carry
    rk = jax.random.fold_in(key, r)
    active = ~done & (pos < max_new_tokens)
    pending = unseen[rows, jnp.maximum(n_unseen - 1, 0)]

    # 1. the draft catches up on the tokens it has not seen, in one static block; sharing the
    # target's cache, it has seen all but the pending token
    if share:
      mark = target.mark(tcache)
      logits0, scratch = _step_last(draft, dparams, pending, tcache)
    else:
      dlogits, dcache = draft.step(dparams, unseen, dcache)
      dcache = draft.rollback(dcache, n_unseen)
      logits0 = dlogits[rows, jnp.maximum(n_unseen - 1, 0)]
      scratch = dcache

    # 2. up to gamma drafts per row; the steps between them run on a scratch copy of the draft
    # cache (the kept cache stays at step 1's state), or in the shared cache, which then returns
    # to its mark. The last draft needs no step after it.
    def propose(i, logits, drafts, qs, n_draft, stopped):
      q = probs(draft_sampler, logits)
      x = draw(jax.random.fold_in(rk, 1 + i), draft_sampler, q)
      if spec.draft_confidence is not None:
        stopped = stopped | ((i > 0) & (jnp.max(q, -1) < spec.draft_confidence))
      take = ~stopped
      drafts = drafts.at[:, i].set(jnp.where(take, x, 0))
      if not point_masses:
        qs = qs.at[:, i].set(q)
      n_draft = n_draft + take.astype(jnp.int32)
      return x, drafts, qs, n_draft, stopped | (n_draft >= gam)

    def draft_cond(c):
      i, *_, stopped = c
      return (i < g - 1) & ~jnp.all(stopped)

    def draft_body(c):
      i, scratch, logits, drafts, qs, n_draft, stopped = c
      x, drafts, qs, n_draft, stopped = propose(i, logits, drafts, qs, n_draft, stopped)
      logits, scratch = _step_last(draft, dparams, x, scratch)
      return i + 1, scratch, logits, drafts, qs, n_draft, stopped

    v = target.vocab_size
    # greedy target and draft: every draw is decided, so acceptance needs no draft tables and
    # no random numbers (below)
    point_masses = sampler.greedy and draft_sampler.greedy
    state = (jnp.int32(0), scratch, logits0, jnp.zeros((b, g), jnp.int32),
             jnp.zeros((b, g, 1 if point_masses else v), jnp.float32), zeros,
             jnp.zeros((b,), bool))
    if g > 1:
      state = jax.lax.while_loop(draft_cond, draft_body, state)
    i, scratch, logits, drafts, qs, n_draft, stopped = state
    if share:
      tcache = target.restore(scratch, mark)
    _, drafts, qs, n_draft, _ = propose(i, logits, drafts, qs, n_draft, stopped)

    # 3. one target step over [pending, drafts], acceptance, exact rollback
    block = jnp.concatenate([pending[:, None], drafts], axis=1)
    tlogits, tcache = target.step(tparams, block, tcache)
    if point_masses:
      # what `verify` returns for one-hot p and q: drafts accepted while each is the target's
      # argmax, then the target's argmax (a residual of one-hots at a rejection is p's)
      top = jnp.argmax(sampling.process_logits(sampler, tlogits.reshape(b * (g + 1), v)), -1)
      top = top.reshape(b, g + 1).astype(jnp.int32)
      ok = (drafts == top[:, :g]) & (jnp.arange(g)[None] < n_draft[:, None])
      n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
      nxt = top[rows, n_acc]
    else:
      n_acc, nxt = verify(jax.random.fold_in(rk, 0), probs(sampler, tlogits), drafts, qs,
                          n_draft)
    # finished rows keep nothing, so their caches never outgrow the buffer
    tcache = target.rollback(tcache, jnp.where(active, 1 + n_acc, 0))

    # 4. emit the accepted drafts and the target's token
    idx = jnp.arange(g + 1)[None]
    padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    new = jnp.where(idx < n_acc[:, None], padded, jnp.where(idx == n_acc[:, None],
                                                             nxt[:, None], 0))
    out, pos, ended, _ = append_tokens(out, pos, new, n_acc + 1, ~active, eos_id)
    done = jnp.where(active, ended, done)
    if spec.gamma_schedule == "heuristic":
      gam = jnp.where(n_acc >= n_draft, jnp.minimum(gam + 2, g), jnp.maximum(gam - 1, 1))
    live = active.astype(jnp.int32)
    n_unseen = jnp.where(active, n_acc + 1, 0)
    return (r + 1, tcache, dcache, out, pos, done, new, n_unseen, gam, calls + live,
            drafted + n_draft * live, accepted + n_acc * live,
            rejected + (n_acc < n_draft).astype(jnp.int32) * live)

  carry = (jnp.int32(1), tcache, dcache, out, pos, done, unseen, jnp.ones((b,), jnp.int32), gam,
           zeros, zeros, zeros, zeros)
  _, tcache, dcache, out, pos, _, _, _, _, calls, drafted, accepted, rejected = (
      jax.lax.while_loop(cond, body, carry))
  result = SpeculativeOutput(out[:, :max_new_tokens], jnp.minimum(pos, max_new_tokens), calls,
                             drafted, accepted, rejected)
  return result, {"target_cache": tcache, "draft_cache": dcache, "buffer": out, "written": pos}


def _step_last(model, params, tokens, cache):
  logits, cache = model.step(params, tokens[:, None], cache)
  return logits[:, 0], cache


def expected_tokens_per_call(alpha, gamma: int):
  """Leviathan et al. 2023, eq. (1): E[tokens per target call] = (1 − α^{γ+1}) / (1 − α) for an
  acceptance rate α (γ + 1 at α = 1)."""
  alpha = np.asarray(alpha, np.float64)
  near_one = np.isclose(alpha, 1.0)
  safe = np.where(near_one, 0.5, alpha)
  return np.where(near_one, gamma + 1.0, (1.0 - safe ** (gamma + 1)) / (1.0 - safe))
