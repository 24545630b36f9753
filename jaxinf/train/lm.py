"""Next-token training of any SequenceModel on a token stream, and held-out bits per byte.

Training runs the model's parallel form (`prefill` on a fresh cache with full lengths); batches are
random windows of `seq_len + 1` tokens drawn with `fold_in(seed, step)`, so resume is exact (see
`jaxinf.train.loop`). The optimizer and the update are those of `jaxinf.train.step`.

`LMTrainConfig.copy` (a `CopyTask`) mixes copy data into the windows, drawn in the compiled step
from the same key: whole windows replaced by random tokens that repeat with a random period, and
spans of a window copied to a later place in it. Only attending back to the earlier copy predicts
a repeat of random tokens, so this is the signal that forms induction heads (Olsson et al. 2022,
"In-context Learning and Induction Heads"): the mechanism that recalls an earlier span when its
prefix recurs. A small byte model trained on code alone for a few hundred steps does not form them
(`experiments.kv_compression` measures recall of a planted key, which needs them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.config import check_int
from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_model_params, check_optimizer,
                               check_positive_ints, check_seed, init_train_state, make_train_step)


@dataclasses.dataclass(frozen=True)
class CopyTask:
  """Copy data mixed into training windows (see the module docstring); random tokens are drawn
  uniform in [token_low, token_high).

  repeat_windows: the probability that a window is replaced whole by random tokens repeating with
    a period drawn uniform in [min_period, max_period] (token t equals token t - period);
  spans: spans per window copied, after any replacement, from an earlier place to a later one
    (overwriting what was there), each of a length uniform in [min_span, max_span], its source
    and destination uniform where both fit without overlapping; with probability `random_span` the
    source is first refilled with random tokens, so that only copying predicts the repeat."""

  repeat_windows: float = 0.0
  min_period: int = 8
  max_period: int = 64
  spans: int = 0
  min_span: int = 8
  max_span: int = 48
  random_span: float = 0.5
  token_low: int = 0
  token_high: int = 256

  def __post_init__(self):
    for name in ("repeat_windows", "random_span"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {v!r}")
    check_positive_ints(self, "min_period", "max_period", "min_span", "max_span", "token_high")
    for name in ("spans", "token_low"):
      check_int(name, getattr(self, name), low=0)
    for low, high in (("min_period", "max_period"), ("min_span", "max_span")):
      if getattr(self, low) > getattr(self, high):
        raise ValueError(f"{high}: expected >= {low} = {getattr(self, low)}, got "
                         f"{getattr(self, high)}")
    if self.token_low >= self.token_high:
      raise ValueError(f"token_high: expected > token_low = {self.token_low}, got "
                       f"{self.token_high}")
    if self.repeat_windows == 0 and self.spans == 0:
      raise ValueError("repeat_windows, spans: both are 0, so the task adds nothing; give one "
                       "(or no CopyTask)")

  def check_window(self, window: int, vocab_size: int | None = None) -> None:
    """ValueError naming the field that does not fit windows of `window` tokens (or the vocab)."""
    if self.repeat_windows > 0 and self.max_period >= window:
      raise ValueError(f"max_period: {self.max_period} leaves nothing to repeat in windows of "
                       f"{window} tokens (seq_len + 1); expected < {window}")
    if self.spans > 0 and 2 * self.max_span > window:
      raise ValueError(f"max_span: two spans of {self.max_span} do not fit windows of {window} "
                       f"tokens (seq_len + 1); expected <= {window // 2}")
    if vocab_size is not None and self.token_high > vocab_size:
      raise ValueError(f"token_high: {self.token_high} exceeds the model's vocab_size "
                       f"{vocab_size}")


def copy_windows(key: jax.Array, windows: jax.Array, task: CopyTask) -> jax.Array:
  """`windows` [B, T] int with `task`'s copy data mixed in (see `CopyTask`), from `key`."""
  b, t = windows.shape
  pos = jnp.arange(t)[None]
  k_pick, k_period, k_tokens, key = jax.random.split(key, 4)
  if task.repeat_windows > 0:
    period = jax.random.randint(k_period, (b, 1), task.min_period, task.max_period + 1)
    tokens = jax.random.randint(k_tokens, (b, t), task.token_low, task.token_high,
                                windows.dtype)
    periodic = jnp.take_along_axis(tokens, pos % period, axis=1)
    windows = jnp.where(jax.random.bernoulli(k_pick, task.repeat_windows, (b, 1)), periodic,
                        windows)
  for k in (jax.random.split(key, task.spans) if task.spans else ()):
    k_len, k_src, k_gap, k_rand, k_tokens = jax.random.split(k, 5)
    length = jax.random.randint(k_len, (b, 1), task.min_span, task.max_span + 1)
    src = jax.random.randint(k_src, (b, 1), 0, t - 2 * length + 1)
    dst = src + length + jax.random.randint(k_gap, (b, 1), 0, t - 2 * length - src + 1)
    refill = jax.random.bernoulli(k_rand, task.random_span, (b, 1))
    tokens = jax.random.randint(k_tokens, (b, t), task.token_low, task.token_high,
                                windows.dtype)
    windows = jnp.where(refill & (pos >= src) & (pos < src + length), tokens, windows)
    in_dst = (pos >= dst) & (pos < dst + length)
    windows = jnp.take_along_axis(windows, jnp.where(in_dst, pos - dst + src, pos), axis=1)
  return windows


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
  steps: int = 2000
  batch_size: int = 16
  seq_len: int = 256
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=100,
                                               weight_decay=0.1)
  seed: int = 0
  checkpoint_every: int = 250
  copy: CopyTask | None = None     # copy data mixed into the windows (None: the corpus alone)

  def __post_init__(self):
    check_positive_ints(self, "steps", "batch_size", "seq_len", "checkpoint_every")
    check_optimizer(self.optimizer)
    check_seed(self)
    if self.copy is not None:
      if not isinstance(self.copy, CopyTask):
        raise TypeError(f"copy: expected a CopyTask or None, got {type(self.copy).__name__}")
      self.copy.check_window(self.seq_len + 1)


def forward_logits(model, params, tokens: jax.Array) -> jax.Array:
  """Logits `[B, T, V]` of the parallel form over full-length rows."""
  b, t = tokens.shape
  lengths = jnp.full((b,), t, jnp.int32)
  return model.prefill(params, tokens, model.init_cache(b, t), lengths)[0]


def next_token_nll(model, params, windows: jax.Array) -> jax.Array:
  """Mean negative log-likelihood in nats of windows[:, 1:] given windows[:, :-1]."""
  logits = forward_logits(model, params, windows[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def lm_train_loss(model, cfg: LMTrainConfig):
  """The loss `loss_fn(params, key, ctx, corpus)` of `jaxinf.train.step.make_train_step`:
  `next_token_nll` over `cfg.batch_size` random windows of `seq_len + 1` tokens of `corpus`, with
  `cfg.copy`'s data mixed in when it is set."""

  def loss_fn(params, key, ctx, corpus):
    del ctx
    starts = jax.random.randint(key, (cfg.batch_size,), 0, corpus.shape[0] - cfg.seq_len - 1)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(corpus, (s,), (cfg.seq_len + 1,)))(starts)
    if cfg.copy is not None:   # a key of its own: the corpus windows stay those of no copy task
      windows = copy_windows(jax.random.fold_in(key, 1), windows, cfg.copy)
    return next_token_nll(model, params, windows)

  return loss_fn


def train_lm(model, params, corpus, *, cfg: LMTrainConfig, out_dir: str | os.PathLike,
             progress: bool = True) -> tuple[dict[str, Any], list[dict]]:
  """Trains `model` on the int token stream `corpus`; checkpoints and resumes in `out_dir`."""
  if not isinstance(cfg, LMTrainConfig):
    raise TypeError(f"cfg: expected an LMTrainConfig, got {type(cfg).__name__}")
  check_model_params(model, params)
  corpus = np.asarray(corpus)
  if corpus.ndim != 1 or corpus.shape[0] <= cfg.seq_len + 1:
    raise ValueError(f"corpus: expected a 1-D stream longer than seq_len + 1 = {cfg.seq_len + 1}, "
                     f"got shape {corpus.shape}")
  if corpus.min() < 0 or corpus.max() >= model.vocab_size:
    raise ValueError(f"corpus: token ids must lie in [0, {model.vocab_size})")
  if cfg.copy is not None:
    cfg.copy.check_window(cfg.seq_len + 1, model.vocab_size)
  step = make_train_step(lm_train_loss(model, cfg), cfg.optimizer, seed=cfg.seed)
  return run_training(step, init_train_state(params, cfg.optimizer),
                      (jnp.asarray(corpus, jnp.int32),), steps=cfg.steps, out_dir=out_dir,
                      checkpoint_every=cfg.checkpoint_every, progress=progress, desc="train-lm")


def bits_per_byte(model, params, stream, *, seq_len: int = 256, batch_size: int = 16,
                  max_windows: int | None = None) -> float:
  """Held-out bits per token (= per byte for byte-level models) over non-overlapping windows of
  `seq_len + 1` tokens (each window predicts its last seq_len tokens from the ones before)."""
  stream = np.asarray(stream)
  n = (len(stream) - 1) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  if n < 1:
    raise ValueError(f"stream: needs more than seq_len + 1 = {seq_len + 1} tokens")
  starts = np.arange(n) * seq_len
  windows = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  nll = jax.jit(lambda p, w: next_token_nll(model, p, w))
  total = 0.0
  for i in range(0, n, batch_size):
    chunk = windows[i:i + batch_size]
    total += float(nll(params, jnp.asarray(chunk))) * len(chunk)
  return total / n / math.log(2.0)
