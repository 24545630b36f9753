"""SqueezeLLM: codebooks against brute force, Lloyd's monotonicity, the dense-and-sparse weight
against its definition, the Fisher diagonal against a closed form, named errors.

Independent sources: the optimal 1-D weighted clustering by enumerating every contiguous
partition of <= 8 sorted points (optimal 1-D clusters are contiguous); the outliers as numpy's
argsort of |W|; the Fisher diagonal of least squares, g = x^T (x W - y), in float64 numpy; the
uniform 3-bit round-to-nearest per channel (an 8-level grid is one feasible codebook, so the
optimal codebook's objective can be no larger).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.quant import squeeze as sq
from jaxinf.quant.base import is_quantized
from tests.bad_input import raises_before_tracing

_kmeans = jax.jit(jax.vmap(sq.optimal_kmeans, in_axes=(0, 0, None)), static_argnums=2)
_lloyd = jax.jit(jax.vmap(sq.weighted_kmeans, in_axes=(0, 0, None, None)), static_argnums=(2, 3))


def brute_force(values: np.ndarray, weights: np.ndarray, clusters: int) -> float:
  """The least sum F (w - c(w))^2 over all partitions of the sorted points into <= C runs."""
  order = np.argsort(values)
  v, f = values[order].astype(np.float64), weights[order].astype(np.float64)
  best = np.inf
  for count in range(1, min(clusters, len(v)) + 1):
    for cuts in itertools.combinations(range(1, len(v)), count - 1):
      bounds = [0, *cuts, len(v)]
      total = 0.0
      for a, b in itertools.pairwise(bounds):
        mean = (f[a:b] * v[a:b]).sum() / f[a:b].sum()
        total += (f[a:b] * (v[a:b] - mean) ** 2).sum()
      best = min(best, total)
  return best


def objective(values, weights, centroids) -> np.ndarray:
  return np.asarray(sq.kmeans_objective(jnp.asarray(values), jnp.asarray(weights),
                                        jnp.asarray(centroids)), np.float64)


@pytest.fixture(scope="module")
def small_cases():
  rng = np.random.default_rng(0)
  cases = []
  for clusters in (2, 3, 4):
    values = rng.normal(size=(40, 8)).astype(np.float32)
    values[:10, :3] = values[:10, :1]  # repeated values
    weights = rng.exponential(size=(40, 8)).astype(np.float32)
    optimum = np.array([brute_force(v, f, clusters) for v, f in zip(values, weights)])
    cases.append((clusters, values, weights, optimum))
  return cases


def test_exact_codebook_equals_brute_force(small_cases):
  for clusters, values, weights, optimum in small_cases:
    ours = objective(values, weights, _kmeans(jnp.asarray(values), jnp.asarray(weights), clusters))
    # fp32 arithmetic against float64 enumeration: equal to 1e-5 relative.
    np.testing.assert_allclose(ours, optimum, rtol=1e-5, atol=1e-7, err_msg=f"C={clusters}")


def test_lloyd_never_increases_the_objective_and_is_never_below_the_optimum(small_cases):
  step = jax.jit(jax.vmap(sq.lloyd_step))
  for clusters, values, weights, optimum in small_cases:
    v, f = jnp.asarray(values), jnp.asarray(weights)
    centroids = jax.vmap(sq.quantile_init, in_axes=(0, 0, None))(v, f, clusters)
    previous = objective(values, weights, centroids)
    for _ in range(12):
      centroids = step(v, f, centroids)
      current = objective(values, weights, centroids)
      assert np.all(current <= previous * (1 + 1e-6) + 1e-7), (current - previous).max()
      previous = current
    assert np.all(previous >= optimum * (1 - 1e-5))
    lloyd = objective(values, weights, _lloyd(v, f, clusters, 30))
    assert np.all(lloyd >= optimum * (1 - 1e-5))


@pytest.fixture(scope="module")
def matrix():
  """A [40, 12] weight with planted large entries, and a positive Fisher diagonal."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(40, 12)).astype(np.float32) * 0.1
  w[3, 4], w[17, 0], w[39, 11] = 2.0, -3.0, 1.5
  fisher = rng.exponential(size=w.shape).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(fisher)


@pytest.fixture(scope="module", params=[3, 4])
def squeezed(request, matrix):
  w, fisher = matrix
  return request.param, sq.squeeze_weight(w, fisher, bits=request.param, outlier_fraction=0.02)


def test_dense_and_sparse_reconstruction(squeezed, matrix):
  bits, q = squeezed
  w = np.asarray(matrix[0])
  nnz = int(np.ceil(0.02 * w.size))
  assert is_quantized(q) and q.shape == w.shape and q.dtype == jnp.float32
  top = np.argsort(-np.abs(w).ravel(), kind="stable")[:nnz]
  assert set(zip(*np.unravel_index(top, w.shape))) == set(
      zip(np.asarray(q.rows).tolist(), np.asarray(q.cols).tolist()))
  deq = np.asarray(q.dequantize())
  rows, cols = np.unravel_index(top, w.shape)
  np.testing.assert_array_equal(deq[rows, cols], w[rows, cols])  # exact at the outliers
  # Elsewhere each entry is its channel's nearest table entry.
  lut = np.asarray(q.lut, np.float32)
  dense = np.ones(w.shape, bool)
  dense[rows, cols] = False
  nearest = lut[np.arange(w.shape[1])[None, :],
                np.abs(w[:, :, None] - lut[None, :, :]).argmin(-1)]
  np.testing.assert_array_equal(deq[dense], nearest[dense])
  # Storage: b bits per index (K padded to the group), the fp16 table, int16 indices + fp32.
  groups = {3: 8, 4: 2}[bits]
  expected = (bits * -(-40 // groups) * groups * 12 // 8 + 12 * (1 << bits) * 2 + nnz * (2 + 2 + 4))
  assert q.nbytes == expected


def test_squeeze_weight_codebooks_equal_brute_force(matrix):
  # 2 bits, no outliers, an fp32 table, 6 values per channel: the objective of every channel's
  # stored codebook and indices is the brute-force optimum over its values.
  w, fisher = matrix
  w, fisher = w[:6], fisher[:6]
  q = sq.squeeze_weight(w, fisher, bits=2, outlier_fraction=0.0, lut_dtype=jnp.float32)
  deq = np.asarray(q.dequantize(), np.float64)
  ours = (np.asarray(fisher) * (np.asarray(w) - deq) ** 2).sum(0)
  optimum = [brute_force(np.asarray(w[:, n]), np.asarray(fisher[:, n]), 4) for n in range(12)]
  np.testing.assert_allclose(ours, optimum, rtol=1e-5, atol=1e-8)


def test_matmul_equals_dequantized_product_under_jit(squeezed):
  bits, q = squeezed
  x = jax.random.normal(jax.random.key(bits), (2, 3, 40))
  out = jax.jit(lambda x, w: x @ w)(x, q)
  expected = jnp.einsum("btk,kn->btn", x, q.dequantize(), precision=jax.lax.Precision.HIGHEST)
  assert out.shape == (2, 3, 12) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
  interpreted = q.with_impl("pallas_gpu", interpret=True)
  np.testing.assert_allclose(np.asarray(x @ interpreted), np.asarray(expected), rtol=1e-5,
                             atol=1e-5)
  half = q.astype(jnp.bfloat16)
  assert half.dtype == jnp.bfloat16 and (x @ half).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(x @ half, np.float32), np.asarray(expected),
                             rtol=2e-2, atol=2e-2 * float(jnp.abs(expected).max()))
  assert q[...] is q and jax.tree.leaves(q)[0].dtype == jnp.uint8


def test_squeezellm_3bit_beats_uniform_3bit_on_the_weighted_objective(matrix):
  w, fisher = (np.asarray(a) for a in matrix)
  q = sq.squeeze_weight(jnp.asarray(w), jnp.asarray(fisher), bits=3, outlier_fraction=0.0,
                        lut_dtype=jnp.float32)
  low, high = w.min(0), w.max(0)
  scale = (high - low) / 7
  uniform = np.round((w - low) / scale) * scale + low  # 8 levels per channel, min to max
  ours = (fisher * (w - np.asarray(q.dequantize())) ** 2).sum(0)
  rtn = (fisher * (w - uniform) ** 2).sum(0)
  assert np.all(ours <= rtn * (1 + 1e-5))


def test_fisher_diagonal_of_least_squares_is_the_closed_form():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 3, 4)).astype(np.float32)  # 5 calibration batches of 3 rows
  y = rng.normal(size=(5, 3, 2)).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "b": jnp.zeros((2,))}
  loss = lambda p, batch: 0.5 * jnp.sum(jnp.square(batch[0] @ p["w"] + p["b"] - batch[1]))
  fisher = sq.fisher_diagonal(loss, params, (jnp.asarray(x), jnp.asarray(y)))
  w = np.asarray(params["w"], np.float64)
  residual = x.astype(np.float64) @ w - y  # dL/dW = X^T (X W - Y), dL/db = sum of residuals
  grads_w = np.einsum("bik,bin->bkn", x.astype(np.float64), residual)
  np.testing.assert_allclose(np.asarray(fisher["w"]), (grads_w**2).mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fisher["b"]), (residual.sum(1) ** 2).mean(0), rtol=1e-5)


def test_squeeze_params_selects_matrices_and_reports_bytes():
  rng = np.random.default_rng(3)
  params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
            "layers": [{"proj": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)},
                        "norm": {"weight": jnp.ones((8,))}}]}
  fisher = jax.tree.map(jnp.ones_like, params)
  tree, report = sq.squeeze_params(params, fisher, bits=4)
  assert tree["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
  assert tree["layers"][0]["norm"]["weight"] is params["layers"][0]["norm"]["weight"]
  q = tree["layers"][0]["proj"]["kernel"]
  assert is_quantized(q) and q.bits == 4
  assert list(report["leaves"]) == ["layers/0/proj/kernel"]
  assert report["quantized_bytes"] == q.nbytes and report["quantized_fp32_bytes"] == 8 * 16 * 4
  assert report["bytes_before"] - report["bytes_after"] == 8 * 16 * 4 - q.nbytes


def _bad_params():
  return {"a": {"kernel": jnp.ones((8, 4))}, "n": jnp.ones((4,))}


@pytest.mark.parametrize(
    "kwargs, fisher, error, names",
    [
        ({"bits": 5}, None, ValueError, "bits"),
        ({"bits": 3.0}, None, ValueError, "bits"),
        ({"outlier_fraction": 0.5}, None, ValueError, "outlier_fraction"),
        ({"outlier_fraction": -0.01}, None, ValueError, "outlier_fraction"),
        ({"outlier_fraction": "1%"}, None, TypeError, "outlier_fraction"),
        ({"method": "sklearn"}, None, ValueError, "method"),
        ({"lut_dtype": jnp.int8}, None, TypeError, "lut_dtype"),
        ({"include": "nothing_here"}, None, ValueError, "include"),
        ({"exclude": 3}, None, TypeError, "exclude"),
        ({}, {"a": {"kernel": jnp.ones((8, 4))}}, ValueError, "fisher"),  # missing a leaf
        ({}, {"a": {"kernel": jnp.ones((4, 8))}, "n": jnp.ones((4,))}, ValueError, "fisher"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, fisher, error, names):
  params = _bad_params()
  fisher = jax.tree.map(jnp.ones_like, params) if fisher is None else fisher
  with raises_before_tracing(error, names):
    sq.squeeze_params(params, fisher, **kwargs)


def test_bad_fisher_inputs_raise_before_tracing():
  loss = lambda p, batch: jnp.sum(p["w"] * batch)
  with raises_before_tracing(TypeError, "loss_fn"):
    sq.fisher_diagonal("loss", {"w": jnp.ones(2)}, jnp.ones((3, 2)))
  with raises_before_tracing(ValueError, "batches"):
    sq.fisher_diagonal(loss, {"w": jnp.ones(2)}, (jnp.ones((3, 2)), jnp.ones((4, 2))))
  with raises_before_tracing(ValueError, "batches"):
    sq.fisher_diagonal(loss, {"w": jnp.ones(2)}, {})
