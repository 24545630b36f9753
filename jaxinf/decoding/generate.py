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

import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxinf.config import check_flag
from jaxinf.decoding import sampling
from jaxinf.decoding.checks import (
  check_key,
  check_model,
  check_params,
  check_prompts,
  check_sampler,
)
from jaxinf.decoding.sampling import SamplerConfig


class GenerateOutput(NamedTuple):
  tokens: jax.Array      # [B, max_new_tokens], pad_id after each row's EOS
  lengths: jax.Array     # [B] tokens generated per row, EOS included
  surprise: jax.Array    # [B, max_new_tokens] -log2 p(token) under the model (see sampling)


class NonFiniteLogitsError(FloatingPointError):
  """`generate(..., check_finite=True)` found NaN/inf logits: the message names the first token
  position and row, and (for jaxinf's families) the first layer whose activation is non-finite."""


def generate(model, params, prompts, key, *, max_new_tokens: int,
             sampler: SamplerConfig = sampling.GREEDY, eos_id: int | None = None,
             prompt_lengths=None, pad_id: int = 0, max_len: int | None = None,
             callback: Callable[[int, np.ndarray], Any] | None = None,
             check_finite: bool = False) -> GenerateOutput:
  """Generates up to `max_new_tokens` per prompt. `prompts`: `[B, T]` right-padded ids with
  `prompt_lengths` `[B]` (default: all T), or a list of token lists. `key`: one PRNG key
  (`jax.random.key(seed)`; a legacy `PRNGKey` is accepted; an int or a batch of keys is refused).
  All checks run before tracing.

  callback: called as `callback(step, tokens [B])` for every step, on a background thread; an
    exception it raises stops further calls and is re-raised here once the loop has finished.
  check_finite: the non-finite policy. Off (the default) nothing is checked and the compiled loop
    is exactly the unchecked one. On, the loop records per row the first new-token position whose
    logits hold a NaN or inf (rows already finished are not looked at), and after the loop a
    `NonFiniteLogitsError` names the first such position and its row; for models that expose
    their parameters (every jaxinf family) the forward over that row's prefix is then replayed
    op by op on the host to name the first non-finite activation: its layer, the parameter it
    reads and the source line (`diagnose_nonfinite`; it replays the full forward
    `model(params, tokens)`, so a NaN that only the cached `step` path produces is reported by
    position and row alone). The sampler's own arithmetic cannot make
    finite logits non-finite (`SamplerConfig`'s bounds), so the check looks at the model's logits.
  """
  check_model("model", model)
  check_params("params", model, params)
  check_key(key)
  if callback is not None and not callable(callback):
    raise TypeError(f"callback: expected a callable (step, tokens) -> None, got "
                    f"{type(callback).__name__}")
  check_flag("check_finite", check_finite)
  prompts, lengths, cap = check_prompts(model, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, max_len=max_len)
  check_sampler(sampler, model.vocab_size)

  emit = None
  if callback is not None:
    emit, finish = _background(callback)
  failed = None
  try:
    out = _generate(model, params, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32),
                    key, sampler=sampler, max_new_tokens=max_new_tokens, eos_id=eos_id,
                    pad_id=pad_id, cap=cap, emit=emit, check_finite=check_finite)
    jax.block_until_ready(out)
  finally:
    if callback is not None:
      failed = finish()
  if failed is not None:
    raise failed
  if check_finite:
    out, first_bad = out
    first_bad = np.asarray(first_bad)
    if (first_bad >= 0).any():
      pos = int(first_bad[first_bad >= 0].min())
      row = int(np.flatnonzero(first_bad == pos)[0])
      raise NonFiniteLogitsError(_report(model, params, prompts, lengths, np.asarray(out.tokens),
                                         row, pos))
  return out


def _report(model, params, prompts, lengths, tokens, row: int, pos: int) -> str:
  """The message of `NonFiniteLogitsError` for new-token position `pos` of `row`."""
  n = int(lengths[row])
  prefix = np.concatenate([prompts[row, :n], tokens[row, :pos]]).astype(np.int32)
  where = (f"generate: non-finite logits first at position {pos} (row {row}; the logits after "
           f"sequence position {n + pos - 1}, token id {int(prefix[-1])})")
  try:
    found = diagnose_nonfinite(model, params, prefix[None])
  except Exception as e:  # noqa: BLE001 - the diagnosis must never hide the finding it explains
    return f"{where}; the layer could not be located ({type(e).__name__}: {e})"
  return f"{where}; {found}" if found else where


def _layer_of(path: str) -> str:
  """'layers/2/self_attn/q_proj/kernel' -> 'layer 2 (self_attn/q_proj/kernel)'."""
  parts = path.split("/")
  for i, p in enumerate(parts[:-1]):
    if parts[i + 1].isdigit() and not p.isdigit():
      rest = "/".join(parts[i + 2:])
      return f"layer {parts[i + 1]} ({rest})" if rest else f"layer {parts[i + 1]}"
  return path


def diagnose_nonfinite(model, params, tokens) -> str | None:
  """Where the forward of `model` over `tokens` [1, T] first produces a non-finite value.

  Replays the jaxpr of `model(params, tokens)` equation by equation on the host (nested jit /
  custom-derivative calls are entered, loops run as one unit). The first equation whose output
  holds a NaN, or an inf while its inputs are finite (an overflow; -inf masks are not flagged), is
  reported with the layer it belongs to: the layer of a parameter it reads, else of the last
  parameter read before it. None when the model takes no (params, tokens) call or nothing is
  non-finite. Only for diagnosis: slow, eager, outside any jit."""
  if not callable(model):
    return None
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  names = ["/".join(_key(k) for k in path) for path, _ in flat]
  closed = jax.make_jaxpr(lambda p, t: model(p, t))(params, jnp.asarray(tokens))
  leaves = [leaf for _, leaf in flat] + [jnp.asarray(tokens)]
  state = {"last": None, "found": None}
  origin = {id(v): n for v, n in zip(closed.jaxpr.invars, names)}
  _replay(closed.jaxpr, closed.consts, leaves, origin, state)
  found = state["found"]
  if found is None:
    return None
  prim, param, last, where = found
  if param is not None:
    return (f"first non-finite activation in {_layer_of(param)}: {prim} reading the non-finite "
            f"parameter {param}, at {where}")
  layer = _layer_of(last) if last is not None else "the input"
  return f"first non-finite activation after {layer}: {prim} at {where}"


def _key(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _inexact(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _finite(x) -> bool:
  return not _inexact(x) or bool(np.isfinite(np.asarray(x)).all())


def _nan(x) -> bool:
  return _inexact(x) and bool(np.isnan(np.asarray(x)).any())


def _replay(jaxpr, consts, args, origin, state):
  """Evaluates `jaxpr` like `jax.core.eval_jaxpr`, recording the first non-finite equation."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if state["found"] is None:
      read_params = [origin[id(v)] for v in eqn.invars
                     if not isinstance(v, jax.extend.core.Literal) and id(v) in origin]
      if read_params:
        state["last"] = read_params[-1]
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if state["found"] is None and sub is not None and hasattr(sub, "jaxpr") and not (
        eqn.primitive.name in ("while", "scan", "cond")):
      inner = {id(iv): origin[id(v)] for iv, v in zip(sub.jaxpr.invars, eqn.invars)
               if not isinstance(v, jax.extend.core.Literal) and id(v) in origin}
      outs = _replay(sub.jaxpr, sub.consts, ins, inner, state)
    else:
      outs = _bind(eqn, ins)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      # a NaN, or an inf made from finite inputs (an overflow; not a -inf mask passed along)
      if state["found"] is None and not all(_finite(o) for o in outs) and (
          any(_nan(o) for o in outs) or all(_finite(x) for x in ins)):
        bad_params = [origin[id(v)] for v, x in zip(eqn.invars, ins)
                      if not isinstance(v, jax.extend.core.Literal) and id(v) in origin
                      and not _finite(x)]
        where = source_info_util.summarize(eqn.source_info)
        state["found"] = (eqn.primitive.name, bad_params[0] if bad_params else None,
                          state["last"], where)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, ins):
  """`eqn`'s primitive applied to concrete `ins`, as `jax.core.eval_jaxpr` does it."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    return eqn.primitive.bind(*subfuns, *ins, **bind_params)


def _background(callback):
  """A host-side queue drained by a daemon thread: the compiled loop only enqueues. The first
  exception the callback raises is kept (later items are dropped) and returned by `finish`."""
  q: queue.Queue = queue.Queue()
  errors: list[BaseException] = []

  def drain():
    while (item := q.get()) is not None:
      if errors:
        continue
      try:
        callback(*item)
      except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by generate
        errors.append(e)

  worker = threading.Thread(target=drain, daemon=True)
  worker.start()

  def emit(i, toks):
    q.put((int(i), np.asarray(toks)))

  def finish():
    jax.effects_barrier()
    q.put(None)
    worker.join()
    return errors[0] if errors else None

  return emit, finish


@functools.partial(jax.jit, static_argnames=("model", "sampler", "max_new_tokens", "eos_id",
                                             "pad_id", "cap", "emit", "check_finite"))
def _generate(model, params, prompts, lengths, key, *, sampler, max_new_tokens, eos_id, pad_id,
              cap, emit, check_finite=False):
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

  def note(i, logits, done, first_bad):
    """Rows whose logits at step i are non-finite (live rows only; first occurrence kept)."""
    bad = ~jnp.all(jnp.isfinite(logits), axis=-1) & ~done
    return jnp.where((first_bad < 0) & bad, i, first_bad)

  done0 = jnp.zeros((b,), bool)
  # off: None, an empty pytree, so the loop's carry and the compiled program are the unchecked ones
  first_bad = note(0, last, done0, jnp.full((b,), -1, jnp.int32)) if check_finite else None
  tok, state, surprise, seen = draw(0, last, state, seen, done0)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  surprises = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(surprise)
  done = (tok == eos_id) if eos_id is not None else done0
  n_gen = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, *_, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, surprises, state, seen, done, n_gen, first_bad = carry
    logits, cache = model.step(params, tok[:, None], cache)
    if check_finite:
      first_bad = note(i, logits[:, 0], done, first_bad)
    tok, state, surprise, seen = draw(i, logits[:, 0], state, seen, done)
    out = out.at[:, i].set(tok)
    surprises = surprises.at[:, i].set(jnp.where(done, 0.0, surprise))
    n_gen = n_gen + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (tok == eos_id)
    return i + 1, tok, cache, out, surprises, state, seen, done, n_gen, first_bad

  carry = (jnp.int32(1), tok, cache, out, surprises, state, seen, done, n_gen, first_bad)
  _, _, _, out, surprises, _, _, _, n_gen, first_bad = jax.lax.while_loop(cond, body, carry)
  result = GenerateOutput(out, n_gen, surprises)
  return (result, first_bad) if check_finite else result
