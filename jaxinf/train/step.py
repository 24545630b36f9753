"""The one train step: AdamW after gradient clipping, an optional EMA, randomness from the step.

Every trainer in `jaxinf.train` supplies only its loss; the optimizer, the update and the state
layout are these:

    opt = OptimizerConfig(learning_rate=2e-3, warmup_steps=50, weight_decay=0.0, ema_decay=0.995)
    step = make_train_step(loss_fn, opt, seed=0)     # loss_fn(params, key, ctx, *data) -> scalar
    state, records = run_training(step, init_train_state(params, opt), data, steps=..., ...)

The update is global-norm clipping (Pascanu et al. 2013, "On the difficulty of training recurrent
neural networks", Sec. 3.2) followed by AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization", Algorithm 2) at a learning rate warmed up linearly from 0 and then constant. With
`ema_decay` set, the state also carries an exponential moving average of the weights (Polyak &
Juditsky 1992), ema <- d ema + (1 - d) params after each update: the sampling weights of the
diffusion and flow trainers and the target network of consistency distillation.

A step's randomness is `fold_in(key(seed), state["step"])`, as `jaxinf.train.loop.run_training`
requires for exact resume. The state is a dict with `params`, `opt_state`, `step` and, with an EMA,
`ema`: the layout the orbax checkpoints of every trainer store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


# The largest AdamW learning rate an `OptimizerConfig` accepts (see its docstring).
MAX_LEARNING_RATE = 1.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """learning_rate: AdamW's constant rate after warm-up, in (0, MAX_LEARNING_RATE]; warmup_steps:
  steps of the linear ramp from 0 (the first step always runs at rate 0; with 0 or 1 the second
  runs at the full rate); weight_decay: AdamW's decoupled decay, >= 0; grad_clip: the global-norm
  bound, > 0 (inf: no clipping); ema_decay: None (no EMA in the state) or d in [0, 1).

  Why a learning-rate bound: Adam normalises each coordinate of the update by its running RMS,
  so every weight moves by about `learning_rate` per step whatever the gradients' scale. A rate
  above 1 moves each weight by more than the scale of its initialisation (0.02 to 1) at every
  step, so the run diverges; such a value is a typo (1e6 for 1e-6), not a setting."""

  learning_rate: float
  warmup_steps: int
  weight_decay: float
  grad_clip: float = 1.0
  ema_decay: float | None = None

  def __post_init__(self):
    lr = self.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr)
                                                                       and lr > 0):
      raise ValueError(f"learning_rate: expected a finite number > 0, got {lr!r}")
    if lr > MAX_LEARNING_RATE:
      raise ValueError(f"learning_rate: expected at most {MAX_LEARNING_RATE} (AdamW moves every "
                       f"weight by about the rate at each step), got {lr!r}")
    w = self.warmup_steps
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
      raise ValueError(f"warmup_steps: expected an int >= 0, got {w!r}")
    wd = self.weight_decay
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (math.isfinite(wd)
                                                                       and wd >= 0):
      raise ValueError(f"weight_decay: expected a finite number >= 0, got {wd!r}")
    c = self.grad_clip
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
      raise ValueError(f"grad_clip: expected a global-norm bound > 0, got {c!r}")
    d = self.ema_decay
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float))
                          or not 0.0 <= d < 1.0):
      raise ValueError(f"ema_decay: expected None or a number in [0, 1), got {d!r}")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW at a linearly warmed-up constant learning rate."""
  warm = max(cfg.warmup_steps, 1)
  lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm),
                             optax.constant_schedule(cfg.learning_rate)], [warm])
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(lr, weight_decay=cfg.weight_decay))


def init_train_state(params, cfg: OptimizerConfig) -> dict[str, Any]:
  """`{"params", "opt_state", "step": 0}`, plus `"ema"` (a copy of params) when cfg has an EMA."""
  state = {"params": params, "opt_state": make_optimizer(cfg).init(params),
           "step": jnp.zeros((), jnp.int32)}
  if cfg.ema_decay is not None:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return state


class StepContext(NamedTuple):
  """What a loss may read of the train state besides the params it differentiates: the EMA of
  the trained weights (None without one; consistency distillation's target network) and the
  step number (for annealed losses)."""

  ema: Any
  step: jax.Array


def make_train_step(loss_fn: Callable, cfg: OptimizerConfig, *, seed: int) -> Callable:
  """A jitted `step(state, *data) -> (state, loss)` over `init_train_state`'s layout.

  loss_fn(params, key, ctx, *data) -> scalar: `key` is `fold_in(key(seed), state["step"])`, the
  step's only randomness; `ctx` a `StepContext`; `data` the step's other arguments (passed, not
  closed over, so that large arrays are not baked into the compiled step).
  """
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f"seed: expected an int, got {seed!r}")
  if not isinstance(cfg, OptimizerConfig):
    raise TypeError(f"cfg: expected an OptimizerConfig, got {type(cfg).__name__}")
  opt = make_optimizer(cfg)
  base_key = jax.random.key(seed)

  @jax.jit
  def step(state, *data):
    key = jax.random.fold_in(base_key, state["step"])
    ctx = StepContext(state.get("ema"), state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], key, ctx, *data)
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    if cfg.ema_decay is not None:
      new["ema"] = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p,
                                state["ema"], new["params"])
    return new, loss

  return step


def check_positive_ints(cfg, *names: str) -> None:
  """ValueError naming the first field of `cfg` among `names` that is not an int >= 1."""
  for name in names:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}: expected a positive int, got {v!r}")


def check_seed(cfg) -> None:
  """ValueError unless `cfg.seed` is an int >= 0 (a negative seed is almost always a typo)."""
  v = cfg.seed
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ValueError(f"seed: expected an int >= 0, got {v!r}")


def check_model_params(model, params) -> None:
  """Before a language-model trainer starts: `model` a SequenceModel (every jaxinf family, or a
  user's model on the same contract: trainers need its vocab_size and parallel form) and `params`
  its parameter tree, checked by the model where it can say what it expects (every jaxinf family:
  `jaxinf.checkpoints.validate.check_params`: missing, extra, shape, dtype)."""
  missing = [a for a in ("vocab_size", "init_cache", "prefill") if not hasattr(model, a)]
  if missing:
    raise TypeError(f"model: expected a language model on the SequenceModel contract (a jaxinf "
                    f"family such as TransformerLM), got {type(model).__name__} (no "
                    f"{', '.join(missing)})")
  if params is None:
    raise TypeError("params: expected the model's parameter tree, got None")
  checker = getattr(model, "check_params", None)
  if checker is not None:
    checker(params)


def check_apply_params(apply, params) -> None:
  """Before a trainer of a functional model starts: `apply` callable and, when it comes from
  `jaxinf.models.functional.to_functional` (which records the expected tree), `params` its
  parameter tree."""
  if not callable(apply):
    raise TypeError(f"apply: expected the model's pure function apply(params, ...), got "
                    f"{type(apply).__name__}")
  check = getattr(apply, "check_params", None)
  if check is not None:
    check(params)


def check_optimizer(optimizer, *, needs_ema: bool = False) -> None:
  """TypeError unless `optimizer` is an OptimizerConfig; ValueError when a trainer that keeps an
  EMA (`needs_ema`) gets one without `ema_decay`."""
  if not isinstance(optimizer, OptimizerConfig):
    raise TypeError(f"optimizer: expected an OptimizerConfig, got {type(optimizer).__name__}")
  if needs_ema and optimizer.ema_decay is None:
    raise ValueError("optimizer: this trainer keeps an EMA of the weights; expected ema_decay in "
                     "[0, 1), got None")
