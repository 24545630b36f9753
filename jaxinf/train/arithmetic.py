"""Training for the arithmetic inference-scaling study: the solver LM and its process scorer.

The solver is any SequenceModel trained by next-token prediction (`jaxinf.train.lm.train_lm`) on a
stream of procedurally generated problems with their step-by-step solutions
(`jaxinf.data.arithmetic`).

The process scorer (a process reward model, Lightman et al. 2023; Puri et al. 2025 Sec. 3 use one
as the likelihood of "the partial solution is on track") is a SequenceModel of the same family read
as a binary classifier: for a (partial) solution cut at a step boundary — after a `;` or at EOS —
its logit of the token `yes_id` minus that of `no_id` at the last position is the log-odds that
every step so far is correct. Labels come from the exact step verifier (`step_labels`) applied to
the solver's own samples on training problems, so the scorer learns the solver's actual mistakes.
It starts from the solver's weights (a fine-tune, as PRMs usually start from the policy) and is
trained with the logistic loss by the shared step of `jaxinf.train.step`; `run_training` gives it
checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.data import arithmetic
from jaxinf.data.tokenizer import ByteTokenizer
from jaxinf.train.lm import LMTrainConfig, train_lm
from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_optimizer, check_positive_ints,
                               init_train_state, make_train_step)

YES_ID = ord("Y")
NO_ID = ord("N")


def train_solver(model, params, problems: list[arithmetic.Problem], *, cfg: LMTrainConfig,
                 out_dir: str | os.PathLike, progress: bool = True):
  """Next-token training on the problems' worked solutions (BOS question answer EOS, concatenated)."""
  return train_lm(model, params, arithmetic.training_stream(problems), cfg=cfg, out_dir=out_dir,
                  progress=progress)


# --- the process scorer -------------------------------------------------------------------------

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


def scorer_examples(problems: list[arithmetic.Problem], completions, *,
                    tok: ByteTokenizer = ByteTokenizer()) -> dict[str, np.ndarray]:
  """Process-scorer data from sampled completions.

  `completions[i]` is a list of generated id sequences for `problems[i]`. Every sample is cut after
  each of its steps (after each `;`, and at EOS); each cut is one example, labelled by
  `step_labels`: is every step up to here legal and correct. Returns right-padded `tokens` `[M, L]`
  (BOS, prompt, the cut, as the scorer sees it in the particle filter), `lengths` `[M]`, `labels`
  `[M]` (0/1) and `problem` `[M]` (the problem index, for splits by problem).
  """
  if len(completions) != len(problems):
    raise ValueError(f"completions: expected one list per problem ({len(problems)}), got "
                     f"{len(completions)}")
  seqs, labels, which = [], [], []
  delim = ord(arithmetic.STEP_DELIMITER)
  for i, (problem, samples) in enumerate(zip(problems, completions)):
    prompt = arithmetic.encode_prompt(problem, tok)
    for ids in samples:
      ids = [int(t) for t in ids]
      text, finished = arithmetic.decode_completion(ids, tok)
      step_ok = arithmetic.step_labels(problem, text, finished=finished)
      if finished:
        ids = ids[: ids.index(tok.eos_id) + 1]
      cuts = [j + 1 for j, t in enumerate(ids) if t == delim or t == tok.eos_id]
      for cut, ok in zip(cuts, step_ok):
        seqs.append(prompt + ids[:cut])
        labels.append(int(ok))
        which.append(i)
  if not seqs:
    raise ValueError("completions: no complete step to label")
  lengths = np.array([len(s) for s in seqs], np.int32)
  tokens = np.full((len(seqs), int(lengths.max())), tok.pad_id, np.int32)
  for j, s in enumerate(seqs):
    tokens[j, : len(s)] = s
  return {"tokens": tokens, "lengths": lengths, "labels": np.array(labels, np.int32),
          "problem": np.array(which, np.int32)}


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
  """Trains the scorer (from `params`, e.g. the solver's) on `scorer_examples` output."""
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
