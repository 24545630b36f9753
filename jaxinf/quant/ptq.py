"""Post-training quantization of a parameter tree: every selected matmul weight becomes a `QArray`.

    params_q, report = quantize_params(params, QuantConfig(format="int4", group_size=32))
    print(report.bytes_before, report.bytes_after)   # from the arrays themselves

Which leaves: 2-D floating leaves whose '/'-joined path (dict keys and list indices, e.g.
`layers/0/mlp/up_proj/kernel`) fully matches one of `include` and none of `exclude`. The default
`include` is every `kernel` (the `[in, out]` weight of every `layers.Linear`; the families'
`matmul_weights` regexes, `jaxinf.models.families`, name exactly the weights a model applies as
`x @ w` and can be passed as `include`). The default `exclude` keeps in floating point what the
literature keeps in higher precision and what is not a product `x @ w`:

- the LM head (`lm_head`): its errors go straight into the logits; it is also the largest single
  matrix of a small model, so `exclude=()` offers quantizing it (then also the DiT's last layer);
- embeddings (any path part containing `embed`: token tables, the DiT's patch, timestep and label
  embedders): tables are gathered, not multiplied, and the patch/time embedders are the first
  layers, which diffusion PTQ work (Q-Diffusion, PTQ4DiT) keeps in full precision;
- the DiT's final projection (`final_layer/linear`), the last layer, for the same reason;
- norms, biases and other 1-D leaves never match (only 2-D leaves are candidates).

adaLN modulation weights are quantized by default (they are ordinary matmuls; list them in
`exclude` to keep them).

Embedding tables (`embeddings`, regexes over the same paths, empty by default): each matching
`[vocab, dim]` table becomes a `QEmbedding` (`jaxinf.quant.qarray`): its transpose `[dim, vocab]`
quantized like a weight (scales per token, `group_size` dividing `dim`), looked up by decoding only
the looked-up rows, and a tied output head (`h @ table.T`) is its product. In a small LM with a tied
head the table is the largest matrix and is read at every decode step (a 110M Llama's 32000 x 768
table is 98 MB of its 440), so a low-bit decode that leaves it floating streams mostly the table.
Tables are always rounded to nearest (no calibration inputs for a lookup).

Rounding: "nearest" (round-to-nearest) or "adaround" (learned rounding on calibration inputs per
weight, `jaxinf.quant.adaround`; gather them with `record_matmul_inputs`). A searched float format
("fp4", "fp8") uses a leaf's calibration inputs when given, else the weight MSE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.quant import cpu_kernel
from jaxinf.quant.adaround import AdaRoundConfig, adaround, path_name, select_paths
from jaxinf.quant.base import check_patterns, is_quantized
from jaxinf.quant.cpu_kernel import check_kernel
from jaxinf.quant.formats import FloatSearch, get_format
from jaxinf.quant.qarray import (
  QArray,
  QEmbedding,
  check_act_format,
  check_kernel_format,
  check_scale_dtype,
  kernel_weight,
  quantize,
  quantize_embedding,
)

DEFAULT_INCLUDE = (r"(.*/)?kernel",)
DEFAULT_EXCLUDE = (r"(.*/)?lm_head/.*", r"(.*/)?[^/]*embed[^/]*/.*", r"(.*/)?final_layer/linear/.*")
ROUNDINGS = ("nearest", "adaround")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """format: a name of `jaxinf.quant.formats.FORMATS` or a format object; group_size: None (one
  scale per output column) or input rows per scale group; act_format: None or a W8A8 activation
  format ("int8", "fp8_e4m3", "fp8_e5m2"); include / exclude: regexes over '/'-joined leaf paths
  (module docstring); rounding: "nearest" or "adaround" (needs calibration inputs); adaround: its
  options; compute_dtype: the QArrays' compute dtype; kernel: None (the XLA path) or "cpu_ffi"
  (integer formats, weight-only or int8 activations: the hand-written CPU kernel for decode-sized
  products, `jaxinf.quant.cpu_kernel`; CPU backend only); embeddings: regexes of `[vocab, dim]`
  embedding tables to store as `QEmbedding` (module docstring; not subject to include/exclude);
  embedding_format: their format (None: `format`; e.g. llama.cpp's Q4_0 files keep the tied
  table at 6 or 8 bits, so "int8" beside an int4 body is their like); embedding_group_size: the
  tables' scale groups ("group_size", the default: `group_size`; None: one scale per token row;
  an int: that many dims per scale); scale_dtype: "float32" or "float16"
  (`jaxinf.quant.qarray`: fp16 scales as llama.cpp's Q4_0 / Q8_0 store them)."""

  format: Any = "int8"
  group_size: int | None = None
  act_format: str | None = None
  include: tuple[str, ...] = DEFAULT_INCLUDE
  exclude: tuple[str, ...] = DEFAULT_EXCLUDE
  rounding: str = "nearest"
  adaround: AdaRoundConfig = dataclasses.field(default_factory=AdaRoundConfig)
  compute_dtype: str = "float32"
  kernel: str | None = None
  embeddings: tuple[str, ...] = ()
  embedding_format: Any = None
  embedding_group_size: int | str | None = "group_size"
  scale_dtype: str = "float32"

  def __post_init__(self):
    check_scale_dtype(self.scale_dtype)
    fmt = get_format(self.format)
    if self.embedding_format is not None:
      efmt = get_format(self.embedding_format, arg="embedding_format")
      if self.kernel is not None:
        check_kernel_format(self.kernel, efmt, self.act_format)
    g = self.group_size
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
      raise ValueError(f"group_size: expected None or a positive int, got {g!r}")
    eg = self.embedding_group_size
    if eg != "group_size" and eg is not None and (
        isinstance(eg, bool) or not isinstance(eg, int) or eg < 1):
      raise ValueError(f"embedding_group_size: expected 'group_size', None or a positive int, "
                       f"got {eg!r}")
    for name, unset in (("embedding_format", None), ("embedding_group_size", "group_size")):
      if getattr(self, name) != unset and not self.embeddings:
        raise ValueError(f"{name}: applies to the `embeddings` tables, and none is given")
    check_act_format(self.act_format)
    check_kernel(self.kernel)
    if self.kernel is not None:
      check_kernel_format(self.kernel, fmt, self.act_format)
    for name in ("include", "exclude", "embeddings"):
      pats = getattr(self, name)
      if not isinstance(pats, tuple):
        raise TypeError(f"{name}: expected a tuple of regex strings, got {pats!r}")
      check_patterns(name, pats)
    if not self.include:
      raise ValueError("include: expected at least one regex, got ()")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {self.rounding!r}")
    if not isinstance(self.adaround, AdaRoundConfig):
      raise TypeError(f"adaround: expected an AdaRoundConfig, got {type(self.adaround).__name__}")


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One quantized leaf: its path, shape, format (after any search), clipping ratio, bytes before
  and after and, with AdaRound, the calibration objective of round-to-nearest and of the result."""

  path: str
  shape: tuple[int, int]
  format: str
  clip_ratio: float
  bytes_before: int
  bytes_after: int
  objective_nearest: float | None = None
  objective: float | None = None


@dataclasses.dataclass(frozen=True)
class QuantReport:
  """The quantized leaves and the bytes of the whole tree before and after (`param_bytes`)."""

  leaves: tuple[LeafReport, ...]
  bytes_before: int
  bytes_after: int

  @property
  def ratio(self) -> float:
    return self.bytes_after / self.bytes_before


def param_bytes(tree: Any) -> int:
  """Bytes of every array of `tree` as stored (a `QuantizedWeight` counts its codes and scales)."""
  return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape))
                 for leaf in jax.tree.leaves(tree)))


def kernel_params(params: Any, *, kernel: str = "cpu_ffi", include: tuple[str, ...] = DEFAULT_INCLUDE,
                  exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
                  embeddings: tuple[str, ...] = ()) -> tuple[Any, QuantReport]:
  """`params` with every selected floating matmul weight stored, unquantized, for the
  hand-written CPU kernel (`KernelWeight`: fp32 panels of 16 output columns, whose product reads
  the weights faster than XLA:CPU's fp32 dot at decode batch sizes), and each `embeddings` table
  as a `QEmbedding` over such a weight (a tied head through the kernel). Leaves are chosen as in
  `quantize_params`; the report's bytes after count the panels' zero columns (out padded to a
  multiple of 16). CPU backend only."""
  check_kernel(kernel)
  if kernel is None:
    raise ValueError("kernel: expected 'cpu_ffi' (None is the ordinary XLA path: the params as "
                     "they are)")
  config = QuantConfig(format="int8", include=include, exclude=exclude, embeddings=embeddings)
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  by_name = {path_name(p): leaf for p, leaf in flat}
  tables = select_paths(params, config.embeddings, ()) if config.embeddings else []
  if config.embeddings and not tables:
    raise ValueError(f"embeddings: no 2-D floating parameter matches {config.embeddings}")
  selected = [p for p in select_paths(params, config.include, config.exclude) if p not in tables]
  if not selected and not tables:
    raise ValueError(f"params: no 2-D floating parameter matches include={config.include} and "
                     f"not exclude={config.exclude}")
  done: dict[str, Any] = {}
  leaves = []
  for name in selected + tables:
    w = by_name[name]
    try:
      new = (QEmbedding(kernel_weight(jnp.asarray(w).T, "params")) if name in tables
             else kernel_weight(w, "params"))
    except (TypeError, ValueError) as e:
      raise type(e)(f"params: {name}: {e}") from e
    if name in tables:
      cpu_kernel.check_backend("kernel")
    done[name] = new
    leaves.append(LeafReport(name, tuple(w.shape), "float32", 1.0, param_bytes(w), new.nbytes))
  out = jax.tree_util.tree_map_with_path(lambda p, leaf: done.get(path_name(p), leaf), params,
                                         is_leaf=is_quantized)
  return out, QuantReport(tuple(leaves), param_bytes(params), param_bytes(out))


def quantize_params(params: Any, config: QuantConfig,
                    calibration: Mapping[str, Any] | None = None) -> tuple[Any, QuantReport]:
  """`params` with every selected leaf replaced by its `QArray` (module docstring), and the
  report. `calibration`: inputs `[N, in]` by leaf path (`record_matmul_inputs`), required for
  every selected leaf with `rounding="adaround"`, optional for a searched float format."""
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config: expected a QuantConfig, got {type(config).__name__}")
  if calibration is not None and not isinstance(calibration, Mapping):
    raise TypeError(f"calibration: expected a mapping path -> [N, in] array, got "
                    f"{type(calibration).__name__}")
  calibration = dict(calibration or {})
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  floating = [path_name(p) for p, leaf in flat if hasattr(leaf, "dtype")]
  tables = select_paths(params, config.embeddings, ()) if config.embeddings else []
  if config.embeddings and not tables:
    raise ValueError(f"embeddings: no 2-D floating parameter matches {config.embeddings} (the "
                     f"tree has {len(floating)} array leaves, e.g. {floating[:3]})")
  selected = [p for p in select_paths(params, config.include, config.exclude) if p not in tables]
  if not selected and not tables:
    raise ValueError(f"params: no 2-D floating parameter matches include={config.include} and "
                     f"not exclude={config.exclude} (the tree has {len(floating)} array leaves, "
                     f"e.g. {floating[:3]})")
  unknown = sorted(set(calibration) - set(selected))
  if unknown:
    raise ValueError(f"calibration: paths not among the selected weights: {unknown[:5]}")
  if config.rounding == "adaround":
    missing = [p for p in selected if p not in calibration]
    if missing:
      raise ValueError(f"calibration: rounding='adaround' needs inputs for every selected weight; "
                       f"missing {missing[:5]}")
  by_name = {path_name(p): leaf for p, leaf in flat}
  for name in selected:
    n_in = by_name[name].shape[0]
    if config.group_size is not None and n_in % config.group_size:
      raise ValueError(f"group_size: {config.group_size} does not divide the input dimension "
                       f"{n_in} of {name}")

  table_group, table_arg = ((config.group_size, "group_size")
                            if config.embedding_group_size == "group_size"
                            else (config.embedding_group_size, "embedding_group_size"))
  for name in tables:
    dim = by_name[name].shape[1]
    if table_group is not None and dim % table_group:
      raise ValueError(f"{table_arg}: {table_group} does not divide the embedding dimension "
                       f"{dim} of {name}")

  done: dict[str, QArray | QEmbedding] = {}
  leaves = []
  for name in tables:
    w = by_name[name]
    try:
      fmt = config.format if config.embedding_format is None else config.embedding_format
      qe = quantize_embedding(w, fmt, group_size=table_group,
                              act_format=config.act_format, compute_dtype=config.compute_dtype,
                              kernel=config.kernel, scale_dtype=config.scale_dtype)
    except (TypeError, ValueError) as e:
      raise type(e)(f"params: {name}: {e}") from e
    done[name] = qe
    leaves.append(LeafReport(name, tuple(w.shape), qe.head.fmt.name, qe.head.clip_ratio,
                             param_bytes(w), qe.nbytes))
  for name in selected:
    w = by_name[name]
    kw = {"group_size": config.group_size, "act_format": config.act_format,
          "compute_dtype": config.compute_dtype}
    obj_n = obj = None
    try:
      if config.rounding == "adaround":
        res = adaround(w, calibration[name], config.format, config=config.adaround, **kw)
        qw = res.weight.with_kernel(config.kernel).with_scale_dtype(config.scale_dtype)
        obj_n = res.objective_nearest
        obj = min(res.objective_learned, res.objective_nearest)
      else:
        x = calibration.get(name) if isinstance(get_format(config.format), FloatSearch) else None
        qw = quantize(w, config.format, calibration=x, kernel=config.kernel,
                      scale_dtype=config.scale_dtype, **kw)
    except (TypeError, ValueError) as e:
      raise type(e)(f"params: {name}: {e}") from e
    done[name] = qw
    leaves.append(LeafReport(name, tuple(w.shape), qw.fmt.name, qw.clip_ratio,
                             param_bytes(w), qw.nbytes, obj_n, obj))

  new = jax.tree_util.tree_map_with_path(lambda p, leaf: done.get(path_name(p), leaf), params,
                                         is_leaf=is_quantized)
  return new, QuantReport(tuple(leaves), param_bytes(params), param_bytes(new))
