"""SqueezeLLM (Kim et al. 2023, "SqueezeLLM: Dense-and-Sparse Quantization") for jaxinf's LMs.

Three pieces, as in the paper:

1. Sensitivity (Sec. 4.1): the Fisher diagonal F = E[g^2], g = dL/dW the gradient of the loss
   over a calibration set (`fisher_diagonal`). Minimising the second-order loss change
   (W - Q(W))^T H (W - Q(W)) with H ~ diag(F) turns quantization into
   weighted k-means: min_Q sum_i F_i (w_i - Q(w_i))^2.
2. Sensitivity-based non-uniform quantization (Sec. 4.1): per output channel (a column of the
   `[in, out]` weight), 2^b centroids minimising the 1-D weighted k-means objective. The paper
   runs k-means (Lloyd); in 1-D the global optimum is computable (`optimal_kmeans`: optimal
   clusters are contiguous in sorted order, a dynamic program over split points, O(2^b K^2)
   per channel), and it is the default up to K = `EXACT_MAX_IN`. Lloyd (`weighted_kmeans`:
   deterministic weighted-quantile start, then steps that never increase the objective) stays
   as `method="lloyd"` for larger K: on small cases it stops in local optima far from the best
   (the tests measure both against brute force). Both are jitted and mapped over channels.
3. Dense-and-sparse decomposition (Sec. 4.2): the `outlier_fraction` largest-magnitude values of
   each matrix are kept exactly in fp32 as a sparse COO part (a fixed count per matrix: fixed
   shapes, jit-friendly); they are removed from the clustering (weight 0), so the centroids fit
   the dense bulk; `dequantize` writes them back and the matmul adds their correction.

Storage (`SqueezeWeight`, a `jaxinf.quant.base.QuantizedWeight`): the b-bit indices packed as
`pallas_kernels.lut_matmul` lays them out (b = 4: 2 per byte; b = 3: 8 in 3 bytes, true 3-bit;
b = 2: 4 per byte), the table `lut [out, 2^b]` (fp16 by default, as the paper), and the outliers
(rows, cols as int16 when the dimension allows, else int32; values fp32).

Matmul (`x @ w`): y = x @ D + sum_e x[:, r_e] (v_e - D[r_e, c_e]) e_{c_e}^T, D the table's
dense weight, (r_e, c_e, v_e) the outliers: the dense part through `pallas_kernels.lut_matmul`
(`impl` "xla": unpack, gather, one dot; "pallas": the fused LUT-dequant tiled kernel), the sparse
part as a scatter-add of nnz products (XLA; the paper also runs it as a separate sparse kernel).

Written by hand: qwix (Google's JAX quantization library) has uniform int/fp formats, not
sensitivity-weighted non-uniform codebooks or a dense-and-sparse split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinf.quant.base import QuantizedWeight, check_patterns
from pallas_kernels import dispatch
from pallas_kernels import lut_matmul as lut_ops

_HIGHEST = lax.Precision.HIGHEST
METHODS = ("auto", "exact", "lloyd")
EXACT_MAX_IN = 2048  # "auto" clusters exactly up to this many inputs (a [K + 1]^2 table each)
LUT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# --------------------------------------------------------------------------- the stored weight


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "lut", "rows", "cols", "values"],
    meta_fields=["in_features", "out_features", "bits", "compute_dtype", "impl", "interpret"])
@dataclasses.dataclass(frozen=True)
class SqueezeWeight(QuantizedWeight):
  """A SqueezeLLM `[in, out]` weight: packed b-bit centroid indices, per-channel tables, sparse
  fp32 outliers. W = D + S with D[k, n] = lut[n, idx[k, n]] except at the outliers, where W
  holds `values` exactly.

  Fields: `codes` uint8 `[bytes, ceil(in / P), out]` (`pallas_kernels.lut_matmul`'s layout),
  `lut` `[out, 2^bits]`, `rows`, `cols` `[nnz]` ints, `values` `[nnz]` fp32; static:
  `in_features`, `out_features`, `bits`, `compute_dtype` (a dtype name), `impl` (the dense
  product's form: "xla", "reference", "pallas", ...) and `interpret`.
  """
  codes: jax.Array
  lut: jax.Array
  rows: jax.Array
  cols: jax.Array
  values: jax.Array
  in_features: int
  out_features: int
  bits: int
  compute_dtype: str = "float32"
  impl: str = "xla"
  interpret: bool = False

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.out_features)

  @property
  def dtype(self) -> np.dtype:
    return jnp.dtype(self.compute_dtype)

  def astype(self, dtype: Any) -> SqueezeWeight:
    return dataclasses.replace(self, compute_dtype=jnp.dtype(dtype).name)

  def with_impl(self, impl: str, interpret: bool = False) -> SqueezeWeight:
    """The same weight with its dense product computed by `impl` (`lut_matmul`'s choices)."""
    dispatch.resolve_impl(impl, interpret, tpu_form=True)
    return dataclasses.replace(self, impl=impl, interpret=interpret)

  def dequantize(self) -> jax.Array:
    dense = lut_ops.dequantize(self.codes, self.lut, self.bits, self.in_features)
    dense = dense.at[self.rows.astype(jnp.int32), self.cols.astype(jnp.int32)].set(self.values)
    return dense.astype(self.dtype)

  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.in_features:
      raise ValueError(f"x @ w: x must end in in_features={self.in_features}, got shape "
                       f"{tuple(x.shape)}")
    x = x.astype(self.dtype)
    blocks = lut_ops.fit_blocks(self.in_features, self.out_features, self.bits)
    y = lut_ops.lut_matmul(x, self.codes, self.lut, bits=self.bits, in_features=self.in_features,
                           impl=self.impl, interpret=self.interpret, blocks=blocks)
    if self.values.shape[0] == 0:
      return y
    rows, cols = self.rows.astype(jnp.int32), self.cols.astype(jnp.int32)
    # The sparse part: each outlier replaces the table's value there, so it adds v - D[r, c].
    delta = self.values - lut_ops.lookup(self.codes, self.lut, rows, cols, self.bits)
    x2 = x.reshape(-1, self.in_features).astype(jnp.float32)
    sparse = jnp.zeros((x2.shape[0], self.out_features), jnp.float32).at[:, cols].add(
        x2[:, rows] * delta)
    return (y.astype(jnp.float32) + sparse.reshape(y.shape)).astype(self.dtype)


# --------------------------------------------------------------------------- Fisher diagonal


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Any) -> Any:
  """The empirical Fisher diagonal F = (1/n) sum_i (dL(params, batch_i)/dparams)^2 (fp32).

  SqueezeLLM's sensitivity (Sec. 4.1): F_ii approximates the Hessian diagonal of the loss at
  the trained weights. The average runs over the leading axis of `batches` (one `lax.scan`, one
  gradient per entry): for the paper's per-sample Fisher, make each entry one sequence (a batch
  gradient is the mean of per-sample gradients, and the square of a mean is not the mean of
  the squares).

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, differentiable in `params`.
    params: the parameter tree (floating leaves).
    batches: a pytree whose leaves share a leading axis n >= 1 (entry i is `batch_i`).
  Returns:
    A tree shaped like `params`, fp32 leaves.
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
  leaves = jax.tree.leaves(batches)
  if not leaves or any(not hasattr(leaf, "shape") or leaf.ndim < 1 for leaf in leaves):
    raise ValueError("batches must be a pytree of arrays with a leading calibration axis, got "
                     f"{type(batches).__name__}")
  sizes = {leaf.shape[0] for leaf in leaves}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(f"batches' leaves must share one leading size n >= 1, got sizes {sorted(sizes)}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"params{jax.tree_util.keystr(path)} must be floating to differentiate, "
                      f"got {jnp.result_type(leaf)}")
  return _fisher(loss_fn, params, batches)


@functools.partial(jax.jit, static_argnums=0)
def _fisher(loss_fn, params, batches):
  grad = jax.grad(loss_fn)

  def accumulate(total, batch):
    g = grad(params, batch)
    return jax.tree.map(lambda t, gi: t + jnp.square(gi.astype(jnp.float32)), total, g), None

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  total, _ = lax.scan(accumulate, zeros, batches)
  n = jax.tree.leaves(batches)[0].shape[0]
  return jax.tree.map(lambda t: t / n, total)


# --------------------------------------------------------------------------- weighted k-means


def kmeans_objective(values: jax.Array, weights: jax.Array, centroids: jax.Array) -> jax.Array:
  """sum_i F_i (w_i - c(w_i))^2 with c(w) the nearest centroid (the best assignment for fixed
  centroids). values, weights `[..., K]`, centroids `[..., C]` -> `[...]` fp32."""
  d2 = jnp.square(values[..., :, None] - centroids[..., None, :]).min(-1)
  return jnp.sum(weights * d2, axis=-1)


def _assign(values, centroids):
  return jnp.argmin(jnp.abs(values[:, None] - centroids[None, :]), axis=1)


def lloyd_step(values: jax.Array, weights: jax.Array, centroids: jax.Array) -> jax.Array:
  """One Lloyd iteration of 1-D weighted k-means: assign each value to its nearest centroid,
  move each centroid to the F-weighted mean of its values; a cluster with no weight is moved
  onto the worst-served value. None of the three increases sum_i F_i (w_i - c(w_i))^2. values, weights `[K]`, centroids `[C]`."""
  onehot = jax.nn.one_hot(_assign(values, centroids), centroids.shape[0], dtype=jnp.float32)
  mass = jnp.dot(weights, onehot, precision=_HIGHEST)
  sums = jnp.dot(weights * values, onehot, precision=_HIGHEST)
  centroids = jnp.where(mass > 0, sums / jnp.where(mass > 0, mass, 1.0), centroids)
  # An empty cluster (or a duplicate centroid) serves nothing: move the first one onto the value
  # of largest weighted error F_i (w_i - c(w_i))^2. A new option for the nearest assignment can
  # only lower the objective, and it recovers the clusters a bad start loses.
  error = weights * jnp.square(values[:, None] - centroids[None, :]).min(axis=1)
  first_empty = jnp.argmin(mass > 0)
  return jnp.where((jnp.arange(centroids.shape[0]) == first_empty) & ~jnp.all(mass > 0),
                   values[jnp.argmax(error)], centroids)


def quantile_init(values: jax.Array, weights: jax.Array, n_clusters: int) -> jax.Array:
  """Deterministic start: the F-weighted quantiles at levels (j + 1/2) / C of the values, so each
  initial centroid covers an equal share of the total sensitivity."""
  order = jnp.argsort(values)
  sorted_values, cum = values[order], jnp.cumsum(weights[order])
  levels = (jnp.arange(n_clusters, dtype=jnp.float32) + 0.5) / n_clusters * cum[-1]
  pos = jnp.clip(jnp.searchsorted(cum, levels), 0, values.shape[0] - 1)
  return sorted_values[pos]


def weighted_kmeans(values: jax.Array, weights: jax.Array, n_clusters: int,
                    iters: int = 30) -> jax.Array:
  """1-D weighted k-means of `values [K]` with `weights [K]` (>= 0, not all 0): the centroids
  `[n_clusters]` after `iters` Lloyd steps from `quantile_init`. Values of weight 0 do not
  pull the centroids."""
  centroids = quantile_init(values, weights, n_clusters)
  return lax.fori_loop(0, iters, lambda _, c: lloyd_step(values, weights, c), centroids)


def optimal_kmeans(values: jax.Array, weights: jax.Array, n_clusters: int) -> jax.Array:
  """The exact 1-D weighted k-means centroids `[n_clusters]` by dynamic programming.

  In 1-D an optimal clustering is contiguous in sorted order (swapping two values between
  clusters that interleave never raises the cost), so with the values sorted and
  cost(i, j) = sum_{i <= t < j} F_t (w_t - mean_F[i, j))^2 (from prefix sums of F, F w, F w^2),
  D_c(j) = min_{i <= j} D_{c-1}(i) + cost(i, j),  D_1(j) = cost(0, j),
  is the least objective of the first j values in c clusters (i = j: an empty cluster), and the
  argmins trace the optimal segments back from D_C(K) (Wang & Song 2011, Ckmeans.1d.dp;
  O(C K^2) per channel). The values are centred on their weighted mean first, so the prefix-sum
  differences cancel far less in fp32. Extra centroids (empty or weightless segments) sit on
  data values, where they can only lower the nearest-centroid objective.
  """
  size = values.shape[0]
  order = jnp.argsort(values)
  v, f = values[order], weights[order]
  total = jnp.sum(f)
  mean = jnp.sum(f * v) / jnp.where(total > 0, total, 1.0)
  centred = v - mean
  zero = jnp.zeros((1,), jnp.float32)
  p0, p1, p2 = (jnp.concatenate([zero, jnp.cumsum(a)]) for a in (f, f * centred, f * centred**2))
  mass = p0[None, :] - p0[:, None]  # [i, j]: the weight of segment [i, j)
  first = p1[None, :] - p1[:, None]
  upper = jnp.arange(size + 1)[:, None] <= jnp.arange(size + 1)[None, :]
  cost = jnp.maximum(p2[None, :] - p2[:, None]
                     - jnp.where(mass > 0, first**2 / jnp.where(mass > 0, mass, 1.0), 0.0), 0.0)
  cost = jnp.where(upper, cost, jnp.inf)

  def extend(best, _):
    total_cost = best[:, None] + cost  # [i, j]
    return total_cost.min(axis=0), total_cost.argmin(axis=0)

  _, starts = lax.scan(extend, cost[0], None, length=n_clusters - 1)  # [C - 1, K + 1]

  def trace(carry, start_of):
    end = carry
    begin = start_of[end]
    return begin, (begin, end)

  begin0, (begins, ends) = lax.scan(trace, jnp.int32(size), starts, reverse=True)
  begins = jnp.concatenate([jnp.zeros((1,), jnp.int32), begins.astype(jnp.int32)])
  ends = jnp.concatenate([begin0[None].astype(jnp.int32), ends.astype(jnp.int32)])
  seg_mass = p0[ends] - p0[begins]
  seg_mean = (p1[ends] - p1[begins]) / jnp.where(seg_mass > 0, seg_mass, 1.0) + mean
  return jnp.where(seg_mass > 0, seg_mean, v[jnp.clip(begins, 0, size - 1)])


# --------------------------------------------------------------------------- one matrix


@functools.partial(jax.jit,
                   static_argnames=("bits", "n_outliers", "iters", "lut_dtype", "method"))
def _squeeze_matrix(w, f, *, bits: int, n_outliers: int, iters: int, lut_dtype: str,
                    method: str):
  out_features = w.shape[1]
  w = w.astype(jnp.float32)
  f = jnp.maximum(f.astype(jnp.float32), 0.0)
  if n_outliers:
    _, flat = lax.top_k(jnp.abs(w).ravel(), n_outliers)
    rows, cols = flat // out_features, flat % out_features
    dense_mask = jnp.ones(w.shape, bool).at[rows, cols].set(False)
  else:
    rows = cols = jnp.zeros((0,), jnp.int32)
    dense_mask = jnp.ones(w.shape, bool)
  # Per channel: weights scaled to max 1 (k-means is scale-invariant; tiny Fisher values would
  # otherwise underflow in F * w); a channel with no sensitivity left is clustered unweighted.
  weights = jnp.where(dense_mask, f, 0.0)
  peak = weights.max(axis=0, keepdims=True)
  weights = jnp.where(peak > 0, weights / jnp.where(peak > 0, peak, 1.0), dense_mask.astype(
      jnp.float32))
  if method == "exact":
    # Channel by channel in small batches: the DP holds a [K + 1, K + 1] cost table each.
    centroids = lax.map(lambda vf: optimal_kmeans(vf[0], vf[1], 1 << bits),
                        (w.T, weights.T), batch_size=8)
  else:
    centroids = jax.vmap(weighted_kmeans, in_axes=(1, 1, None, None))(w, weights, 1 << bits,
                                                                      iters)
  lut = centroids.astype(lut_dtype)  # [out, C]
  # Assign against the stored (rounded) table: the best indices for what is stored.
  idx = jax.vmap(_assign, in_axes=(1, 0), out_axes=1)(w, lut.astype(jnp.float32))
  codes = lut_ops.pack_indices(idx, bits)
  return codes, lut, rows, cols, w[rows, cols]


def _index_dtype(size: int):
  return jnp.int16 if size <= np.iinfo(np.int16).max + 1 else jnp.int32


def squeeze_weight(w: jax.Array, fisher: jax.Array, *, bits: int = 3,
                   outlier_fraction: float = 0.005, method: str = "auto", iters: int = 30,
                   lut_dtype: Any = jnp.float16, impl: str = "xla",
                   interpret: bool = False) -> SqueezeWeight:
  """One `[in, out]` matrix to a `SqueezeWeight` (see `squeeze_params` for the arguments)."""
  _check_options(bits, outlier_fraction, method, iters, lut_dtype, impl, interpret)
  dispatch.check_array("w", w, 2)
  dispatch.check_array("fisher", fisher, 2)
  dispatch.check_shape("fisher", fisher, w.shape)
  return _squeeze_leaf(w, fisher, bits, outlier_fraction, method, iters, lut_dtype, impl,
                       interpret)


def _squeeze_leaf(w, fisher, bits, outlier_fraction, method, iters, lut_dtype, impl, interpret):
  in_features, out_features = w.shape
  if method == "auto":
    method = "exact" if in_features <= EXACT_MAX_IN else "lloyd"
  n_outliers = math.ceil(outlier_fraction * w.size) if outlier_fraction > 0 else 0
  codes, lut, rows, cols, values = _squeeze_matrix(
      w, fisher, bits=bits, n_outliers=n_outliers, iters=iters,
      lut_dtype=jnp.dtype(lut_dtype).name, method=method)
  return SqueezeWeight(
      codes=codes, lut=lut, rows=rows.astype(_index_dtype(in_features)),
      cols=cols.astype(_index_dtype(out_features)), values=values,
      in_features=in_features, out_features=out_features, bits=bits,
      compute_dtype=jnp.dtype(w.dtype).name, impl=impl, interpret=interpret)


def _check_options(bits, outlier_fraction, method, iters, lut_dtype, impl, interpret) -> None:
  lut_ops.check_bits(bits)
  if isinstance(outlier_fraction, bool) or not isinstance(outlier_fraction, (int, float)):
    raise TypeError(f"outlier_fraction must be a float in [0, 0.5), got {outlier_fraction!r}")
  if not 0.0 <= outlier_fraction < 0.5:
    raise ValueError(f"outlier_fraction must lie in [0, 0.5), got {outlier_fraction!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
    raise ValueError(f"iters must be a non-negative int, got {iters!r}")
  try:
    lut_dt = jnp.dtype(lut_dtype)
  except TypeError:
    lut_dt = None
  if lut_dt not in LUT_DTYPES:
    raise TypeError(f"lut_dtype must be one of {[d.name for d in LUT_DTYPES]}, got {lut_dtype!r}")
  dispatch.resolve_impl(impl, interpret, tpu_form=True)


# --------------------------------------------------------------------------- a parameter tree


def path_name(path) -> str:
  """A tree path as "layers/0/mlp/down_proj/kernel" (what include/exclude patterns search)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def squeeze_params(params: Any, fisher: Any, *, bits: int = 3, outlier_fraction: float = 0.005,
                   include: str | Sequence[str] | None = None,
                   exclude: str | Sequence[str] | None = ("embed",), method: str = "auto",
                   iters: int = 30,
                   lut_dtype: Any = jnp.float16, impl: str = "xla",
                   interpret: bool = False) -> tuple[Any, dict]:
  """SqueezeLLM on a parameter tree: every selected matrix becomes a `SqueezeWeight`.

  Selected: 2-D floating leaves (the `[in, out]` matmul weights) whose path ("layers/0/mlp/
  up_proj/kernel") matches one of `include` (regexes; None: all) and none of `exclude` (default:
  embeddings stay fp; norms and biases are 1-D and stay fp anyway).

  Args:
    params: the fp parameter tree.  fisher: `fisher_diagonal`'s tree, the same structure and
      shapes (only the selected leaves are read).
    bits: 2, 3 or 4 bits per index (2^bits centroids per output channel).
    outlier_fraction: the share of each matrix kept sparse in fp32, in [0, 0.5); the count is
      ceil(fraction * size), the largest magnitudes.
    method: "exact" (the optimal 1-D weighted clustering per channel by dynamic programming,
      O(2^bits K^2) per channel), "lloyd" (weighted-quantile start + `iters` Lloyd steps, the
      paper's k-means; a local optimum) or "auto" (exact for K <= `EXACT_MAX_IN`).
    iters: Lloyd iterations.  lut_dtype: the tables' dtype (fp16 default).
    impl, interpret: the dense product's form (`pallas_kernels.lut_matmul`).
  Returns:
    (the tree with `SqueezeWeight` leaves, a report: per leaf `{"shape", "bytes", "fp32_bytes",
    "bits_per_weight", "outliers"}` under "leaves", and the totals "quantized_bytes" (selected
    leaves as stored), "quantized_fp32_bytes" (the same leaves in fp32), "bytes_before" and
    "bytes_after" (the whole tree)).
  """
  _check_options(bits, outlier_fraction, method, iters, lut_dtype, impl, interpret)
  include_p, exclude_p = check_patterns("include", include), check_patterns("exclude", exclude)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  f_leaves, f_treedef = jax.tree_util.tree_flatten_with_path(fisher)
  if f_treedef != treedef:
    names = {path_name(p) for p, _ in leaves}
    f_names = {path_name(p) for p, _ in f_leaves}
    raise ValueError("fisher must have the structure of params: missing "
                     f"{sorted(names - f_names)[:4]}, extra {sorted(f_names - names)[:4]}"
                     + ("" if names != f_names else f" (containers differ: {f_treedef} vs "
                        f"{treedef})"))
  selected = []
  for (path, leaf), (_, f_leaf) in zip(leaves, f_leaves):
    name = path_name(path)
    if tuple(jnp.shape(f_leaf)) != tuple(jnp.shape(leaf)):
      raise ValueError(f"fisher/{name} must have the shape of params/{name} "
                       f"{tuple(jnp.shape(leaf))}, got {tuple(jnp.shape(f_leaf))}")
    selected.append(
        jnp.ndim(leaf) == 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        and (not include_p or any(re.search(p, name) for p in include_p))
        and not any(re.search(p, name) for p in exclude_p))
  if not any(selected):
    raise ValueError(f"no 2-D floating parameter matched include={include!r} and "
                     f"exclude={exclude!r}")

  out, report = [], {"leaves": {}}
  for (path, leaf), (_, f_leaf), chosen in zip(leaves, f_leaves, selected):
    if not chosen:
      out.append(leaf)
      continue
    q = _squeeze_leaf(leaf, f_leaf, bits, outlier_fraction, method, iters, lut_dtype, impl,
                      interpret)
    out.append(q)
    report["leaves"][path_name(path)] = {
        "shape": q.shape, "bytes": q.nbytes, "fp32_bytes": 4 * leaf.size,
        "bits_per_weight": 8 * q.nbytes / leaf.size, "outliers": int(q.values.shape[0])}
  nbytes = lambda x: x.nbytes if isinstance(x, QuantizedWeight) else jnp.size(x) * jnp.result_type(
      x).itemsize
  report["quantized_bytes"] = sum(v["bytes"] for v in report["leaves"].values())
  report["quantized_fp32_bytes"] = sum(v["fp32_bytes"] for v in report["leaves"].values())
  report["bytes_before"] = int(sum(nbytes(leaf) for _, leaf in leaves))
  report["bytes_after"] = int(sum(nbytes(x) for x in out))
  return jax.tree_util.tree_unflatten(treedef, out), report
