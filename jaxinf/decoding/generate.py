"""Prefill + one `lax.while_loop` decode for any SequenceModel (Flax's gemma sampler shape).

    tokens, lengths = generate(model, params, prompts, key, max_new_tokens=64,
                               sampler=SamplerConfig(temperature=0.8, top_p=0.95), eos_id=257)

Prompts of different lengths run as one right-padded batch; each row stops at its own EOS (its
later positions hold `pad_id`) and the loop ends when every row is done or the buffer is full.
Step i draws with `fold_in(key, i)`. The optional streaming callback receives `(step, tokens [B])`
from a host callback that only enqueues; the user's function runs on a background thread, so a
slow consumer never stalls the compiled loop.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding import sampling
from jaxinf.decoding.checks import check_prompts, check_sampler
from jaxinf.decoding.sampling import SamplerConfig


class GenerateOutput(NamedTuple):
  tokens: jax.Array      # [B, max_new_tokens], pad_id after each row's EOS
  lengths: jax.Array     # [B] tokens generated per row, EOS included
  surprise: jax.Array    # [B, max_new_tokens] -log2 p(token) under the model (see sampling)


def generate(model, params, prompts, key, *, max_new_tokens: int,
             sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
             prompt_lengths=None, pad_id: int = 0, max_len: int | None = None,
             callback: Callable[[int, np.ndarray], Any] | None = None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per prompt. `prompts`: `[B, T]` right-padded ids with
  `prompt_lengths` `[B]` (default: all T), or a list of token lists. All checks run before tracing."""
  prompts, lengths, cap = check_prompts(model, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, max_len=max_len)
  check_sampler(sampler, model.vocab_size)

  emit = None
  if callback is not None:
    emit, finish = _background(callback)
  try:
    out = _generate(model, params, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32),
                    key, sampler=sampler, max_new_tokens=max_new_tokens, eos_id=eos_id,
                    pad_id=pad_id, cap=cap, emit=emit)
    jax.block_until_ready(out)
  finally:
    if callback is not None:
      finish()
  return out


def _background(callback):
  """A host-side queue drained by a daemon thread: the compiled loop only enqueues."""
  q: queue.Queue = queue.Queue()

  def drain():
    while (item := q.get()) is not None:
      callback(*item)

  worker = threading.Thread(target=drain, daemon=True)
  worker.start()

  def emit(i, toks):
    q.put((int(i), np.asarray(toks)))

  def finish():
    jax.effects_barrier()
    q.put(None)
    worker.join()

  return emit, finish


@functools.partial(jax.jit, static_argnames=("model", "sampler", "max_new_tokens", "eos_id",
                                             "pad_id", "cap", "emit"))
def _generate(model, params, prompts, lengths, key, *, sampler, max_new_tokens, eos_id, pad_id,
              cap, emit):
  b = prompts.shape[0]
  cache = model.init_cache(b, cap)
  logits, cache = model.prefill(params, prompts, cache, lengths)
  last = logits[jnp.arange(b), lengths - 1]
  seen = None
  if sampler.repetition_penalty is not None:
    valid = jnp.arange(prompts.shape[1])[None] < lengths[:, None]
    seen = jnp.zeros((b, model.vocab_size), bool).at[
        jnp.arange(b)[:, None], prompts].max(valid)
  state = sampling.init_state(sampler, b)

  def draw(i, logits, state, seen, done):
    tok, state, surprise = sampling.sample_token(sampler, jax.random.fold_in(key, i), logits,
                                                 state, seen)
    tok = jnp.where(done, pad_id, tok)
    if seen is not None:
      seen = seen.at[jnp.arange(b), tok].set(True)
    if emit is not None:
      jax.debug.callback(emit, i, tok)
    return tok, state, surprise, seen

  done0 = jnp.zeros((b,), bool)
  tok, state, surprise, seen = draw(0, last, state, seen, done0)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  surprises = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(surprise)
  done = (tok == eos_id) if eos_id is not None else done0
  n_gen = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, *_, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, surprises, state, seen, done, n_gen = carry
    logits, cache = model.step(params, tok[:, None], cache)
    tok, state, surprise, seen = draw(i, logits[:, 0], state, seen, done)
    out = out.at[:, i].set(tok)
    surprises = surprises.at[:, i].set(jnp.where(done, 0.0, surprise))
    n_gen = n_gen + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (tok == eos_id)
    return i + 1, tok, cache, out, surprises, state, seen, done, n_gen

  carry = (jnp.int32(1), tok, cache, out, surprises, state, seen, done, n_gen)
  _, _, _, out, surprises, _, _, _, n_gen = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(out, n_gen, surprises)
