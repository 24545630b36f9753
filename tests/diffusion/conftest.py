"""Fixtures shared by the diffusion tests."""

from __future__ import annotations

import functools

import jax
import pytest
from flax import nnx

from jaxinf.models.dit import DiT, dit_config
from jaxinf.models.functional import to_functional


@functools.cache
def _random_dit(seed: int = 1, learn_sigma: bool = False):
  cfg = dit_config("DiT-tiny", learn_sigma=learn_sigma)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  # adaLN-Zero makes a fresh DiT output zeros; randomise every parameter so the tests have teeth.
  # Scale 0.05 keeps the random network well-conditioned: at 0.2 it amplifies one-ulp rounding
  # differences between two compiled programs to ~2e-6 over 12 guided steps.
  apply, params = to_functional(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, p.shape)
                                     for k, p in zip(keys, leaves)])
  return cfg, model, apply, params


@pytest.fixture(scope="session")
def random_dit():
  """`random_dit(seed=1, learn_sigma=False) -> (cfg, model, apply, params)`: DiT-tiny with every
  parameter redrawn from N(0, 0.05^2) with `key(seed)`, built once per process and arguments."""
  return _random_dit
