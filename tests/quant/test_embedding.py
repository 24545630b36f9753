"""Low-bit embedding tables (`QEmbedding`): the lookup against the decoded table, the tied head
against the product with the decoded table (XLA path and the CPU kernel), and tied transformer and
Mamba models quantized by `quantize_params(embeddings=...)` running `generate` unchanged."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.models import families
from jaxinf.quant import cpu_kernel
from jaxinf.quant.base import is_quantized
from jaxinf.quant.ptq import QuantConfig, quantize_params
from jaxinf.quant.qarray import QEmbedding, quantize, quantize_embedding
from tests.bad_input import raises_before_tracing

EPS = 2.0**-24


def _kernel_available() -> bool:
  try:
    cpu_kernel.load()
  except cpu_kernel.KernelUnavailableError:
    return False
  return True


KERNELS = [None, pytest.param("cpu_ffi", marks=pytest.mark.skipif(
    not _kernel_available(), reason="the CPU kernel cannot be built here"))]
CASES = [("int8", None), ("int4", None), ("int4", 8), ("fp8_e4m3", None), ("fp4_e2m1", 8)]


@pytest.fixture(scope="module")
def table():
  return jnp.asarray(np.random.default_rng(0).normal(size=(37, 24)), jnp.float32)


# the CPU kernel takes integer formats only: float formats run on the XLA layout alone
LOOKUP_CASES = [(f, g, None) for f, g in CASES] + [
    pytest.param(f, g, "cpu_ffi", marks=KERNELS[1].marks) for f, g in CASES if f.startswith("int")]


@pytest.mark.parametrize("fmt,group,kernel", LOOKUP_CASES)
def test_lookup_is_the_decoded_tables_rows(table, fmt, group, kernel):
  qe = quantize_embedding(table, fmt, group_size=group, kernel=kernel)
  assert isinstance(qe, QEmbedding) and qe.shape == (37, 24) and qe.ndim == 2
  # the table is the transpose's QArray: same codes and scales as quantizing table.T directly
  np.testing.assert_array_equal(np.asarray(qe.dequantize()),
                                np.asarray(quantize(table.T, fmt, group_size=group).dequantize().T))
  assert qe.T is qe.head and qe.nbytes == qe.head.nbytes < table.nbytes
  ids = jnp.asarray([[0, 36, 5, 5], [17, 2, 1, 30]], jnp.int32)
  want = np.asarray(qe.dequantize())[np.asarray(ids)]
  np.testing.assert_array_equal(np.asarray(qe.lookup(ids)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda e, i: e.lookup(i))(qe, ids)), want)
  assert qe.astype(jnp.bfloat16).lookup(ids).dtype == jnp.bfloat16


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 8)])
def test_tied_head_is_the_product_with_the_decoded_table(table, fmt, group, kernel):
  qe = quantize_embedding(table, fmt, group_size=group, kernel=kernel)
  h = np.random.default_rng(1).normal(size=(3, 24)).astype(np.float32)
  wd = np.asarray(qe.dequantize(), np.float64)  # [vocab, dim]
  got = np.asarray(jax.jit(lambda h, e: h @ e.T)(h, qe), np.float64)
  # the same real numbers summed in another order: K fp32 roundings, c ~ 2 (test_cpu_kernel)
  bound = 4 * 24 * EPS * (np.abs(h) @ np.abs(wd).T)
  assert np.all(np.abs(got - h.astype(np.float64) @ wd.T) <= bound + 1e-30)
  # a soft lookup (x @ E) is the product with the decoded table
  p = jax.nn.softmax(jnp.asarray(np.random.default_rng(2).normal(size=(2, 37)), jnp.float32))
  np.testing.assert_allclose(np.asarray(p @ qe), np.asarray(p) @ np.asarray(qe.dequantize()),
                             rtol=1e-6, atol=1e-6)


TABLES = {"transformer": "embed_tokens/embedding", "mamba": "embeddings/embedding"}
GROUPS = {"transformer": 16, "mamba": None}  # Mamba's dt_proj has 2 inputs: one scale per channel


def _tied(family: str):
  cfg = dataclasses.replace(families.named_config(f"{family}-tiny"), tie_embeddings=True)
  return families.build(cfg, seed=1)


@pytest.fixture(scope="module")
def tied():
  return _tied("transformer")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", sorted(TABLES))
def test_tied_model_with_a_quantized_table_runs_generate(family, kernel):
  model, params = _tied(family)
  path = TABLES[family]
  config = QuantConfig(format="int4", group_size=GROUPS[family], kernel=kernel,
                       embedding_format="int8",
                       embeddings=(path,))
  qparams, report = quantize_params(params, config)
  table = qparams[path.split("/")[0]]["embedding"]
  assert isinstance(table, QEmbedding) and table.head.fmt.name == "int8"
  assert {leaf.format for leaf in report.leaves} == {"int4", "int8"}
  assert path in [leaf.path for leaf in report.leaves]
  assert report.bytes_after < report.bytes_before
  model.check_params(qparams)
  dequantized = jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, qparams,
                             is_leaf=is_quantized)
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, model.vocab_size)
  # the two trees hold the same numbers; the products differ in the order of fp32 roundings only
  # ((x @ q) * s against x @ (q * s)), ~1e-7 relative on these tiny models' O(1) logits
  np.testing.assert_allclose(np.asarray(model(qparams, prompt)),
                             np.asarray(model(dequantized, prompt)), rtol=1e-5, atol=1e-5)
  key = jax.random.key(1)
  want = generate(model, dequantized, prompt, key, max_new_tokens=6).tokens
  got = generate(model, qparams, prompt, key, max_new_tokens=6).tokens
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_embedding_group_size(tied):
  """The table's scale groups: `group_size` by default, one per token row with None, or their
  own size; the body keeps `group_size` (an int4 body beside a per-row int8 table, as llama.cpp's
  --token-embedding-type sets the table apart)."""
  _, params = tied
  path = r"embed_tokens/embedding"
  table = params["embed_tokens"]["embedding"]
  dim = table.shape[1]
  base = dict(format="int4", group_size=8, embedding_format="int8", embeddings=(path,))
  for eg, want in (("group_size", 8), (None, dim), (dim // 2, dim // 2)):
    qparams, _ = quantize_params(params, QuantConfig(**base, embedding_group_size=eg))
    head = qparams["embed_tokens"]["embedding"].head
    assert head.group_size == want and head.scale.shape[0] == dim // want
    ref = quantize_embedding(table, "int8", group_size=None if eg is None else want).head
    np.testing.assert_array_equal(np.asarray(head.dequantize()), np.asarray(ref.dequantize()))
    body = [leaf for leaf in jax.tree.leaves(qparams, is_leaf=is_quantized)
            if is_quantized(leaf) and not isinstance(leaf, QEmbedding)]
    assert body and all(leaf.group_size == 8 for leaf in body)


def test_bad_input(tied, table):
  _, params = tied
  with raises_before_tracing(ValueError, "embeddings"):
    quantize_params(params, QuantConfig(embeddings=(r"no/such/table",)))
  with raises_before_tracing(ValueError, "embeddings"):
    QuantConfig(embeddings=(r"embed_tokens/(",))
  with raises_before_tracing(TypeError, "embeddings"):
    QuantConfig(embeddings=r"embed_tokens/embedding")
  dim = params["embed_tokens"]["embedding"].shape[1]
  with raises_before_tracing(ValueError, "group_size"):
    quantize_params(params, QuantConfig(format="int4", group_size=dim + 1,
                                        include=(r"no/kernel",),
                                        embeddings=(r"embed_tokens/embedding",)))
  with raises_before_tracing(ValueError, "embedding_format"):
    QuantConfig(embeddings=(r"embed_tokens/embedding",), embedding_format="int9")
  for name, value in (("embedding_format", "int8"), ("embedding_group_size", None)):
    with raises_before_tracing(ValueError, name):   # nothing to apply it to
      QuantConfig(**{name: value})
  for bad in (0, "rows", 2.0, True):
    with raises_before_tracing(ValueError, "embedding_group_size"):
      QuantConfig(embeddings=(r"embed_tokens/embedding",), embedding_group_size=bad)
  with raises_before_tracing(ValueError, "embedding_group_size"):
    quantize_params(params, QuantConfig(embedding_group_size=dim + 1,
                                        include=(r"no/kernel",),
                                        embeddings=(r"embed_tokens/embedding",)))
  qe = quantize_embedding(table, "int8")
  with raises_before_tracing(TypeError, "ids"):
    qe.lookup(jnp.zeros((2,), jnp.float32))
  with raises_before_tracing(ValueError, "x"):
    jnp.ones((2, 24)) @ qe
  with raises_before_tracing(TypeError, "table"):
    quantize_embedding(jnp.ones((4, 8), jnp.int32), "int8")
