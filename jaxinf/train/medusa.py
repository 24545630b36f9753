"""Medusa-1 training: the heads learn on a frozen target's hidden states (Cai et al. 2024, §2.2.1).

The target runs its cache-free forward over a window; its final hidden state h_t (after the final
norm) feeds the K heads, and head k is trained to predict the token k + 1 positions after the
next one:

    L_Medusa-1 = Σ_{k=1..K} −λ_k log p_t^(k)(y_{t+k+1}),   λ_k = decay^k   (the paper's eq. 2;
                                                              "λ_k = 0.8^k")

averaged over positions t of random windows of the token stream. Labels are either the corpus
tokens (`labels="corpus"`, the paper's Medusa-1 on the training data) or the target's own
predictive distribution at the same position, teacher-forced on the corpus
(`labels="target"`: the cross-entropy against softmax(target logits at t + k), the
self-distillation labels of §2.3.2 computed without generating text) — what a head must match to
be accepted. Only the heads' parameters are trained (the target's are data, not state), by the
shared step of `jaxinf.train.step`; batches come from `fold_in(seed, step)`, so `run_training`
resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.models.medusa import MedusaHeads, medusa_heads
from jaxinf.train.draft import target_text
from jaxinf.train.loop import run_training
from jaxinf.train.step import (OptimizerConfig, check_model_params, check_optimizer,
                               check_positive_ints, check_seed, init_train_state, make_train_step)

LABELS = ("corpus", "target")


@dataclasses.dataclass(frozen=True)
class MedusaTrainConfig:
  num_heads: int = 4
  num_layers: int = 1
  steps: int = 600
  batch_size: int = 16
  seq_len: int = 128
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=50,
                                               weight_decay=0.0)
  decay: float = 0.8  # λ_k = decay^k
  labels: str = "corpus"
  seed: int = 0
  checkpoint_every: int = 200

  def __post_init__(self):
    check_positive_ints(self, "num_heads", "num_layers", "steps", "batch_size", "seq_len",
                        "checkpoint_every")
    check_optimizer(self.optimizer)
    check_seed(self)
    if not 0 < self.decay <= 1:
      raise ValueError(f"decay: expected in (0, 1], got {self.decay!r}")
    if self.labels not in LABELS:
      raise ValueError(f"labels: expected one of {LABELS}, got {self.labels!r}")


def head_weights(num_heads: int, decay: float) -> jax.Array:
  """λ_k = decay^k for k = 1..K (Medusa-1's loss weights)."""
  return jnp.asarray(decay, jnp.float32) ** jnp.arange(1, num_heads + 1, dtype=jnp.float32)


def target_features(model, params, windows: jax.Array, num_heads: int):
  """The frozen target over windows `[B, T + K + 1]`: (hidden `[B, T, C]` at positions 0..T-1,
  target logits `[B, T + K, V]` at positions 0..T+K-1), no gradient."""
  logits, hidden = model(params, windows[:, :-1], return_hidden=True)
  t = windows.shape[1] - num_heads - 1
  return jax.lax.stop_gradient(hidden[:, :t]), jax.lax.stop_gradient(logits)


def medusa_loss(heads: MedusaHeads, head_params, hidden, windows, target_logits, *,
                decay: float, labels: str):
  """(L_Medusa-1, per-head mean cross-entropy `[K]`) for hidden `[B, T, C]` of windows
  `[B, T + K + 1]`: head k (1-based) at position t against y_{t+k+1} (corpus) or against the
  target's distribution at position t + k (target)."""
  k_heads = heads.num_heads
  t = hidden.shape[1]
  logp = jax.nn.log_softmax(heads(head_params, hidden), axis=-1)  # [B, T, K, V]
  per_head = []
  for k in range(1, k_heads + 1):
    if labels == "corpus":
      y = windows[:, k + 1:k + 1 + t]
      ce = -jnp.take_along_axis(logp[:, :, k - 1], y[..., None], -1)[..., 0]
    else:
      soft = jax.nn.softmax(target_logits[:, k:k + t].astype(jnp.float32), axis=-1)
      ce = -jnp.sum(soft * logp[:, :, k - 1], axis=-1)
    per_head.append(ce.mean())
  per_head = jnp.stack(per_head)
  return jnp.sum(head_weights(k_heads, decay) * per_head), per_head


def _windows(corpus, key, batch: int, width: int):
  starts = jax.random.randint(key, (batch,), 0, corpus.shape[0] - width + 1)
  return jax.vmap(lambda s: jax.lax.dynamic_slice(corpus, (s,), (width,)))(starts)


def medusa_train_loss(model, heads: MedusaHeads, cfg: MedusaTrainConfig):
  """The loss `loss_fn(head_params, key, ctx, corpus, target_params)` of
  `jaxinf.train.step.make_train_step`: L_Medusa-1 over `cfg.batch_size` random windows of
  `corpus`, on the frozen target's features (no gradient reaches `target_params`)."""
  width = cfg.seq_len + cfg.num_heads + 1

  def loss_fn(head_params, key, ctx, corpus, target_params):
    del ctx
    windows = _windows(corpus, key, cfg.batch_size, width)
    hidden, logits = target_features(model, target_params, windows, cfg.num_heads)
    return medusa_loss(heads, head_params, hidden, windows, logits, decay=cfg.decay,
                       labels=cfg.labels)[0]

  return loss_fn


def train_medusa(model, params, corpus, cfg: MedusaTrainConfig, out_dir: str | os.PathLike, *,
                 progress: bool = True) -> tuple[MedusaHeads, dict, list[dict]]:
  """Trains (or, when `out_dir` holds the finished run, loads) Medusa-1 heads on the frozen
  transformer `model`/`params` over the int token stream `corpus`. Checkpoints and resumes exactly
  in `out_dir` (`run_training`). Returns (heads, head_params, loss records)."""
  corpus = np.asarray(corpus)
  if not isinstance(cfg, MedusaTrainConfig):
    raise TypeError(f"cfg: expected a MedusaTrainConfig, got {type(cfg).__name__}")
  if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
    raise TypeError(f"model: expected a TransformerLM, got {type(model).__name__}")
  check_model_params(model, params)
  width = cfg.seq_len + cfg.num_heads + 1
  if corpus.ndim != 1 or not np.issubdtype(corpus.dtype, np.integer) or corpus.shape[0] < width:
    raise ValueError(f"corpus: expected a 1-D integer stream of at least seq_len + num_heads + 1 "
                     f"= {width} tokens, got {corpus.dtype} {corpus.shape}")
  if corpus.min() < 0 or corpus.max() >= model.vocab_size:
    raise ValueError(f"corpus: token ids must lie in [0, {model.vocab_size})")
  if width - 1 > model.max_len:
    raise ValueError(f"cfg: seq_len + num_heads = {width - 1} exceeds the target's context of "
                     f"{model.max_len}")
  heads, head_params = medusa_heads(model, params, num_heads=cfg.num_heads,
                                    num_layers=cfg.num_layers, seed=cfg.seed)
  step = make_train_step(medusa_train_loss(model, heads, cfg), cfg.optimizer, seed=cfg.seed)
  state, records = run_training(step, init_train_state(head_params, cfg.optimizer),
                                (jnp.asarray(corpus, jnp.int32), params),
                                steps=cfg.steps, out_dir=out_dir,
                                checkpoint_every=cfg.checkpoint_every, progress=progress,
                                desc="train-medusa")
  return heads, state["params"], records


def train_medusa_self_distilled(model, params, corpus, cfg: MedusaTrainConfig,
                                out_dir: str | os.PathLike, *, eos_id: int | None = None,
                                num_prompts: int = 256, prompt_len: int = 64,
                                new_tokens: int = 192, seed: int = 0, progress: bool = True
                                ) -> tuple[MedusaHeads, dict, list[dict]]:
  """Train-or-load for benchmarks: the self-distillation stream of `model`/`params` (written once
  to `out_dir/self_distill.npy` and reused), then `train_medusa` on it in `out_dir` (resumed or
  loaded when finished). `out_dir` belongs to one target: new target weights need a new folder.
  Returns (heads, head_params, loss records)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "self_distill.npy"
  if path.exists():
    stream = np.load(path)
  else:
    stream = target_text(model, params, corpus, jax.random.key(seed),
                                      num_prompts=num_prompts, prompt_len=prompt_len,
                                      new_tokens=new_tokens, eos_id=eos_id)
    np.save(path.with_suffix(".tmp.npy"), stream)
    path.with_suffix(".tmp.npy").rename(path)  # a kill mid-write leaves no partial stream
  return train_medusa(model, params, stream, cfg, out_dir, progress=progress)


def head_accuracy(model, params, heads: MedusaHeads, head_params, stream, *, seq_len: int = 128,
                  max_windows: int = 16, top: int = 4, batch_size: int = 8) -> dict[str, Any]:
  """Per-rank accuracy `[K, top]` of each head over non-overlapping windows of `stream`: the
  fraction of positions where head k's rank-r candidate is the corpus token y_{t+k+1}
  ("corpus") or the target's greedy prediction at position t + k, teacher-forced ("target").
  Row sums are top-`top` accuracies; column 0 is top-1. Feed "target" to
  `decoding.medusa.tree_from_accuracies`."""
  stream = np.asarray(stream)
  k_heads = heads.num_heads
  width = seq_len + k_heads + 1
  n = min(max_windows, len(stream) // width)
  if n < 1:
    raise ValueError(f"stream: needs at least seq_len + num_heads + 1 = {width} tokens")
  windows = np.stack([stream[i * width:(i + 1) * width] for i in range(n)]).astype(np.int32)

  @jax.jit
  def counts(w):
    hidden, logits = target_features(model, params, w, k_heads)
    ranked = jax.lax.top_k(heads(head_params, hidden), top)[1]  # [B, T, K, top]
    out = {}
    for name in ("corpus", "target"):
      per = []
      for k in range(1, k_heads + 1):
        y = (w[:, k + 1:k + 1 + seq_len] if name == "corpus"
             else jnp.argmax(logits[:, k:k + seq_len], -1))
        per.append(jnp.sum(ranked[:, :, k - 1] == y[..., None], axis=(0, 1)))
      out[name] = jnp.stack(per)
    return out

  total = {"corpus": np.zeros((k_heads, top)), "target": np.zeros((k_heads, top))}
  for i in range(0, n, batch_size):
    c = counts(jnp.asarray(windows[i:i + batch_size]))
    for name in total:
      total[name] += np.asarray(c[name])
  return {name: v / (n * seq_len) for name, v in total.items()}
