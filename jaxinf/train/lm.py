"""Next-token training of any SequenceModel on a token stream, and held-out bits per byte.

Training runs the model's parallel form (`prefill` on a fresh cache with full lengths); batches are
random windows of `seq_len + 1` tokens drawn with `fold_in(seed, step)`, so resume is exact (see
`jaxinf.train.loop`). The optimizer and the update are those of `jaxinf.train.step`.
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

from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_model_params, check_optimizer,
                               check_positive_ints, check_seed, init_train_state, make_train_step)


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
  steps: int = 2000
  batch_size: int = 16
  seq_len: int = 256
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=100,
                                               weight_decay=0.1)
  seed: int = 0
  checkpoint_every: int = 250

  def __post_init__(self):
    check_positive_ints(self, "steps", "batch_size", "seq_len", "checkpoint_every")
    check_optimizer(self.optimizer)
    check_seed(self)


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
  `next_token_nll` over `cfg.batch_size` random windows of `seq_len + 1` tokens of `corpus`."""

  def loss_fn(params, key, ctx, corpus):
    del ctx
    starts = jax.random.randint(key, (cfg.batch_size,), 0, corpus.shape[0] - cfg.seq_len - 1)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(corpus, (s,), (cfg.seq_len + 1,)))(starts)
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
