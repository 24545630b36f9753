"""Entropy Adaptive Decoding (Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model Switching for
Efficient Inference"): a small and a large model take turns by the rolling entropy of the current
model's next-token distribution. LOSSY: the output is neither the small nor the large model's own
decoding, and no verification step makes it so.

    out = ead_generate(small, small_params, large, large_params, prompts, key,
                       max_new_tokens=128, config=EADConfig(window=5, threshold=2.0))
    out.tokens, out.lengths, out.large          # out.large[b, i]: the large model made token i
    large_token_share(out)                      # share of generated tokens the large model made

The rule (the paper's Sec. 3): the entropy of the distribution token t is drawn from, in bits and
before any temperature, H_t = -sum_i p_i log2 p_i; its rolling mean over the last w tokens,
Hbar_t = (1/w) sum_{j=t-w+1..t} H_j (over the tokens so far while t < w); the large model makes
token t+1 if Hbar_t > threshold, the small one otherwise. `min_run` is the paper's stability
constraint as we read it: a model, once switched to, makes at least `min_run` tokens before the next
switch (1: none). The entropies are those of whichever model made each token, so the large model
hands back when its own distribution has become confident. Before the first token the window is
empty: the choice for token 0 uses the small model's entropy at the prompt's last position (free:
both models prefill the prompt anyway). So `threshold=+inf` is the small model's decoding and
`threshold=-inf` the large model's, token for token.

Both models see every emitted token. The model not generating falls behind and catches up when it is
next needed: its missed tokens are read from the output buffer in steps of a fixed `catch_up` = C
tokens (an inner `lax.while_loop`), each followed by `rollback(cache, keep)` to the true count
(exact by the SequenceModel contract); a model exactly one token behind (it made the previous token)
steps that token alone. A model that is never needed again never pays for the tokens it missed.
`eager=True` feeds both models every token instead. Measured on a 2-core CPU (transformer-1m small,
transformer-12m large, random weights, batch 1, 64-byte prompt, 128 tokens, ms per token, medians of
7 side by side under the bench lock): small alone 0.18, large alone 2.00; EAD never switching 0.31
deferred against 2.41 eager; EAD always large 2.09 deferred against 2.38 eager. Deferred is the
default; `eager` is kept for that comparison. Each model's `step` runs inside `lax.cond` on whether
any row needs it now. Rows of a batch choose their model independently; a model steps for the whole
batch when any row needs it. One compiled `lax.while_loop` (with the catch-up loop inside it); step
i draws with `fold_in(key, i)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_bool_fields, strict_config
from jaxinf.decoding import sampling
from jaxinf.decoding.checks import (check_block, check_context, check_key, check_params,
                                    check_prompts, check_same_vocab, check_sampler)
from jaxinf.decoding.sampling import SamplerConfig

LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class EADConfig:
  """window: w, tokens in the rolling entropy mean. threshold: tau in bits (+-inf allowed: never /
  always the large model). min_run: tokens a model makes after a switch before the next switch.
  catch_up: C, tokens per `step` when a model catches up on the tokens it missed (a recurrent
  model's `max_step` is raised to C when smaller: `checks.check_block`). eager: step both models with every token instead of catching up."""

  window: int = 5
  threshold: float = 2.0
  min_run: int = 1
  catch_up: int = 8
  eager: bool = False

  def __post_init__(self):
    for name in ("window", "min_run", "catch_up"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    check_bool_fields(self)
    t = self.threshold
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or math.isnan(t):
      raise ValueError(f"threshold: expected a number in bits (+-inf allowed), got {t!r}")


def ead_config(**options: Any) -> EADConfig:
  """`EADConfig(**options)`, refusing unknown option names with the list of known ones."""
  return strict_config(EADConfig, "EAD", options)


class EADOutput(NamedTuple):
  tokens: jax.Array      # [B, max_new_tokens], pad_id after each row's EOS
  lengths: jax.Array     # [B] tokens generated per row, EOS included
  large: jax.Array       # [B, max_new_tokens] bool: the large model made this token
  entropy: jax.Array     # [B, max_new_tokens] bits of the distribution each token was drawn from
  model_steps: jax.Array  # [2] `step` calls of (small, large) in the loop (prefill excluded)


def large_token_share(out: EADOutput) -> float:
  """Share of all generated tokens (EOS included, padding excluded) the large model made."""
  n = int(np.asarray(out.lengths).sum())
  return float(np.asarray(out.large).sum()) / max(n, 1)


def entropy_bits(logits: jax.Array) -> jax.Array:
  """H = -sum_i p_i log2 p_i of softmax(logits) over the last axis, fp32 (the paper's eq. 1)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1) / LOG2


# --- the decoder --------------------------------------------------------------------------------

def ead_generate(small, small_params, large, large_params, prompts, key, *, max_new_tokens: int,
                 config: EADConfig = EADConfig(), sampler: SamplerConfig = sampling.GREEDY,
                 eos_id: int | None = None, prompt_lengths=None, pad_id: int = 0) -> EADOutput:
  """Entropy Adaptive Decoding of up to `max_new_tokens` per prompt (lossy; see the module doc).

  `prompts`: `[B, T]` right-padded ids with `prompt_lengths` `[B]`, or a list of token lists; both
  models read the same prompt. `sampler` draws from the chosen model's logits (greedy by default);
  the entropy that drives switching is that of the raw logits, before temperature. All checks run
  before tracing."""
  check_same_vocab("small", small, "large", large)
  check_params("small_params", small, small_params, "small model")
  check_params("large_params", large, large_params, "large model")
  check_key(key)
  if not isinstance(config, EADConfig):
    raise TypeError(f"config: expected an EADConfig, got {type(config).__name__}")
  prompts, lengths, cap = check_prompts(small, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, extra=config.catch_up)
  check_sampler(sampler, small.vocab_size)
  for name, m in (("small", small), ("large", large)):
    check_context(name, m, cap)
  # a recurrent model's rollback history is sized from catch_up (checks.check_block)
  small = check_block(small, "small model", config.catch_up, "catch_up")
  large = check_block(large, "large model", config.catch_up, "catch_up")
  # the threshold is traced (one compile serves every threshold); the rest of config is static
  out = _ead(small, large, (small_params, large_params), jnp.asarray(prompts),
             jnp.asarray(lengths), key, jnp.float32(config.threshold),
             config=dataclasses.replace(config, threshold=0.0),
             sampler=sampler, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
             cap=cap)
  return jax.block_until_ready(out)


@functools.partial(jax.jit, static_argnames=("small", "large", "config", "sampler",
                                             "max_new_tokens", "eos_id", "pad_id", "cap"))
def _ead(small, large, params, prompts, lengths, key, threshold, *, config, sampler,
         max_new_tokens, eos_id, pad_id, cap):
  b = prompts.shape[0]
  n, w, c = max_new_tokens, config.window, config.catch_up
  models = (small, large)
  rows = jnp.arange(b)
  caches, first = [], []
  for m, p in zip(models, params):
    logits, cache = m.prefill(p, prompts, m.init_cache(b, cap), lengths)
    caches.append(cache)
    first.append(logits[rows, lengths - 1].astype(jnp.float32))
  seen = None
  if sampler.repetition_penalty is not None:
    valid = jnp.arange(prompts.shape[1])[None] < lengths[:, None]
    seen = jnp.zeros((b, small.vocab_size), bool).at[rows[:, None], prompts].max(valid)

  def draw(i, logits, state, seen, done):
    tok, state, _ = sampling.sample_token(sampler, jax.random.fold_in(key, i), logits, state, seen)
    tok = jnp.where(done, pad_id, tok)
    if seen is not None:
      seen = seen.at[rows, tok].set(True)
    return tok, state, seen

  def decide(i, ent_hist, use_large, run_len):
    """The model for token i+1 from the rolling mean of H_{i-w+1..i} (ent_hist has w leading
    zeros: token j sits at column j + w)."""
    window = jax.lax.dynamic_slice(ent_hist, (0, i + 1), (b, w))
    mean = window.sum(-1) / jnp.minimum(i + 1, w).astype(jnp.float32)
    want = mean > threshold
    switch = (want != use_large) & (run_len >= config.min_run)
    return jnp.where(switch, want, use_large), jnp.where(switch, 0, run_len)

  # token 0: the window is empty; the small model's entropy at the prompt's end decides
  use_large = entropy_bits(first[0]) > threshold
  logits0 = jnp.where(use_large[:, None], first[1], first[0])
  done = jnp.zeros((b,), bool)
  tok, state, seen = draw(0, logits0, sampling.init_state(sampler, b), seen, done)
  h = entropy_bits(logits0)
  # the output buffer carries c spare columns so a C-token catch-up slice never leaves it
  out = jnp.full((b, n + c), pad_id, jnp.int32).at[:, 0].set(tok)
  ent_hist = jnp.zeros((b, n + w), jnp.float32).at[:, w].set(h)
  large_flags = jnp.zeros((b, n), bool).at[:, 0].set(use_large)
  use_large, run_len = decide(jnp.int32(0), ent_hist, use_large, jnp.ones((b,), jnp.int32))
  if eos_id is not None:
    done = tok == eos_id
  n_gen = jnp.ones((b,), jnp.int32)
  consumed = jnp.zeros((2,), jnp.int32)  # generated tokens each model's cache holds
  steps = jnp.zeros((2,), jnp.int32)

  def advance(i, m, p, cache, out, start):
    """Catch a model up on tokens start .. i-1 (C at a time); returns its logits for token i and
    the number of `step` calls."""

    def one(cache):
      logits, cache = m.step(p, jax.lax.dynamic_slice(out, (0, i - 1), (b, 1)), cache)
      return logits[:, 0].astype(jnp.float32), cache, jnp.int32(1)

    def chunks(cache):
      def chunk(carry):
        start, cache, _, calls = carry
        logits, cache = m.step(p, jax.lax.dynamic_slice(out, (0, start), (b, c)), cache)
        keep = jnp.minimum(c, i - start)
        cache = m.rollback(cache, jnp.full((b,), keep, jnp.int32))
        lg = jax.lax.dynamic_index_in_dim(logits, keep - 1, 1, False).astype(jnp.float32)
        return start + keep, cache, lg, calls + 1

      init = (start, cache, jnp.zeros((b, m.vocab_size), jnp.float32), jnp.int32(0))
      _, cache, lg, calls = jax.lax.while_loop(lambda s: s[0] < i, chunk, init)
      return lg, cache, calls

    if config.eager:
      return one(cache)
    return jax.lax.cond(i - start == 1, one, chunks, cache)

  def cond(carry):
    i, *_, done, _ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    (i, out, ent_hist, large_flags, caches, consumed, steps, use_large, run_len, state, seen,
     done, n_gen) = carry
    caches, logits = list(caches), []
    for j, (m, p) in enumerate(zip(models, params)):
      uses = use_large if j == 1 else ~use_large
      need = jnp.any(uses & ~done) | config.eager
      skip = lambda cache: (jnp.zeros((b, m.vocab_size), jnp.float32), cache, jnp.int32(0))
      lg, caches[j], calls = jax.lax.cond(
          need, lambda cache: advance(i, m, p, cache, out, consumed[j]), skip, caches[j])
      logits.append(lg)
      consumed = consumed.at[j].set(jnp.where(need, i, consumed[j]))
      steps = steps.at[j].add(calls)
    lg = jnp.where(use_large[:, None], logits[1], logits[0])
    tok, state, seen = draw(i, lg, state, seen, done)
    out = out.at[:, i].set(tok)
    ent_hist = ent_hist.at[:, i + w].set(entropy_bits(lg))
    large_flags = large_flags.at[:, i].set(use_large & ~done)
    n_gen = n_gen + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (tok == eos_id)
    use_large, run_len = decide(i, ent_hist, use_large, run_len + 1)
    return (i + 1, out, ent_hist, large_flags, tuple(caches), consumed, steps, use_large, run_len,
            state, seen, done, n_gen)

  carry = (jnp.int32(1), out, ent_hist, large_flags, tuple(caches), consumed, steps, use_large,
           run_len, state, seen, done, n_gen)
  (_, out, ent_hist, large_flags, _, _, steps, *_, n_gen) = jax.lax.while_loop(cond, body, carry)
  valid = jnp.arange(n)[None] < n_gen[:, None]
  entropy = jnp.where(valid, ent_hist[:, w:], 0.0)
  return EADOutput(out[:, :n], n_gen, large_flags & valid, entropy, steps)
