"""The shared train step: its updates against optax's transformations applied by hand and against
AdamW written out in numpy (Loshchilov & Hutter 2019, Algorithm 2), and OptimizerConfig's checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinf.train.step import (OptimizerConfig, StepContext, check_optimizer, init_train_state,
                               make_train_step)

A = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.5]], np.float32)
B = np.array([1.0, -2.0, 0.5], np.float32)


def quadratic(params, key, ctx, a, b):
  """0.5 w^T A w - b^T w plus a key-dependent linear term, so that the step's key matters."""
  del ctx
  w = params["w"]
  noise = jax.random.normal(key, w.shape)
  return 0.5 * w @ a @ w - b @ w + 0.1 * noise @ w


def test_step_equals_optax_chain_applied_by_hand():
  """Three steps of the shared step with an EMA equal clip -> adamw with the warm-up schedule,
  the key fold_in(key(seed), step) and ema <- d ema + (1 - d) params, written out here."""
  cfg = OptimizerConfig(learning_rate=0.05, warmup_steps=2, weight_decay=0.01, grad_clip=0.5,
                        ema_decay=0.9)
  params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.float32)}
  state = init_train_state(params, cfg)
  assert sorted(state) == ["ema", "opt_state", "params", "step"]
  step = make_train_step(quadratic, cfg, seed=3)

  schedule = optax.join_schedules([optax.linear_schedule(0.0, 0.05, 2),
                                   optax.constant_schedule(0.05)], [2])
  opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=0.01))

  @jax.jit
  def by_hand(w, ema, opt_state, s):
    key = jax.random.fold_in(jax.random.key(3), s)
    loss, grads = jax.value_and_grad(quadratic)(w, key, None, A, B)
    updates, opt_state = opt.update(grads, opt_state, w)
    w = optax.apply_updates(w, updates)
    return w, jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, w), opt_state, loss

  w, ema, opt_state = params, params, opt.init(params)
  for s in range(3):
    w, ema, opt_state, loss = by_hand(w, ema, opt_state, jnp.int32(s))
    state, got = step(state, A, B)
    np.testing.assert_array_equal(got, loss)
    np.testing.assert_array_equal(state["params"]["w"], w["w"])
    np.testing.assert_array_equal(state["ema"]["w"], ema["w"])
  assert int(state["step"]) == 3


def test_step_equals_adamw_in_numpy():
  """Without clipping in play (a large bound) the step is AdamW: m, v moments with bias
  correction, lr_t (g-hat) + lr_t wd w, lr_t = lr min(1, t / warmup)."""
  lr, wd, b1, b2, eps, warm = 0.1, 0.05, 0.9, 0.999, 1e-8, 3
  cfg = OptimizerConfig(learning_rate=lr, warmup_steps=warm, weight_decay=wd, grad_clip=1e6)
  w = np.array([0.5, -1.0, 2.0], np.float64)
  state = init_train_state({"w": jnp.asarray(w, jnp.float32)}, cfg)
  assert "ema" not in state
  loss_fn = lambda p, key, ctx, a, b: 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]
  step = make_train_step(loss_fn, cfg, seed=0)
  m, v = np.zeros(3), np.zeros(3)
  for t in range(1, 6):
    g = A.astype(np.float64) @ w - B
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    rate = lr * min(1.0, (t - 1) / warm)  # optax counts the schedule from 0
    w = w - rate * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w)
    state, _ = step(state, A, B)
    np.testing.assert_allclose(state["params"]["w"], w, rtol=1e-5, atol=1e-6)


def test_context_carries_the_ema_and_the_step():
  cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.0, ema_decay=0.5)
  seen = []

  def loss_fn(params, key, ctx, x):
    del key
    assert isinstance(ctx, StepContext)
    jax.debug.callback(lambda e, s: seen.append((float(e), int(s))), ctx.ema["w"], ctx.step)
    return jnp.sum(params["w"] * x)

  state = init_train_state({"w": jnp.float32(1.0)}, cfg)
  step = make_train_step(loss_fn, cfg, seed=0)
  for _ in range(3):
    state, _ = step(state, jnp.float32(1.0))
  # the warm-up schedule gives rate 0 at step 0 (also for warmup_steps=0); at step 1 Adam's
  # bias-corrected update is -lr sign(g) = -0.1, so the EMA after it is 0.5 + 0.5 * 0.9
  assert seen == [(1.0, 0), (1.0, 1), (pytest.approx(0.95, abs=1e-6), 2)]


BASE = dict(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)


@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", math.inf),
    ("learning_rate", math.nan), ("learning_rate", "1e-3"),
    ("warmup_steps", -1), ("warmup_steps", 2.5), ("warmup_steps", True),
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("weight_decay", math.inf),
    ("grad_clip", 0.0), ("grad_clip", -1.0), ("grad_clip", math.nan),
    ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", math.nan), ("ema_decay", "0.9"),
])
def test_optimizer_config_rejects(field, value):
  with pytest.raises(ValueError, match=f"^{field}: "):
    OptimizerConfig(**{**BASE, field: value})


def test_optimizer_config_accepts_edges():
  OptimizerConfig(**BASE, ema_decay=0.0)
  OptimizerConfig(learning_rate=1, warmup_steps=0, weight_decay=0, grad_clip=math.inf)


def test_bad_arguments():
  with pytest.raises(TypeError, match="optimizer"):
    check_optimizer({"learning_rate": 1e-3})
  with pytest.raises(ValueError, match="optimizer: .*ema_decay"):
    check_optimizer(OptimizerConfig(**BASE), needs_ema=True)
  with pytest.raises(TypeError, match="seed"):
    make_train_step(quadratic, OptimizerConfig(**BASE), seed=0.5)
  with pytest.raises(TypeError, match="cfg"):
    make_train_step(quadratic, BASE, seed=0)
