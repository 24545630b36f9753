"""The CPU decode-step attention (`jaxinf.models.cpu_attention`, csrc/attention_step.cc) against
the XLA form of `pallas_kernels.attention_step` on the sliced layer, and through the transformer.

Tolerance, per output element (both fp32, different summation orders, a polynomial exp): a logit
l_s = scale <q, k_s> is off by at most D 2^-24 scale sum_d |q_d k_sd| in either form, exp adds a
relative 2e-7 (< 4 x 2^-24), so each normalized weight is off by a relative 2 (max logit error +
4 x 2^-24) at most, and the weighted sum of V adds S 2^-24 |v|max per form:
|o - o_ref| <= |v|max (2 (e_logit + 4 x 2^-24) + 2 S 2^-24), doubled for margin.
An fp16 cache is widened exactly (every half is a float), so the reference reads the same values
as fp32 and the same bound holds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxinf.decoding.generate import generate
from jaxinf.models import cpu_attention
from jaxinf.models.kv_policies import KVPolicy
from jaxinf.models.transformer import TransformerConfig, TransformerLM
from jaxinf.quant import cpu_kernel
from sequence_contract import TRANSFORMER_CFG, random_tokens
from tests.bad_input import raises_before_tracing

EPS = 2.0**-24


@pytest.fixture(scope="module")
def kernel():
  if not cpu_attention.available():
    pytest.skip("the CPU kernels cannot be built here (no C++ compiler)")


def bound(q, k, v, lengths, scale):
  """The tolerance above for every output element [B, T, H, 1]."""
  b, t, h, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  kk = np.repeat(np.abs(k), h // hkv, axis=1)  # [B, H, S, D]
  mag = scale * np.einsum("bthd,bhsd->bths", np.abs(q), kk).max(axis=-1)  # [B, T, H]
  e_logit = d * EPS * mag
  vmax = np.abs(v).max()
  return 2 * vmax * (2 * (e_logit + 4 * EPS) + 2 * s * EPS)[..., None]


# (B, T, H, Hkv, S, D): MHA at one token; GQA with 3 new tokens (verification); a head dim with a
# masked tail vector; D = 20, a tail of 4 lanes on both vector widths (AVX2's fp16 tail copy);
# D = 136 > 128 (the scalar path)
SHAPES = [(3, 1, 4, 4, 50, 64), (2, 3, 4, 2, 37, 40), (2, 1, 2, 2, 29, 20), (2, 2, 2, 1, 20, 136)]


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", [None, "scalar", "avx2", "avx512"])
def test_matches_the_xla_form(kernel, shape, path, kv):
  if path is not None and path not in cpu_kernel.paths():
    pytest.skip(f"this CPU does not run the {path} path")
  b, t, h, hkv, s, d = shape
  rng = np.random.default_rng(sum(shape))
  layers = 3
  q = rng.normal(size=(b, t, h, d)).astype(np.float32) * 2  # logits of order 10: a real softmax
  # an fp16 cache holds halves; the reference reads the same values widened to fp32
  k = rng.normal(size=(layers, b, hkv, s, d)).astype(kv).astype(np.float32)
  v = rng.normal(size=(layers, b, hkv, s, d)).astype(kv).astype(np.float32)
  lengths = np.array([t, s] + list(rng.integers(t, s + 1, b - 2)), np.int32)[:b]  # min, full
  scale = d ** -0.5
  for layer in (0, 2):
    out = np.asarray(cpu_attention.attention_step(
        jnp.asarray(q), jnp.asarray(k.astype(kv)), jnp.asarray(v.astype(kv)),
        jnp.asarray(lengths), layer, path=path))
    ref = np.asarray(pallas_kernels.attention_step(
        jnp.asarray(q), jnp.asarray(k[layer]), jnp.asarray(v[layer]), jnp.asarray(lengths),
        impl="xla", layout="bhsd"))
    tol = bound(q, k[layer], v[layer], lengths, scale)
    assert np.all(np.abs(out - ref) <= tol), np.abs(out - ref).max()
    # the row at length t: its first query sees slot 0 only, so it returns v[slot 0] exactly-ish
    g = h // hkv
    np.testing.assert_allclose(out[0, 0], np.repeat(v[layer, 0, :, 0], g, axis=0), rtol=0,
                               atol=4 * EPS * np.abs(v).max())


def test_transformer_decodes_as_with_the_xla_form(kernel):
  """Greedy tokens and every step's logits: impl="auto" (this kernel on CPU) vs impl="xla"."""
  fast = TransformerLM(TRANSFORMER_CFG)
  slow = TransformerLM(TRANSFORMER_CFG, impl="xla")
  assert cpu_attention.use_cpu_attention("auto", False, jnp.float32)
  params = fast.init_params(0)
  prompts = jnp.asarray(random_tokens(fast, (3, 5), seed=2))
  a = generate(fast, params, prompts, jax.random.key(0), max_new_tokens=12)
  b = generate(slow, params, prompts, jax.random.key(0), max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  cache_a, cache_b = fast.init_cache(3, 20), slow.init_cache(3, 20)
  la, cache_a = fast.prefill(params, prompts, cache_a, jnp.full((3,), 5, jnp.int32))
  lb, cache_b = slow.prefill(params, prompts, cache_b, jnp.full((3,), 5, jnp.int32))
  toks = jnp.asarray(random_tokens(fast, (3, 3), seed=5))
  la, cache_a = fast.step(params, toks, cache_a)  # three tokens at once: verification's shape
  lb, cache_b = slow.step(params, toks, cache_b)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-5, atol=1e-5)


def test_fp16_cache(kernel):
  """cache_dtype="float16": the cache holds exactly the fp32 cache's keys/values rounded to fp16,
  and decoding through this kernel gives the XLA form's tokens and logits over that cache."""
  cfg16 = dataclasses.replace(TRANSFORMER_CFG, cache_dtype="float16")
  ref = TransformerLM(TRANSFORMER_CFG)
  fast, slow = TransformerLM(cfg16), TransformerLM(cfg16, impl="xla")
  params = ref.init_params(0)
  prompts = jnp.asarray(random_tokens(ref, (3, 5), seed=2))
  n = jnp.full((3,), 5, jnp.int32)
  _, c32 = ref.prefill(params, prompts, ref.init_cache(3, 20), n)
  _, c16 = fast.prefill(params, prompts, fast.init_cache(3, 20), n)
  assert c16["k"].dtype == jnp.float16 and c16["v"].dtype == jnp.float16
  for name in ("k", "v"):
    np.testing.assert_array_equal(np.asarray(c16[name]), np.asarray(c32[name].astype(jnp.float16)))
  a = generate(fast, params, prompts, jax.random.key(0), max_new_tokens=12)
  b = generate(slow, params, prompts, jax.random.key(0), max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  toks = jnp.asarray(random_tokens(ref, (3, 3), seed=5))
  la, _ = fast.step(params, toks, c16)
  _, c16b = slow.prefill(params, prompts, slow.init_cache(3, 20), n)
  lb, _ = slow.step(params, toks, c16b)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-5, atol=1e-5)


def test_cache_dtype_bad_input():
  with pytest.raises(ValueError, match="cache_dtype"):
    dataclasses.replace(TRANSFORMER_CFG, cache_dtype="int8")
  cfg16 = dataclasses.replace(TRANSFORMER_CFG, cache_dtype="float16")
  with pytest.raises(ValueError, match="cache_dtype"):
    TransformerLM(cfg16, kv_policy=KVPolicy(policy="none", storage="int8"))


def test_rule(kernel):
  assert cpu_attention.use_cpu_attention("auto", False, np.float32)
  assert cpu_attention.use_cpu_attention("auto", False, np.float16)
  assert not cpu_attention.use_cpu_attention("xla", False, np.float32)
  assert not cpu_attention.use_cpu_attention("auto", True, np.float32)
  assert not cpu_attention.use_cpu_attention("auto", False, jnp.bfloat16)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])  # conftest: 8 CPU devices
  with jax.set_mesh(mesh):
    assert not cpu_attention.use_cpu_attention("auto", False, np.float32)


def test_bad_input(kernel):
  q = jnp.ones((2, 1, 4, 8))
  k = jnp.ones((3, 2, 2, 10, 8))
  n = jnp.full((2,), 4, jnp.int32)
  with raises_before_tracing(TypeError, "q"):
    cpu_attention.attention_step(q.astype(jnp.bfloat16), k, k, n, 0)
  with raises_before_tracing(TypeError, "q"):
    cpu_attention.attention_step(q.astype(jnp.float16), k, k, n, 0)
  with raises_before_tracing(TypeError, "k_stack"):
    cpu_attention.attention_step(q, k.astype(jnp.bfloat16), k.astype(jnp.bfloat16), n, 0)
  with raises_before_tracing(TypeError, "v_stack"):
    cpu_attention.attention_step(q, k.astype(jnp.float16), k, n, 0)
  with raises_before_tracing(ValueError, "k_stack"):
    cpu_attention.attention_step(q, k[0], k[0], n, 0)
  with raises_before_tracing(ValueError, "v_stack"):
    cpu_attention.attention_step(q, k, k[:, :, :, :5], n, 0)
  with raises_before_tracing(ValueError, "k_stack"):
    cpu_attention.attention_step(q, jnp.ones((3, 2, 2, 10, 4)), jnp.ones((3, 2, 2, 10, 4)), n, 0)
  with raises_before_tracing(ValueError, "heads"):
    cpu_attention.attention_step(jnp.ones((2, 1, 3, 8)), k, k, n, 0)
  with raises_before_tracing(ValueError, "layer"):
    cpu_attention.attention_step(q, k, k, n, 3)
  with raises_before_tracing(ValueError, "lengths"):
    cpu_attention.attention_step(q, k, k, jnp.full((3,), 4, jnp.int32), 0)
  with raises_before_tracing(ValueError, "path"):
    cpu_attention.attention_step(q, k, k, n, 0, path="neon")
