"""Training configs and trainer entry points refuse bad values by name before training starts
(nothing here compiles a train step: every error comes from the pre-trace checks)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf.checkpoints.validate import ParamsMismatchError
from jaxinf.diffusion import schedules
from jaxinf.models import families
from jaxinf.models.dit import DiT, DiTConfig
from jaxinf.models.functional import to_functional
from jaxinf.train.diffusion import DiffusionTrainConfig, train_diffusion
from jaxinf.train.distill import CouplingConfig
from jaxinf.train.flow import FlowTrainConfig, train_regression
from jaxinf.train.lm import LMTrainConfig, train_lm
from jaxinf.train.loop import run_training
from jaxinf.train.medusa import MedusaTrainConfig, train_medusa
from jaxinf.train.process_scorer import ScorerTrainConfig, train_scorer
from jaxinf.train.step import MAX_LEARNING_RATE, OptimizerConfig, make_train_step
from tests.bad_input import raises_before_tracing

OPT = dict(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", math.nan), ("grad_clip", "1"),
    ("weight_decay", -0.1), ("weight_decay", math.inf), ("weight_decay", math.nan),
    ("warmup_steps", -1), ("warmup_steps", 2.5), ("warmup_steps", True),
    ("learning_rate", 1e6), ("learning_rate", MAX_LEARNING_RATE * 1.01), ("learning_rate", 0.0),
    ("learning_rate", -1e-3), ("learning_rate", math.nan), ("learning_rate", math.inf),
    ("learning_rate", "3e-4"), ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", math.nan),
])
def test_optimizer_config_refuses_by_name(field, value):
  with raises_before_tracing(ValueError, rf"^{field}"):
    OptimizerConfig(**{**OPT, field: value})


def test_optimizer_config_bounds_are_inclusive():
  OptimizerConfig(**{**OPT, "learning_rate": MAX_LEARNING_RATE})
  OptimizerConfig(**{**OPT, "grad_clip": math.inf, "warmup_steps": 0})


EMA = OptimizerConfig(**OPT, ema_decay=0.99)
TRAIN_CONFIGS = {
    LMTrainConfig: ({}, ["steps", "batch_size", "seq_len", "checkpoint_every"]),
    ScorerTrainConfig: ({}, ["steps", "batch_size", "checkpoint_every"]),
    MedusaTrainConfig: ({}, ["num_heads", "num_layers", "steps", "batch_size", "seq_len",
                             "checkpoint_every"]),
    DiffusionTrainConfig: ({"optimizer": EMA}, ["steps", "batch_size", "checkpoint_every"]),
    FlowTrainConfig: ({"optimizer": EMA}, ["steps", "batch_size", "checkpoint_every"]),
    CouplingConfig: ({}, ["pairs", "solver_steps"]),
}


def _train_cases():
  for cls, (base, ints) in TRAIN_CONFIGS.items():
    for name in ints:
      for value in (0, -1, 1.5):
        yield pytest.param(cls, base, name, value, id=f"{cls.__name__}.{name}={value}")
    yield pytest.param(cls, base, "seed", -1, id=f"{cls.__name__}.seed=-1")
    yield pytest.param(cls, base, "seed", 1.0, id=f"{cls.__name__}.seed=1.0")
    if "optimizer" in {f.name for f in dataclasses.fields(cls)}:
      yield pytest.param(cls, base, "optimizer", {"learning_rate": 1e-3},
                         id=f"{cls.__name__}.optimizer=dict")


@pytest.mark.parametrize("cls, base, field, value", list(_train_cases()))
def test_trainer_configs_refuse_by_name(cls, base, field, value):
  with raises_before_tracing((ValueError, TypeError), rf"^{field}"):
    cls(**{**base, field: value})


@pytest.mark.parametrize("cls, overrides, names", [
    (DiffusionTrainConfig, {"optimizer": OptimizerConfig(**OPT)}, "optimizer: .*ema_decay"),
    (DiffusionTrainConfig, {"prediction_type": "x1"}, "prediction_type"),
    (FlowTrainConfig, {"time_sampling": "gaussian"}, "time_sampling"),
    (FlowTrainConfig, {"logit_std": math.inf}, "logit_std"),
    (FlowTrainConfig, {"logit_mean": math.nan}, "logit_mean"),
    (MedusaTrainConfig, {"decay": 0.0}, "decay"),
    (MedusaTrainConfig, {"labels": "teacher"}, "labels"),
    (CouplingConfig, {"guidance_scale": math.nan}, "guidance_scale"),
    (CouplingConfig, {"guidance_scale": -1.0}, "guidance_scale"),
])
def test_trainer_config_values(cls, overrides, names):
  base = TRAIN_CONFIGS[cls][0]
  with raises_before_tracing((ValueError, TypeError), rf"^{names}"):
    cls(**{**base, **overrides})


# --- entry points: model, params, cfg, data; all refused before the first step ----------------


@pytest.fixture(scope="module")
def tiny_lm():
  return families.build("transformer-tiny")


def test_lm_trainers_refuse_a_foreign_model_or_tree(tiny_lm, tmp_path):
  model, params = tiny_lm
  corpus = np.zeros(100, np.int32)
  cfg = LMTrainConfig(steps=1, batch_size=1, seq_len=8)
  with raises_before_tracing(TypeError, "^model"):
    train_lm(object(), params, corpus, cfg=cfg, out_dir=tmp_path)
  with raises_before_tracing(ParamsMismatchError, r"^params: .*missing keys"):
    train_lm(model, {}, corpus, cfg=cfg, out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^cfg"):
    train_lm(model, params, corpus, cfg=dataclasses.asdict(cfg), out_dir=tmp_path)
  data = {"tokens": np.zeros((2, 4), np.int32), "lengths": np.full(2, 4), "labels": np.zeros(2)}
  with raises_before_tracing(TypeError, "^model"):
    train_scorer(object(), params, data, cfg=ScorerTrainConfig(), out_dir=tmp_path)
  with raises_before_tracing(ParamsMismatchError, r"^params: .*unexpected keys \['x'\]"):
    train_scorer(model, {**params, "x": np.zeros(1)}, data, cfg=ScorerTrainConfig(),
                 out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^data"):
    train_scorer(model, params, [data], cfg=ScorerTrainConfig(), out_dir=tmp_path)
  with raises_before_tracing(ParamsMismatchError, r"^params: .*missing keys"):
    train_medusa(model, {}, corpus, MedusaTrainConfig(seq_len=8), tmp_path)
  assert not list(tmp_path.iterdir())  # nothing started: no checkpoint folder, no loss log


def test_diffusion_trainers_refuse_a_foreign_tree(tmp_path):
  cfg = DiTConfig(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                  num_heads=2, num_classes=3, learn_sigma=False)
  apply, params = to_functional(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
  shrunk = {**params, "final_layer": {}}
  train_cfg = DiffusionTrainConfig(steps=1, batch_size=2)
  images, labels = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32)
  schedule = schedules.NoiseSchedule()
  with raises_before_tracing(ParamsMismatchError, r"^params: .*missing keys \['final_layer/"):
    train_diffusion(apply, shrunk, images, labels, cfg=train_cfg, schedule=schedule,
                    out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^apply"):
    train_diffusion("apply", params, images, labels, cfg=train_cfg, schedule=schedule,
                    out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^cfg"):
    train_diffusion(apply, params, images, labels, cfg=FlowTrainConfig(), schedule=schedule,
                    out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^cfg"):
    train_regression(lambda *a: 0.0, params, (images,), cfg=train_cfg, out_dir=tmp_path)
  with raises_before_tracing(TypeError, "^arrays"):
    train_regression(lambda *a: 0.0, params, (), cfg=FlowTrainConfig(), out_dir=tmp_path)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(steps=0), ValueError, "^steps"), (dict(steps=2.0), ValueError, "^steps"),
    (dict(checkpoint_every=0), ValueError, "^checkpoint_every"),
    (dict(step_fn=None), TypeError, "^step_fn"), (dict(state={"params": {}}), TypeError, "^state"),
])
def test_run_training_checks_before_starting(kwargs, error, names, tmp_path):
  opt = OptimizerConfig(**OPT)
  args = dict(step_fn=make_train_step(lambda p, k, c: jnp.sum(p["w"] ** 2), opt, seed=0),
              state={"step": jnp.zeros((), jnp.int32)}, data=(), steps=1, out_dir=tmp_path,
              checkpoint_every=1, progress=False)
  with raises_before_tracing(error, names):
    run_training(**{**args, **kwargs})
  assert not list(tmp_path.iterdir())
