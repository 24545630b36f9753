"""A process scorer: a SequenceModel read as a binary classifier of partial solutions, and its
training.

A process scorer (a process reward model, Lightman et al. 2023; Puri et al. 2025 Sec. 3 use one as
the likelihood of "the partial solution is on track") scores a (partial) solution cut at a step
boundary: its logit of the token `yes_id` minus that of `no_id` at the last position is the
log-odds that every step so far is correct. It usually starts from the policy's weights (a
fine-tune) and is trained with the logistic loss by the shared step of `jaxinf.train.step`;
`run_training` gives it checkpoints and exact resume. Where the labels come from is the study's
business (e.g. `jaxinf.recipes.arithmetic_solver.scorer_examples`, an exact step verifier).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_model_params, check_optimizer,
                               check_positive_ints, check_seed, init_train_state, make_train_step)

YES_ID = ord("Y")
NO_ID = ord("N")


@dataclasses.dataclass(frozen=True)
class ScorerTrainConfig:
  steps: int = 600
  batch_size: int = 64
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=50,
                                               weight_decay=0.0)
  seed: int = 0
  checkpoint_every: int = 200

  def __post_init__(self):
    check_positive_ints(self, "steps", "batch_size", "checkpoint_every")
    check_optimizer(self.optimizer)
    check_seed(self)


def scorer_log_odds(model, params, tokens, lengths, yes_id: int = YES_ID, no_id: int = NO_ID):
  """Log-odds `[R]` that the sequences `tokens` `[R, L]` (right-padded to `lengths` `[R]`) are still
  correct: logit(yes) - logit(no) at each row's last position. jit-traceable."""
  r, t = tokens.shape
  logits, _ = model.prefill(params, tokens, model.init_cache(r, t), lengths)
  last = logits[jnp.arange(r), lengths - 1].astype(jnp.float32)
  return last[:, yes_id] - last[:, no_id]


def process_score(model):
  """`score(params, tokens, lengths) -> log p(correct)` `[R]`: the scorer in the form
  `jaxinf.decoding.scaling.particle_filter` takes (a log-likelihood, so softmax weights are
  proportional to the probability that the partial solution is on track)."""

  def score(params, tokens, lengths):
    return jax.nn.log_sigmoid(scorer_log_odds(model, params, tokens, lengths))

  return score


def scorer_train_loss(model, cfg: ScorerTrainConfig):
  """The loss `loss_fn(params, key, ctx, tokens, lengths, labels)` of
  `jaxinf.train.step.make_train_step`: the logistic loss of `scorer_log_odds` on `cfg.batch_size`
  examples drawn with replacement."""

  def loss_fn(params, key, ctx, tokens, lengths, labels):
    del ctx
    idx = jax.random.randint(key, (cfg.batch_size,), 0, tokens.shape[0])
    s = scorer_log_odds(model, params, tokens[idx], lengths[idx])
    return optax.sigmoid_binary_cross_entropy(s, labels[idx].astype(jnp.float32)).mean()

  return loss_fn


def train_scorer(model, params, data: dict[str, np.ndarray], *, cfg: ScorerTrainConfig,
                 out_dir: str | os.PathLike, progress: bool = True
                 ) -> tuple[dict[str, Any], list[dict]]:
  """Trains the scorer (from `params`, e.g. the policy's) on `data`: right-padded `tokens`
  `[M, L]`, `lengths` `[M]` and 0/1 `labels` `[M]` (e.g. the dict of
  `jaxinf.recipes.arithmetic_solver.scorer_examples`)."""
  if not isinstance(cfg, ScorerTrainConfig):
    raise TypeError(f"cfg: expected a ScorerTrainConfig, got {type(cfg).__name__}")
  check_model_params(model, params)
  if not isinstance(data, dict):
    raise TypeError(f"data: expected the dict of scorer_examples, got {type(data).__name__}")
  for name in ("tokens", "lengths", "labels"):
    if name not in data:
      raise ValueError(f"data: missing {name!r} (expected the dict of scorer_examples)")
  tokens, lengths, labels = (np.asarray(data[k]) for k in ("tokens", "lengths", "labels"))
  if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],) or labels.shape != lengths.shape:
    raise ValueError(f"data: expected tokens [M, L], lengths [M], labels [M], got "
                     f"{tokens.shape}, {lengths.shape}, {labels.shape}")
  if tokens.shape[0] < 1:
    raise ValueError("data: no examples")
  step = make_train_step(scorer_train_loss(model, cfg), cfg.optimizer, seed=cfg.seed)
  return run_training(step, init_train_state(params, cfg.optimizer),
                      (jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(labels)),
                      steps=cfg.steps, out_dir=out_dir, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, desc="train-scorer")


def scorer_accuracy(model, params, data: dict[str, np.ndarray], batch_size: int = 512
                    ) -> dict[str, float]:
  """Held-out accuracy of the scorer's 0.5 threshold, and the base rate of label 1."""
  fn = jax.jit(lambda p, t, n: scorer_log_odds(model, p, t, n))
  s = np.concatenate([np.asarray(fn(params, jnp.asarray(data["tokens"][i:i + batch_size]),
                                    jnp.asarray(data["lengths"][i:i + batch_size])))
                      for i in range(0, len(data["labels"]), batch_size)])
  labels = data["labels"]
  return {"accuracy": float(np.mean((s > 0) == (labels == 1))),
          "positive_rate": float(np.mean(labels))}
