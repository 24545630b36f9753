"""Every model computes its matmul weights as `x @ w`, so a low-bit weight leaf
(`jaxinf.quant.base.QuantizedWeight`) runs through the unchanged model code: a tree in which each
registered matmul weight is replaced by a minimal int8 weight written here (per-output-channel
scale, product = (x @ q) * scale) gives the logits of the floating tree of its dequantized values,
through `generate` and through the DiT's `sample`."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinf.checkpoints.validate import ParamsMismatchError, leaf_paths
from jaxinf.decoding.generate import generate
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.diffusion.sample import sample
from jaxinf.models import dit, families
from jaxinf.models.functional import to_functional
from jaxinf.quant.base import QuantizedWeight, is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Int8(QuantizedWeight):
  q: jax.Array  # [in, out] int8
  s: jax.Array  # [out] fp32
  compute: str = dataclasses.field(default="float32", metadata={"static": True})

  @property
  def shape(self):
    return tuple(self.q.shape)

  @property
  def dtype(self):
    return np.dtype(self.compute)

  def astype(self, dtype):
    return dataclasses.replace(self, compute=np.dtype(dtype).name)

  def dequantize(self):
    return (self.q.astype(jnp.float32) * self.s).astype(self.dtype)

  def __rmatmul__(self, x):
    return ((x @ self.q.astype(x.dtype)) * self.s.astype(x.dtype)).astype(self.dtype)


def _int8(w):
  s = jnp.maximum(jnp.abs(w).max(0), 1e-8) / 127.0
  return _Int8(jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8), s)


def _quantize(params, pattern):
  """(tree with _Int8 matmul weights, tree of their dequantized values, number replaced)."""
  pattern = re.compile(pattern)
  count = [0]

  def one(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if not pattern.fullmatch(name):
      return leaf
    count[0] += 1
    return _int8(leaf)

  quantized = jax.tree_util.tree_map_with_path(one, params)
  dequantized = jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, quantized,
                             is_leaf=is_quantized)
  return quantized, dequantized, count[0]


@pytest.mark.parametrize("family", ["transformer", "mamba", "rwkv7", "transnormer"])
def test_family_runs_quantized_weights_unchanged(family):
  model, params = families.build(families.named_config(f"{family}-tiny"), seed=1)
  quantized, dequantized, n = _quantize(params, families.get_family(family).matmul_weights)
  assert n == len(families.matmul_weight_paths(model)) > 0
  assert all(is_quantized(x) for x in jax.tree.leaves(quantized, is_leaf=is_quantized)
             if not isinstance(x, jax.Array))
  # the replaced weights are exactly the family's listed ones, every listed one is 2-D
  assert sorted(p for p, x in leaf_paths(quantized).items() if is_quantized(x)) == sorted(
      families.matmul_weight_paths(model))
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, model.vocab_size)
  want = np.asarray(model(dequantized, prompt))
  # (x @ q) * s and x @ (q * s) differ by fp32 rounding only; how far rounding moves this random
  # tiny model's logits is measured, not assumed: the same forward with every weight moved by
  # about one ulp (the tiny TransNormerLLM moves ~3e-4, the transformer ~1e-7).
  leaves, treedef = jax.tree.flatten(dequantized)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  nudged = jax.tree.unflatten(treedef, [x * (1 + 1.2e-7 * jax.random.normal(k, x.shape))
                                        for x, k in zip(leaves, keys)])
  rounding = float(np.abs(np.asarray(model(nudged, prompt)) - want).max())
  assert np.abs(np.asarray(model(quantized, prompt)) - want).max() <= 4 * rounding + 1e-6
  out_want = generate(model, dequantized, prompt, jax.random.key(1), max_new_tokens=4)
  out_got = generate(model, quantized, prompt, jax.random.key(1), max_new_tokens=4)
  np.testing.assert_array_equal(np.asarray(out_got.tokens), np.asarray(out_want.tokens))


def test_quantized_leaf_is_checked_by_its_logical_shape():
  model, params = families.build(families.named_config("transformer-tiny"))
  quantized, _, _ = _quantize(params, families.get_family("transformer").matmul_weights)
  model.check_params(quantized)
  bad = jax.tree.map(lambda x: x, quantized, is_leaf=is_quantized)
  bad["lm_head"]["kernel"] = _int8(jnp.ones((3, 4)))
  with pytest.raises(ParamsMismatchError, match="lm_head/kernel"):
    model.check_params(bad)


def test_dit_runs_quantized_weights_unchanged():
  cfg = dit.dit_config("DiT-tiny")
  apply, params = to_functional(dit.DiT(cfg, rngs=nnx.Rngs(0)))
  params = dit.jitter_params(params, seed=3)  # a fresh adaLN-Zero DiT outputs exactly zero
  quantized, dequantized, n = _quantize(params, dit.DIT_MATMUL_WEIGHTS)
  assert n == sum(p.endswith("/kernel") for p in leaf_paths(params))
  run = functools.partial(sample, jax.random.key(0), schedule=schedules.NoiseSchedule(),
                          solver=solvers.DDIM(), shape=(2, 8, 8, 1), steps=3,
                          cond=jnp.array([0, 1]))
  want = run(denoiser=dit_denoiser(apply, dequantized, cfg))
  got = run(denoiser=dit_denoiser(apply, quantized, cfg))
  assert float(jnp.abs(want).max()) > 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_linear_computes_a_quantized_kernel_in_its_dtype():
  from jaxinf.models.layers import Linear
  layer = Linear(8, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 8))
  want = layer(x)  # nnx.Linear's own path: inputs, kernel and bias promoted to bfloat16
  layer.kernel.set_value(_int8(layer.kernel[...]))
  got = layer(x)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0.05, atol=0.05)
