"""Contrastive Decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization"), as a decoding rule. LOSSY: it decodes neither model's distribution, by design.

    out = contrastive_generate(expert, expert_params, prompts, key, max_new_tokens=128,
                               amateur=small, amateur_params=small_params,
                               config=CDConfig(alpha=0.1))   # greedy: the paper's rule
    weak, weak_len = last_tokens(prompts, lengths, 8)   # or a weaker prompt
    out = contrastive_generate(expert, expert_params, prompts, key, max_new_tokens=128,
                               amateur_prompts=weak, amateur_prompt_lengths=weak_len)

The rule (the paper's eqs. 2-4): the plausibility set
    V_head = {x : p_EXP(x | x_<i) >= alpha * max_w p_EXP(w | x_<i)},
and the score
    CD(x) = log p_EXP(x | x_<i) - log p_AMA(x | x_<i)   for x in V_head,  -inf otherwise.
Greedy takes argmax CD (the paper's search, beam 1); with `temperature` T > 0 the token is drawn
from softmax(CD / T) over V_head. `amateur_temperature` tau divides the amateur's logits before its
log-softmax (the paper's amateur temperature; 1 is the plain rule).

The amateur is either a weaker model over the same vocabulary (`amateur`, `amateur_params`) or the
expert itself given a weaker prompt (`amateur_prompts`: e.g. `last_tokens` of the prompt, or an
entirely different one), or both. Both caches are stepped with every emitted token in one compiled
`lax.while_loop`; step i draws with `fold_in(key, i)`.

Edge cases, by the rule itself: alpha = 1 keeps only the expert's most likely token(s), so greedy CD
is the expert's greedy decoding; alpha = 0 drops the plausibility constraint (any token, however
unlikely under the expert, may win on the log ratio: the failure the constraint exists to stop).
An amateur identical to the expert scores every token of V_head 0: greedy then breaks the tie by the
expert's own log-probability (so it is the expert's greedy decoding) and sampling is uniform over
V_head. Greedy ties in general go to the token the expert finds most likely.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import strict_config
from jaxinf.decoding.checks import (
  check_context,
  check_key,
  check_params,
  check_prompts,
  check_same_vocab,
)
from jaxinf.decoding.sampling import NEG_INF


@dataclasses.dataclass(frozen=True)
class CDConfig:
  """alpha: plausibility cut in [0, 1]. temperature: 0 greedy, > 0 sampling over CD / T.
  amateur_temperature: > 0, divides the amateur's logits."""

  alpha: float = 0.1
  temperature: float = 0.0
  amateur_temperature: float = 1.0

  def __post_init__(self):
    def number(name):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
          or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
      return value

    if not 0.0 <= number("alpha") <= 1.0:
      raise ValueError(f"alpha: expected in [0, 1], got {self.alpha!r}")
    if number("temperature") < 0:
      raise ValueError(f"temperature: expected >= 0 (0: greedy), got {self.temperature!r}")
    if not number("amateur_temperature") > 0:
      raise ValueError(f"amateur_temperature: expected > 0, got {self.amateur_temperature!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def cd_config(**options: Any) -> CDConfig:
  """`CDConfig(**options)`, refusing unknown option names with the list of known ones."""
  return strict_config(CDConfig, "contrastive", options)


class CDOutput(NamedTuple):
  tokens: jax.Array       # [B, max_new_tokens], pad_id after each row's EOS
  lengths: jax.Array      # [B] tokens generated per row, EOS included
  expert_logp: jax.Array  # [B, max_new_tokens] log p_EXP(token) (natural log; 0 past lengths)


def contrastive_scores(expert_logits, amateur_logits, alpha, amateur_temperature=1.0):
  """CD(x) = log p_EXP(x) - log p_AMA(x) on V_head, NEG_INF elsewhere (eqs. 2-4); `[B, V]`, fp32.
  Also returns log p_EXP, the greedy tie-break."""
  logp_e = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
  logp_a = jax.nn.log_softmax(amateur_logits.astype(jnp.float32) / amateur_temperature, axis=-1)
  # p_e >= alpha * max p_e, in log space; alpha = 0 keeps every token
  head = logp_e >= jnp.log(alpha) + logp_e.max(-1, keepdims=True)
  return jnp.where(head, logp_e - logp_a, NEG_INF), logp_e


def cd_token(key, expert_logits, amateur_logits, alpha, temperature, amateur_temperature,
             *, greedy: bool):
  """One token per row by the CD rule; returns (tokens [B], log p_EXP [B, V])."""
  scores, logp_e = contrastive_scores(expert_logits, amateur_logits, alpha, amateur_temperature)
  if greedy:
    best = scores >= scores.max(-1, keepdims=True)
    return jnp.argmax(jnp.where(best, logp_e, -jnp.inf), -1), logp_e
  return jax.random.categorical(key, scores / temperature, axis=-1), logp_e


def last_tokens(prompts, prompt_lengths, m: int):
  """The last `m` tokens of each right-padded prompt (all of it if shorter): a weaker prompt for
  the amateur. Returns (`[B, min(m, T)]` int32 right-padded with 0, lengths `[B]`)."""
  prompts, lengths = np.asarray(prompts), np.asarray(prompt_lengths)
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
    raise ValueError(f"m: expected an int >= 1, got {m!r}")
  if prompts.ndim != 2 or lengths.shape != (prompts.shape[0],):
    raise ValueError(f"prompts, prompt_lengths: expected [B, T] and [B], got {prompts.shape} and "
                     f"{lengths.shape}")
  keep = np.minimum(lengths, m)
  out = np.zeros((prompts.shape[0], int(keep.max())), np.int32)
  for r, (n, k) in enumerate(zip(lengths, keep)):
    out[r, :k] = prompts[r, n - k:n]
  return out, keep.astype(np.int32)


def contrastive_generate(expert, expert_params, prompts, key, *, max_new_tokens: int,
                         amateur=None, amateur_params=None, amateur_prompts=None,
                         amateur_prompt_lengths=None, config: CDConfig = CDConfig(),
                         eos_id: int | None = None, prompt_lengths=None,
                         pad_id: int = 0) -> CDOutput:
  """Contrastive decoding of up to `max_new_tokens` per prompt (lossy; see the module doc).

  `amateur` None means the expert model itself (with `amateur_params`, default the expert's);
  `amateur_prompts` None means the expert's prompts. All checks run before tracing."""
  if not isinstance(config, CDConfig):
    raise TypeError(f"config: expected a CDConfig, got {type(config).__name__}")
  if amateur is None:
    amateur = expert
    amateur_params = expert_params if amateur_params is None else amateur_params
  elif amateur_params is None:
    raise ValueError("amateur_params: required with an amateur model")
  check_same_vocab("expert", expert, "amateur", amateur)
  check_params("expert_params", expert, expert_params, "expert")
  check_params("amateur_params", amateur, amateur_params, "amateur")
  check_key(key)
  opts = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  prompts, lengths, cap = check_prompts(expert, prompts, prompt_lengths, **opts)
  if amateur_prompts is None:
    if amateur_prompt_lengths is not None:
      raise ValueError("amateur_prompt_lengths: given without amateur_prompts")
    amateur_prompts, amateur_lengths, amateur_cap = prompts, lengths, cap
  else:
    amateur_prompts, amateur_lengths, amateur_cap = check_prompts(
        amateur, amateur_prompts, amateur_prompt_lengths, name="amateur_prompts",
        lengths_name="amateur_prompt_lengths", **opts)
  if amateur_prompts.shape[0] != prompts.shape[0]:
    raise ValueError(f"amateur_prompts: batch {amateur_prompts.shape[0]} does not match the "
                     f"prompts' {prompts.shape[0]}")
  caps = (cap, amateur_cap)
  check_context("amateur", amateur, caps[1])
  knobs = jnp.asarray([config.alpha, config.temperature or 1.0, config.amateur_temperature],
                      jnp.float32)  # traced: one compile serves every alpha and temperature
  out = _cd(expert, amateur, (expert_params, amateur_params),
            (jnp.asarray(prompts), jnp.asarray(amateur_prompts)),
            (jnp.asarray(lengths), jnp.asarray(amateur_lengths)), key, knobs,
            greedy=config.greedy, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            caps=caps)
  return jax.block_until_ready(out)


@functools.partial(jax.jit, static_argnames=("expert", "amateur", "greedy", "max_new_tokens",
                                             "eos_id", "pad_id", "caps"))
def _cd(expert, amateur, params, prompts, lengths, key, knobs, *, greedy, max_new_tokens, eos_id,
        pad_id, caps):
  b, n = prompts[0].shape[0], max_new_tokens
  alpha, temperature, amateur_temperature = knobs[0], knobs[1], knobs[2]
  models, rows = (expert, amateur), jnp.arange(b)
  caches, logits = [], []
  for m, p, toks, lens, cap in zip(models, params, prompts, lengths, caps):
    lg, cache = m.prefill(p, toks, m.init_cache(b, cap), lens)
    caches.append(cache)
    logits.append(lg[rows, lens - 1])

  def draw(i, logits, done):
    tok, logp_e = cd_token(jax.random.fold_in(key, i), logits[0], logits[1], alpha, temperature,
                           amateur_temperature, greedy=greedy)
    tok = jnp.where(done, pad_id, tok)
    return tok, jnp.where(done, 0.0, logp_e[rows, tok])

  done = jnp.zeros((b,), bool)
  tok, lp = draw(0, logits, done)
  out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
  logps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
  if eos_id is not None:
    done = tok == eos_id
  n_gen = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, *_, done, _ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, tok, caches, out, logps, done, n_gen = carry
    caches, logits = list(caches), []
    for j, (m, p) in enumerate(zip(models, params)):
      lg, caches[j] = m.step(p, tok[:, None], caches[j])
      logits.append(lg[:, 0])
    tok, lp = draw(i, logits, done)
    out, logps = out.at[:, i].set(tok), logps.at[:, i].set(lp)
    n_gen = n_gen + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (tok == eos_id)
    return i + 1, tok, tuple(caches), out, logps, done, n_gen

  carry = (jnp.int32(1), tok, tuple(caches), out, logps, done, n_gen)
  _, _, _, out, logps, _, n_gen = jax.lax.while_loop(cond, body, carry)
  return CDOutput(out, n_gen, logps)
