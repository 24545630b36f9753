"""The hand-written CPU kernel (`jaxinf.quant.cpu_kernel`) against the dequantized-fp32 reference
`x @ dequantize(W)`, its scalar twin, the XLA-path W8A8 product, and through `generate`.

Tolerances. Weight-only: kernel and reference compute the same real number sum_k x_k s_g q_k with
K fp32 roundings each in a different order, so |y - y_ref| <= c K 2^-24 sum_k |x_k| |W_k| (c ~ 2);
we allow 4 K 2^-24 of that bound. W8A8 against the fp32 reference: the activation codes
are off by at most s_x / 2 each, so |y - y_ref| <= (s_x / 2) sum_k |W_k| (+ the fp32 term). W8A8
against the XLA W8A8 path: the same integer codes and exact integer group sums; only fp32 rounding
differs, amplified by the unsigned weight offset (128 / 8 times the x codes, subtracted after the
fp32 accumulation): 4 K 2^-24 (|x| (|W| + 128 s)) as bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.quant import cpu_kernel
from jaxinf.quant.ptq import QuantConfig, kernel_params, quantize_params
from jaxinf.quant.qarray import KernelWeight, QEmbedding, kernel_weight, quantize
from tests.bad_input import raises_before_tracing

EPS = 2.0**-24


@pytest.fixture(scope="module")
def kernel():
  try:
    cpu_kernel.load()  # compiles the .so once per source (cached on disk) and registers it
  except cpu_kernel.KernelUnavailableError as e:
    pytest.skip(str(e))
  return jax.jit(lambda x, w: x @ w)


# (format, group size, K); N = 37 throughout (a tail panel of 5 columns). int4: K = 100 pads the
# last octet; groups of 32 and 24 (whole octets) take the vector path, groups of 20 the scalar
# one. int8: K = 98 pads the last quad; groups of 20 and 32 (whole quads) take the vector path,
# groups of 10 the scalar one.
CASES = [("int8", None, 100), ("int8", None, 98), ("int8", 20, 100), ("int8", 32, 96),
         ("int8", 10, 100), ("int4", None, 100), ("int4", 20, 100), ("int4", 32, 96),
         ("int4", 24, 96)]


@pytest.mark.parametrize("fmt,group,k", CASES)
@pytest.mark.parametrize("act", [None, "int8"])
def test_kernel_matches_dequantized_reference(kernel, fmt, group, k, act):
  rng = np.random.default_rng(0)
  n = 37
  w = rng.normal(size=(k, n)).astype(np.float32)
  qk = quantize(jnp.asarray(w), fmt, group_size=group, act_format=act, kernel="cpu_ffi")
  qx = quantize(jnp.asarray(w), fmt, group_size=group, act_format=act)
  wd = np.asarray(qx.dequantize(), np.float64)
  np.testing.assert_array_equal(np.asarray(qk.dequantize()), np.asarray(qx.dequantize()))
  # panels: 16 columns x 4 k (int8) or x 8 k (int4) per 64 bytes, zero-padded
  step = 4 if fmt == "int8" else 8
  assert qk.data.shape == (48, 4 * -(-k // step))
  assert qk.nbytes == qk.data.size + qk.scale.nbytes
  # every row-tile height (8 per pass, tails 1-7); 70 rows: past MAX_ROWS, which bounds only fp32
  # weights (integer codes take the kernel at every row count, `cpu_kernel.use_kernel`)
  best = cpu_kernel.isa(act is not None).removesuffix("-vnni")
  for m in (1, 3, 5, 7, 8, 16, 33, 70):
    x = rng.normal(size=(m, k)).astype(np.float32)
    ys = {"best": np.asarray(kernel(x, qk), np.float64)}
    for path in cpu_kernel.paths(act is not None):  # scalar, and AVX2 / AVX-512 where the CPU has
      if path == best:
        continue  # "best" above ran it
      ys[path] = np.asarray(cpu_kernel.lowbit_matmul(
          jnp.asarray(x), qk.data, qk.scale, k=k, group_size=qk.group_size,
          act_int8=act is not None, path=path), np.float64)
    ref = x.astype(np.float64) @ wd
    bound = np.abs(x) @ np.abs(wd)
    if act is None:
      tol = 4 * k * EPS * bound
    else:
      sx = np.abs(x).max(axis=1, keepdims=True) / 127
      tol = sx / 2 * np.abs(wd).sum(axis=0) + 4 * k * EPS * bound
      xla = np.asarray(kernel(x, qx), np.float64)
      offset = 128 if fmt == "int8" else 8
      tight = 4 * k * EPS * (np.abs(x) @ (np.abs(wd) + offset * np.abs(qx.dequantize()).max()))
      for path, y in ys.items():
        assert np.all(np.abs(y - xla) <= tight), (path, m, np.abs(y - xla).max())
    for path, y in ys.items():
      assert np.all(np.abs(y - ref) <= tol), (path, m, np.abs(y - ref).max())


def test_int8_extreme_codes_on_every_path(kernel):
  """W8A8 at the int8 extremes, where AVX2's vpmaddubsw pairs come closest to saturating s16
  (2 x 128 x 127) and |-128| needs the unsigned reading: codes -128 (possible through the raw
  layout, not from `quantize`) and 127 against x codes of +-127, exact integer sums expected."""
  k, n, m = 64, 32, 3
  codes = np.full((k, n), 127, np.int8)
  codes[:, ::2] = -128
  codes[::3, 1::4] = -127
  data = cpu_kernel.kernel_layout(jnp.asarray(codes), 8)
  scale = jnp.ones((1, n), jnp.float32)
  x = np.full((m, k), 1.0, np.float32)
  x[:, 1::2] = -1.0
  x[1] *= -1.0
  x[2, :5] = 0.0
  x[2, 5] = 2.0  # row 2: s_x = 2 / 127, code 127 at k = 5, the rest +-64 (x / s_x = 63.5, to even)
  for path in cpu_kernel.paths(True):
    y = np.asarray(cpu_kernel.lowbit_matmul(jnp.asarray(x), data, scale, k=k, group_size=k,
                                            act_int8=True, path=path), np.float64)
    sx = np.abs(x).max(axis=1, keepdims=True) / 127
    qx = np.clip(np.round(x / sx), -127, 127)
    ref = (qx @ codes.astype(np.float64)) * sx
    np.testing.assert_allclose(y, ref, rtol=1e-6, err_msg=path)


def test_fp32_weights_match_the_reference(kernel):
  """`KernelWeight`: fp32 weights streamed by the kernel, against x @ W in float64."""
  rng = np.random.default_rng(3)
  k, n = 100, 37
  w = rng.normal(size=(k, n)).astype(np.float32)
  kw = kernel_weight(jnp.asarray(w))
  # panels of 16 columns: 37 -> 48 stored, the padding zeros
  assert kw.shape == (k, n) and kw.data.shape == (48, k) and kw.nbytes == 48 * k * 4
  assert not np.asarray(kw.data).reshape(3, k, 16)[2, :, 5:].any()
  np.testing.assert_array_equal(np.asarray(kw.dequantize()), w)
  ids = np.array([[0, 36], [17, 5]])
  np.testing.assert_array_equal(np.asarray(kw.take_columns(ids)), np.moveaxis(w[:, ids], 0, -1))
  for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 65):  # 65 rows: XLA's dot of the transpose
    x = rng.normal(size=(m, k)).astype(np.float32)
    y = np.asarray(kernel(x, kw), np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    tol = 4 * k * EPS * (np.abs(x) @ np.abs(w))
    assert np.all(np.abs(y - ref) <= tol), (m, np.abs(y - ref).max())
    if m <= cpu_kernel.MAX_ROWS:
      for path in cpu_kernel.paths():
        y = np.asarray(cpu_kernel.lowbit_matmul(
            jnp.asarray(x), kw.data, jnp.ones((1, n), jnp.float32), k=k, group_size=k,
            path=path), np.float64)
        assert np.all(np.abs(y - ref) <= tol), (path, m, np.abs(y - ref).max())


# weights of one kind sharing x: int4 in groups (fp32 and int8 activations), int8 per channel,
# fp32 panels; N = 37, 16 and 70 (tail panels, one whole panel, a block past 64 columns)
MANY = [("int4", 32, None), ("int4", 32, "int8"), ("int8", None, None), ("int8", None, "int8"),
        ("fp32", None, None)]


@pytest.mark.parametrize("fmt,group,act", MANY)
def test_many_equals_one_call_per_weight(kernel, fmt, group, act):
  """`lowbit_matmul_many`: each product bit for bit equal to its own `lowbit_matmul` call (a
  column's sums do not depend on how the columns are cut into blocks), on every path, at the
  row counts of one pass, a pass and a tail, and several passes; `qarray.matmul_many` likewise
  against `x @ w`."""
  from jaxinf.quant.qarray import matmul_many

  rng = np.random.default_rng(5)
  k = 96
  ws = []
  for n in (37, 16, 70):
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    ws.append(kernel_weight(w) if fmt == "fp32" else
              quantize(w, fmt, group_size=group, act_format=act, kernel="cpu_ffi"))
  if fmt == "fp32":
    pairs = [(w.data, jnp.ones((1, w.n_out), jnp.float32)) for w in ws]
    gs = k
  else:
    pairs = [(w.data, w.scale) for w in ws]
    gs = ws[0].group_size
  many = jax.jit(lambda x, pairs, path: cpu_kernel.lowbit_matmul_many(
      x, pairs, k=k, group_size=gs, act_int8=act is not None, path=path), static_argnums=2)
  for m in (1, 9, 17):
    x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
    for path in cpu_kernel.paths(act is not None):
      ys = many(x, pairs, path)
      assert len(ys) == 3
      for (d, s), y in zip(pairs, ys):
        one = cpu_kernel.lowbit_matmul(x, d, s, k=k, group_size=gs, act_int8=act is not None,
                                       path=path)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(one), err_msg=f"{path} m={m}")
    for y, w in zip(matmul_many(x.reshape(m, 1, k), ws), ws):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(kernel(x.reshape(m, 1, k), w)))


def test_project_fuses_only_what_shares_a_call(kernel):
  """`layers.project`: one `lowbit_matmul_many` call for weights of one kind, the same values as
  the separate `Linear` calls; one product each for mixed kinds, float weights or the XLA
  layout."""
  from flax import nnx

  from jaxinf.models import layers

  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 3, 32)).astype(np.float32))

  def linears(*kernels):
    out = []
    for i, w in enumerate(kernels):
      lin = layers.Linear(32, w.shape[1], use_bias=i == 1, rngs=nnx.Rngs(i))
      if lin.bias is not None:
        lin.bias[...] = jnp.asarray(rng.normal(size=(w.shape[1],)), jnp.float32)
      lin.kernel = nnx.Param(w)
      out.append(lin)
    return out

  def calls(fn):
    text = jax.jit(fn).lower().as_text()
    return text.count(f"@{cpu_kernel.MANY_TARGET}("), text.count(f"@{cpu_kernel.TARGET}(")

  w = [jnp.asarray(rng.normal(size=(32, n)).astype(np.float32)) for n in (24, 8, 40)]
  q4 = [quantize(v, "int4", group_size=16, kernel="cpu_ffi") for v in w]
  cases = {"int4": (q4, (1, 0)),
           "fp32 panels": ([kernel_weight(v) for v in w], (1, 0)),
           "mixed": ([q4[0], quantize(w[1], "int8", kernel="cpu_ffi"), q4[2]], (0, 3)),
           "xla layout": ([quantize(v, "int4", group_size=16) for v in w], (0, 0)),
           "float": (w, (0, 0))}
  for name, (kernels, expected) in cases.items():
    lins = linears(*kernels)
    ys = layers.project(x, *lins)
    for y, lin in zip(ys, lins):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(lin(x)), err_msg=name)
    assert calls(lambda: layers.project(x, *lins)) == expected, name


def test_many_bad_input(kernel):
  a = quantize(jnp.ones((32, 8)), "int8", kernel="cpu_ffi")
  b = quantize(jnp.ones((32, 8)), "int4", group_size=32, kernel="cpu_ffi")
  x = jnp.ones((2, 32))
  with raises_before_tracing(ValueError, "weights"):
    cpu_kernel.lowbit_matmul_many(x, [], k=32, group_size=32)
  with raises_before_tracing(ValueError, "weights"):
    cpu_kernel.lowbit_matmul_many(x, [(a.data, a.scale)] * 9, k=32, group_size=32)
  with raises_before_tracing(ValueError, "weights\\[1\\]"):
    cpu_kernel.lowbit_matmul_many(x, [(a.data, a.scale), (a.data,)], k=32, group_size=32)
  with raises_before_tracing(TypeError, "weights\\[1\\]"):
    cpu_kernel.lowbit_matmul_many(x, [(a.data, a.scale), (b.data, b.scale)], k=32, group_size=32)
  with raises_before_tracing(ValueError, "scale\\[1\\]"):
    cpu_kernel.lowbit_matmul_many(x, [(a.data, a.scale), (a.data, jnp.ones((2, 8)))], k=32,
                                  group_size=32)


def test_fp16_scales(kernel):
  """`scale_dtype="float16"` (Q4_0's storage): half the scale bytes; the kernel on every path
  bit for bit as with fp32 scales of the same (fp16) values; the XLA path and the kernel within
  the weight-only bound of the dequantized reference; through `quantize_params` and `generate`
  the kernel's tokens are the XLA path's; scales fp16 cannot hold are refused by name."""
  from jaxinf.decoding.generate import generate
  from jaxinf.models.families import build

  rng = np.random.default_rng(7)
  k, n = 96, 37
  w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
  for fmt, group in (("int4", 32), ("int8", None)):
    q32 = quantize(w, fmt, group_size=group, kernel="cpu_ffi")
    q16 = quantize(w, fmt, group_size=group, kernel="cpu_ffi", scale_dtype="float16")
    xla = quantize(w, fmt, group_size=group, scale_dtype="float16")
    assert q16.scale.dtype == jnp.float16 and xla.scale.dtype == jnp.float16
    assert q32.nbytes - q16.nbytes == q32.scale.size * 2
    np.testing.assert_array_equal(np.asarray(q16.codes()), np.asarray(q32.codes()))
    np.testing.assert_array_equal(np.asarray(q16.scale),
                                  np.asarray(q32.scale).astype(np.float16))
    wd = np.asarray(q16.dequantize(), np.float64)
    np.testing.assert_array_equal(np.asarray(xla.dequantize()), np.asarray(q16.dequantize()))
    for m in (1, 9):
      x = rng.normal(size=(m, k)).astype(np.float32)
      ref = x.astype(np.float64) @ wd
      tol = 4 * k * EPS * (np.abs(x) @ np.abs(wd))
      for y in (kernel(x, q16), kernel(x, xla)):
        assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol)
      for act in (False, True):
        for path in cpu_kernel.paths(act):
          a, b = (cpu_kernel.lowbit_matmul(jnp.asarray(x), q16.data, s, k=k,
                                           group_size=q16.group_size, act_int8=act, path=path)
                  for s in (q16.scale, q16.scale.astype(jnp.float32)))
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{path} {act}")
  model, params = build("transformer-tiny", seed=0)
  prompts = jnp.asarray(rng.integers(0, 64, (2, 5)), jnp.int32)
  cfg = dict(format="int4", group_size=16, scale_dtype="float16")
  qx, _ = quantize_params(params, QuantConfig(**cfg))
  qk, _ = quantize_params(params, QuantConfig(**cfg, kernel="cpu_ffi"))
  key = jax.random.key(0)
  np.testing.assert_array_equal(
      np.asarray(generate(model, qx, prompts, key, max_new_tokens=8).tokens),
      np.asarray(generate(model, qk, prompts, key, max_new_tokens=8).tokens))
  with raises_before_tracing(ValueError, "scale_dtype"):
    quantize(w, "int4", scale_dtype="bfloat16")
  with raises_before_tracing(ValueError, "scale_dtype"):  # 1e6 / 7 > 65504
    quantize(w * 1e6, "int4", group_size=32, scale_dtype="float16")
  with raises_before_tracing(ValueError, "scale_dtype"):  # 1e-9 / 7 rounds to 0 in fp16
    quantize(w * 1e-9, "int4", group_size=32, scale_dtype="float16")
  with raises_before_tracing(ValueError, "scale_dtype"):
    QuantConfig(format="int4", scale_dtype="float64")
  with raises_before_tracing(TypeError, "scale"):
    cpu_kernel.lowbit_matmul(jnp.ones((1, k)), q16.data, q16.scale.astype(jnp.bfloat16), k=k,
                             group_size=q16.group_size)


def test_kernel_params_generate_the_fp32_tokens(kernel):
  import dataclasses

  from jaxinf.decoding.generate import generate
  from jaxinf.models import families

  cfg = dataclasses.replace(families.named_config("transformer-tiny"), tie_embeddings=True)
  model, params = families.build(cfg, seed=0)
  kparams, report = kernel_params(params, embeddings=(r"embed_tokens/embedding",))
  assert report.bytes_after == report.bytes_before
  assert isinstance(kparams["embed_tokens"]["embedding"], QEmbedding)
  assert isinstance(kparams["layers"][0]["mlp"]["down_proj"]["kernel"], KernelWeight)
  prompts = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 5)), jnp.int32)
  np.testing.assert_allclose(np.asarray(model(kparams, prompts)),
                             np.asarray(model(params, prompts)), rtol=1e-5, atol=1e-5)
  key = jax.random.key(0)
  a = generate(model, params, prompts, key, max_new_tokens=8).tokens
  b = generate(model, kparams, prompts, key, max_new_tokens=8).tokens
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with raises_before_tracing(ValueError, "kernel"):
    kernel_params(params, kernel=None)
  with raises_before_tracing(ValueError, "embeddings"):
    kernel_params(params, embeddings=(r"no/such",))
  with raises_before_tracing(ValueError, "act_int8"):
    cpu_kernel.lowbit_matmul(prompts.astype(jnp.float32), jnp.ones((3, 5)), jnp.ones((1, 3)),
                             k=5, group_size=5, act_int8=True)


def test_kernel_in_while_loop_and_vmap(kernel):
  rng = np.random.default_rng(1)
  w = quantize(jnp.asarray(rng.normal(size=(48, 24)).astype(np.float32)), "int4", group_size=16,
               kernel="cpu_ffi")
  x = jnp.asarray(rng.normal(size=(2, 48)).astype(np.float32))

  def body(c):
    i, v = c
    return i + 1, v + (x @ w).sum()

  _, total = jax.jit(lambda: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, 0.0)))()
  np.testing.assert_allclose(float(total), 3 * float((x @ w.dequantize()).sum()), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.vmap(lambda r: r @ w)(x)),
                             np.asarray(x @ w.dequantize()), rtol=1e-5, atol=1e-5)


def test_generate_same_tokens_as_xla_path(kernel):
  from jaxinf.decoding.generate import generate
  from jaxinf.models.families import build

  model, params = build("transformer-tiny", seed=0)
  prompts = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 5)), jnp.int32)
  for cfg in (dict(format="int8"), dict(format="int4", group_size=16),
              dict(format="int8", act_format="int8")):
    qx, _ = quantize_params(params, QuantConfig(**cfg))
    qk, _ = quantize_params(params, QuantConfig(**cfg, kernel="cpu_ffi"))
    key = jax.random.key(0)
    a = generate(model, qx, prompts, key, max_new_tokens=8).tokens
    b = generate(model, qk, prompts, key, max_new_tokens=8).tokens
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input(kernel):
  w = quantize(jnp.ones((32, 8)), "int8", kernel="cpu_ffi")
  x = jnp.ones((2, 32))
  with raises_before_tracing(TypeError, "x"):
    cpu_kernel.lowbit_matmul(jnp.ones((2, 32), jnp.int32), w.data, w.scale, k=32, group_size=32)
  with raises_before_tracing(ValueError, "x"):
    cpu_kernel.lowbit_matmul(jnp.ones((2, 31)), w.data, w.scale, k=32, group_size=32)
  with raises_before_tracing(TypeError, "data"):
    cpu_kernel.lowbit_matmul(x, w.data.astype(jnp.int32), w.scale, k=32, group_size=32)
  with raises_before_tracing(ValueError, "data"):
    cpu_kernel.lowbit_matmul(x, w.data[:, :16], w.scale, k=32, group_size=32)
  with raises_before_tracing(ValueError, "scale"):
    cpu_kernel.lowbit_matmul(x, w.data, jnp.ones((2, 8)), k=32, group_size=32)
  with raises_before_tracing(ValueError, "data"):  # 17 columns take two panels (32 rows)
    cpu_kernel.lowbit_matmul(x, w.data, jnp.ones((1, 17)), k=32, group_size=32)
  with raises_before_tracing(ValueError, "group_size"):  # fp32 weights: one group
    cpu_kernel.lowbit_matmul(x, jnp.ones((16, 32)), jnp.ones((2, 8)), k=32, group_size=16)
  with raises_before_tracing(ValueError, "data"):  # fp32 panels: 8 columns take 16 rows
    cpu_kernel.lowbit_matmul(x, jnp.ones((8, 32)), jnp.ones((1, 8)), k=32, group_size=32)
  with raises_before_tracing(ValueError, "group_size"):
    cpu_kernel.lowbit_matmul(x, w.data, w.scale, k=32, group_size=5)
  with raises_before_tracing(ValueError, "path"):
    cpu_kernel.lowbit_matmul(x, w.data, w.scale, k=32, group_size=32, path="sse2")
  missing = [p for p in cpu_kernel.PATHS if p not in cpu_kernel.paths()]
  if missing:  # a path this CPU lacks is refused by name, not run
    with raises_before_tracing(ValueError, "path"):
      cpu_kernel.lowbit_matmul(x, w.data, w.scale, k=32, group_size=32, path=missing[0])
  with raises_before_tracing(ValueError, "kernel"):
    quantize(jnp.ones((32, 8)), "int8", kernel="gpu")
  with raises_before_tracing(TypeError, "kernel"):
    quantize(jnp.ones((32, 8)), "fp8_e4m3", kernel="cpu_ffi")
  with raises_before_tracing(ValueError, "kernel"):
    QuantConfig(format="int8", act_format="fp8_e4m3", kernel="cpu_ffi")


def test_non_cpu_backend_refused(kernel, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with raises_before_tracing(ValueError, "kernel"):
    quantize(jnp.ones((32, 8)), "int8", kernel="cpu_ffi")


def test_missing_compiler_is_named(monkeypatch):
  monkeypatch.setenv("CXX", "")
  monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
  with pytest.raises(cpu_kernel.KernelUnavailableError, match="C\\+\\+ compiler"):
    cpu_kernel.compiler()
