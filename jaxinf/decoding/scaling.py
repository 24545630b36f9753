"""Inference-time scaling with a verifier: repeated sampling, voting, best-of-N, particle filtering.

- `sample_n`: N samples of every prompt in ONE compiled `generate` call (prompts repeated N times),
  with each sample's log-likelihood.
- `best_of_n`: the sample with the best scorer value (e.g. a process reward model's final score).
- `self_consistency`: majority vote over parsed answers (Wang et al. 2023).
- `weighted_consistency`: votes weighted by each sample's inverse perplexity exp(mean log p)
  (perplexity-weighted consistency).
- `particle_filter`: Puri et al. 2025, Algorithm 1 — N particles per prompt advance one reasoning
  step at a time (until the step delimiter or EOS), are weighted by a process scorer of the partial
  solution, softmax(score / temperature), and resampled (multinomial or systematic, within each
  prompt's group); finished particles stay in the population with their last score. The whole
  filter is one `lax.while_loop` over steps around one over tokens, with static buffers and masks;
  the model's cache rows follow their particles through `model.select(cache, rows)`.
- `pass_at_k`: the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. 2021 (eq. 1), in
  their numerically stable product form.
- `fit_power_law`: Large Language Monkeys (Brown et al. 2024, eq. 2): coverage(k) ≈ exp(a k^b),
  fitted by least squares on log(-log coverage) = log(-a) + b log k.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding import sampling
from jaxinf.decoding.checks import check_key, check_model, check_params, check_prompts
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig

METHODS = ("best_of_n", "self_consistency", "weighted_consistency")
RESAMPLING = ("multinomial", "systematic")


def _check_n(name: str, n) -> None:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{name}: expected an int >= 1, got {n!r}")


# --- repeated sampling ------------------------------------------------------------------------

class Samples(NamedTuple):
  tokens: np.ndarray     # [B, N, T] generated ids, pad_id after EOS
  lengths: np.ndarray    # [B, N] tokens generated, EOS included
  logprob: np.ndarray    # [B, N] log p of the generated tokens (nats, temperature-scaled model)


def sample_n(model, params, prompts, key, *, n: int, max_new_tokens: int,
             sampler: SamplerConfig = SamplerConfig(), eos_id: int | None = None,
             prompt_lengths=None, pad_id: int = 0) -> Samples:
  """`n` samples of each prompt from one `generate` call on the prompts repeated n times."""
  _check_n("n", n)
  prompts, lengths, _ = check_prompts(model, prompts, prompt_lengths,
                                      max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  b = prompts.shape[0]
  out = generate(model, params, np.repeat(prompts, n, axis=0), key,
                 max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id,
                 prompt_lengths=np.repeat(lengths, n), pad_id=pad_id)
  logprob = -math.log(2.0) * np.asarray(out.surprise, np.float64).sum(-1)
  return Samples(np.asarray(out.tokens).reshape(b, n, -1), np.asarray(out.lengths).reshape(b, n),
                 logprob.reshape(b, n))


# --- selection and voting ---------------------------------------------------------------------

def _check_group(name: str, x, shape=None) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(f"{name}: expected shape [B, N] with N >= 1, got {x.shape}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{name}: shape {x.shape} does not match the answers' {shape}")
  return x


def best_of_n(scores, valid=None) -> np.ndarray:
  """Index `[B]` of each row's highest-scoring sample (the first on ties); samples with
  valid=False are never chosen unless none is valid."""
  scores = _check_group("scores", scores).astype(np.float64)
  if valid is not None:
    valid = _check_group("valid", valid, scores.shape).astype(bool)
    scores = np.where(valid, scores, -np.inf)
  if np.isnan(scores).any():
    raise ValueError("scores: NaN")
  return np.argmax(scores, axis=1)


def weighted_vote(answers, valid, weights) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the answer with the largest total weight among valid samples (ties: the answer
  that appears first). Returns (answers [B], has_answer [B]); rows with no valid sample get
  has_answer=False (their answer entry is 0)."""
  answers = _check_group("answers", answers)
  valid = _check_group("valid", valid, answers.shape).astype(bool)
  weights = _check_group("weights", weights, answers.shape).astype(np.float64)
  if not np.isfinite(weights).all() or (weights < 0).any():
    raise ValueError("weights: expected finite non-negative values")
  b, n = answers.shape
  # [B, N, N]: sample j votes for sample i's answer; the first sample of each answer collects it
  same = (answers[:, :, None] == answers[:, None, :]) & valid[:, None, :] & valid[:, :, None]
  total = (same * weights[:, None, :]).sum(-1)
  first = ~np.tril(same, -1).any(-1)      # sample i is the first occurrence of its answer
  total = np.where(valid & first, total, -np.inf)
  idx = np.argmax(total, axis=1)
  has = valid.any(1)
  return np.where(has, answers[np.arange(b), idx], 0), has


def self_consistency(answers, valid) -> tuple[np.ndarray, np.ndarray]:
  """Majority vote over the valid answers of each row (Wang et al. 2023)."""
  answers = _check_group("answers", answers)
  return weighted_vote(answers, valid, np.ones(answers.shape))


def weighted_consistency(answers, valid, logprob, lengths) -> tuple[np.ndarray, np.ndarray]:
  """Votes weighted by each sample's inverse perplexity exp(logprob / lengths)."""
  answers = _check_group("answers", answers)
  logprob = _check_group("logprob", logprob, answers.shape).astype(np.float64)
  lengths = _check_group("lengths", lengths, answers.shape)
  if (lengths < 1).any():
    raise ValueError("lengths: expected >= 1 token per sample")
  return weighted_vote(answers, valid, np.exp(logprob / lengths))


def select_answers(method: str, answers, valid, *, scores=None, logprob=None, lengths=None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """One of METHODS by name: (answers [B], has_answer [B])."""
  if method not in METHODS:
    raise ValueError(f"method: unknown {method!r}; known: {list(METHODS)}")
  answers = _check_group("answers", answers)
  valid = _check_group("valid", valid, answers.shape).astype(bool)
  if method == "best_of_n":
    if scores is None:
      raise ValueError("scores: best_of_n needs the scorer's value of every sample")
    idx = best_of_n(_check_group("scores", scores, answers.shape), valid)
    rows = np.arange(answers.shape[0])
    return answers[rows, idx], valid[rows, idx]
  if method == "self_consistency":
    return self_consistency(answers, valid)
  if logprob is None or lengths is None:
    raise ValueError("logprob, lengths: weighted_consistency needs both")
  return weighted_consistency(answers, valid, logprob, lengths)


# --- coverage ---------------------------------------------------------------------------------

def pass_at_k(n, c, k) -> np.ndarray:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k) (Chen et al. 2021),
  computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i). Broadcasts over arrays of n, c (and k)."""
  n, c, k = np.broadcast_arrays(np.asarray(n), np.asarray(c), np.asarray(k))
  for name, x in (("n", n), ("c", c), ("k", k)):
    if not np.issubdtype(x.dtype, np.integer):
      raise TypeError(f"{name}: expected integers, got {x.dtype}")
  if (k < 1).any():
    raise ValueError(f"k: expected >= 1, got {k.min()}")
  if (k > n).any():
    raise ValueError(f"k: k={k.max()} exceeds the n={n[k > n].min()} samples")
  if (c < 0).any() or (c > n).any():
    raise ValueError("c: expected 0 <= c <= n")
  out = np.empty(n.shape, np.float64)
  for idx in np.ndindex(n.shape):
    ni, ci, ki = int(n[idx]), int(c[idx]), int(k[idx])
    if ni - ci < ki:
      out[idx] = 1.0
    else:
      out[idx] = 1.0 - np.prod(1.0 - ki / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
  return out


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """coverage(k) = exp(a * k**b) (Brown et al. 2024, eq. 2); a < 0, b < 0 for rising coverage."""
  a: float
  b: float

  def __call__(self, k):
    return np.exp(self.a * np.asarray(k, np.float64) ** self.b)


def fit_power_law(ks, coverage) -> PowerLaw:
  """Least squares of log(-log coverage) = log(-a) + b log k over the points with 0 < coverage < 1
  (at least two distinct k are needed)."""
  ks, coverage = np.asarray(ks, np.float64), np.asarray(coverage, np.float64)
  if ks.ndim != 1 or coverage.shape != ks.shape:
    raise ValueError(f"ks, coverage: expected two 1-D arrays of one length, got {ks.shape}, "
                     f"{coverage.shape}")
  if (ks <= 0).any():
    raise ValueError("ks: expected positive sample counts")
  if ((coverage < 0) | (coverage > 1)).any():
    raise ValueError("coverage: expected values in [0, 1]")
  use = (coverage > 0) & (coverage < 1)
  if len(np.unique(ks[use])) < 2:
    raise ValueError("coverage: needs at least two k with 0 < coverage < 1 to fit")
  x, y = np.log(ks[use]), np.log(-np.log(coverage[use]))
  b, intercept = np.polyfit(x, y, 1)
  return PowerLaw(a=float(-np.exp(intercept)), b=float(b))


# --- particle filtering -----------------------------------------------------------------------

def multinomial_resample(key, log_weights):
  """Ancestor indices `[B, N]`: N iid draws per row from softmax(log_weights [B, N])."""
  b, n = log_weights.shape
  return jax.random.categorical(key, log_weights, axis=-1, shape=(n, b)).T.astype(jnp.int32)


def systematic_resample(key, log_weights):
  """Ancestor indices `[B, N]` by systematic resampling: one uniform u per row, positions
  (u + i) / N against the cumulative weights (Kitagawa 1996). Uniform weights give the identity."""
  b, n = log_weights.shape
  w = jax.nn.softmax(log_weights.astype(jnp.float32), axis=-1)
  cdf = jnp.cumsum(w, axis=-1)
  pos = (jax.random.uniform(key, (b, 1)) + jnp.arange(n)[None]) / n
  idx = jax.vmap(lambda c, p: jnp.searchsorted(c, p, side="right"))(cdf, pos)
  return jnp.minimum(idx, n - 1).astype(jnp.int32)


class ParticleOutput(NamedTuple):
  tokens: jax.Array      # [B, N, max_new_tokens] generated ids, pad_id after EOS
  lengths: jax.Array     # [B, N] tokens generated (EOS included)
  logprob: jax.Array     # [B, N] log p of the generated tokens under the model (nats)
  scores: jax.Array      # [B, N] the scorer's last value of each particle
  finished: jax.Array    # [B, N] ended with EOS
  steps: jax.Array       # [] resampling rounds run


def particle_filter(model, params, prompts, key, *, n: int, scorer: Callable,
                    scorer_params, delimiter_id: int, eos_id: int, max_new_tokens: int,
                    max_step_tokens: int | None = None, temperature: float = 1.0,
                    resampling: str = "multinomial", sampler: SamplerConfig = SamplerConfig(),
                    prompt_lengths=None, pad_id: int = 0) -> ParticleOutput:
  """Particle filtering over reasoning steps (Puri et al. 2025, Algorithm 1).

  `scorer(scorer_params, tokens [R, L], lengths [R]) -> [R]` scores each particle's sequence
  (prompt and generated tokens so far, right-padded) inside the compiled loop; weights are
  softmax(score / temperature) over each prompt's n particles (a log-likelihood score such as
  log p(correct) at temperature 1 weights by that probability). `scorer` must be hashable (it is a
  static argument: reuse one function object). A step ends at `delimiter_id` or `eos_id`, or after
  `max_step_tokens`; a particle ends at EOS or after `max_new_tokens`.
  """
  check_model("model", model)
  check_params("params", model, params)
  check_key(key)
  _check_n("n", n)
  _check_n("max_new_tokens", max_new_tokens)
  max_step_tokens = max_new_tokens if max_step_tokens is None else max_step_tokens
  _check_n("max_step_tokens", max_step_tokens)
  if resampling not in RESAMPLING:
    raise ValueError(f"resampling: unknown {resampling!r}; known: {list(RESAMPLING)}")
  if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
  if not callable(scorer):
    raise TypeError(f"scorer: expected a callable, got {type(scorer).__name__}")
  if not isinstance(sampler, SamplerConfig):
    raise TypeError(f"sampler: expected a SamplerConfig, got {type(sampler).__name__}")
  if sampler.mirostat is not None or sampler.repetition_penalty is not None:
    raise ValueError("sampler: mirostat and repetition_penalty carry per-row state the particle "
                     "filter does not resample; unset them")
  v = model.vocab_size
  for name, tok in (("delimiter_id", delimiter_id), ("eos_id", eos_id), ("pad_id", pad_id)):
    if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < v:
      raise ValueError(f"{name}: expected an id in [0, {v}), got {tok!r}")
  sampling.check_vocab(sampler, v)
  # extra=1: a spare cache slot for masked rows' writes
  prompts, lengths, cap = check_prompts(model, prompts, prompt_lengths,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        pad_id=pad_id, extra=1)
  return _particle_filter(model, params, scorer, scorer_params, jnp.asarray(prompts),
                          jnp.asarray(lengths), key, n=n, delimiter_id=delimiter_id,
                          eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                          max_step_tokens=max_step_tokens, temperature=float(temperature),
                          resampling=resampling, sampler=sampler, cap=cap)


@functools.partial(jax.jit, static_argnames=("model", "scorer", "n", "delimiter_id", "eos_id",
                                             "pad_id", "max_new_tokens", "max_step_tokens",
                                             "temperature", "resampling", "sampler", "cap"))
def _particle_filter(model, params, scorer, scorer_params, prompts, lengths, key, *, n,
                     delimiter_id, eos_id, pad_id, max_new_tokens, max_step_tokens, temperature,
                     resampling, sampler, cap):
  b, tp = prompts.shape
  r = b * n
  rows = jnp.arange(r)
  prompts = jnp.repeat(prompts, n, axis=0)
  plen = jnp.repeat(lengths, n)
  cache = model.init_cache(r, cap)
  logits, cache = model.prefill(params, prompts, cache, plen)
  width = tp + max_new_tokens
  seq = jnp.full((r, width), pad_id, jnp.int32).at[:, :tp].set(
      jnp.where(jnp.arange(tp)[None] < plen[:, None], prompts, pad_id))
  draw_key, resample_key = jax.random.split(key)
  resample = multinomial_resample if resampling == "multinomial" else systematic_resample

  state = dict(cache=cache, last=logits[rows, plen - 1].astype(jnp.float32), seq=seq,
               n_gen=jnp.zeros((r,), jnp.int32), logprob=jnp.zeros((r,), jnp.float32),
               done=jnp.zeros((r,), bool), finished=jnp.zeros((r,), bool),
               score=jnp.zeros((r,), jnp.float32))

  def token(j_key, s, active):
    """One token for every active particle; inactive rows' caches are rolled back untouched."""
    tok = jax.random.categorical(j_key, sampling.process_logits(sampler, s["last"]), axis=-1)
    if sampler.greedy:
      tok = jnp.argmax(s["last"], -1)
    tok = jnp.where(active, tok, pad_id).astype(jnp.int32)
    logp = jax.nn.log_softmax(s["last"], -1)[rows, tok]
    seq = s["seq"].at[rows, jnp.where(active, plen + s["n_gen"], width)].set(tok, mode="drop")
    step_logits, cache = model.step(params, tok[:, None], s["cache"])
    cache = model.rollback(cache, active.astype(jnp.int32))
    n_gen = s["n_gen"] + active
    eos = active & (tok == eos_id)
    done = s["done"] | eos | (n_gen >= max_new_tokens)
    s = dict(s, cache=cache, seq=seq, n_gen=n_gen, done=done, finished=s["finished"] | eos,
             last=jnp.where(active[:, None], step_logits[:, 0].astype(jnp.float32), s["last"]),
             logprob=s["logprob"] + jnp.where(active, logp, 0.0))
    return s, active & ~done & (tok != delimiter_id)

  def reasoning_step(carry):
    t, s = carry
    t_key = jax.random.fold_in(draw_key, t)

    def tok_cond(c):
      j, _, active = c
      return (j < max_step_tokens) & jnp.any(active)

    def tok_body(c):
      j, s, active = c
      s, active = token(jax.random.fold_in(t_key, j), s, active)
      return j + 1, s, active

    _, s, _ = jax.lax.while_loop(tok_cond, tok_body, (jnp.int32(0), s, ~s["done"]))
    score = scorer(scorer_params, s["seq"], plen + s["n_gen"]).astype(jnp.float32)
    ancestors = resample(jax.random.fold_in(resample_key, t), (score / temperature).reshape(b, n))
    pick = (ancestors + (jnp.arange(b) * n)[:, None]).reshape(-1)
    s = dict(s, score=score)
    cache = model.select(s["cache"], pick)
    s = jax.tree.map(lambda x: x[pick], {k: x for k, x in s.items() if k != "cache"})
    return t + 1, dict(s, cache=cache)

  def step_cond(carry):
    t, s = carry
    return (t < max_new_tokens) & ~jnp.all(s["done"])

  steps, s = jax.lax.while_loop(step_cond, reasoning_step, (jnp.int32(0), state))
  gen_pos = plen[:, None] + jnp.arange(max_new_tokens)[None]
  gen = jnp.take_along_axis(s["seq"], jnp.minimum(gen_pos, width - 1), axis=1)
  gen = jnp.where(jnp.arange(max_new_tokens)[None] < s["n_gen"][:, None], gen, pad_id)
  return ParticleOutput(gen.reshape(b, n, -1), s["n_gen"].reshape(b, n),
                        s["logprob"].reshape(b, n), s["score"].reshape(b, n),
                        s["finished"].reshape(b, n), steps)
