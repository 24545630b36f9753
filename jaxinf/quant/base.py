"""The contract between quantized weights and the models: what a low-bit weight leaf must provide.

A model's parameter tree may hold, in place of a floating `[in, out]` matmul weight, any
`QuantizedWeight`: a JAX pytree (its stored low-bit arrays are the children, the format is static
metadata) that the models use exactly like the array it replaces. Every family computes its
projections as `x @ w` (`jaxinf.models.layers.Linear` for the NNX `Linear` layers), so

- `w[...]` (how an NNX module reads a parameter) returns the weight itself,
- `x @ w` reaches `w.__rmatmul__(x)` (JAX arrays defer `@` to an operand type they do not know),
  which computes the product from the stored form — the format decides how (dequantize-then-dot,
  a per-channel scale applied after an integer-valued dot, a lookup table, a Pallas kernel),
- `w.astype(dtype)` sets the compute dtype (the models' `dtype` option, as for an array),
- `shape`, `ndim` and `dtype` are the logical ones (those of the floating weight), so parameter
  checks (`jaxinf.checkpoints.validate.check_params`) see the tree the model expects,
- `dequantize()` gives the floating `[in, out]` array and `nbytes` the bytes actually stored.

Subclasses are registered pytrees (`jax.tree_util.register_dataclass` or `flax.struct`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


class QuantizedWeight(abc.ABC):
  """Base class of every low-bit weight leaf (`jaxinf.quant`); see the module docstring."""

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """The logical shape, that of the floating weight."""

  @property
  @abc.abstractmethod
  def dtype(self) -> np.dtype:
    """The compute dtype (float32 unless `astype` changed it)."""

  @abc.abstractmethod
  def astype(self, dtype: Any) -> QuantizedWeight:
    """The same stored weight computing in `dtype`."""

  @abc.abstractmethod
  def dequantize(self) -> jax.Array:
    """The floating weight `shape` in `dtype`."""

  @abc.abstractmethod
  def __rmatmul__(self, x: jax.Array) -> jax.Array:
    """`x @ W` for `x` `[..., in]`: `[..., out]` in the compute dtype."""

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays (the pytree's children), scales and tables included."""
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(self)))

  def __getitem__(self, index: Any) -> QuantizedWeight:
    if index is not Ellipsis:
      raise TypeError(f"a {type(self).__name__} supports only [...] (the NNX parameter read), "
                      f"got index {index!r}")
    return self


def is_quantized(x: Any) -> bool:
  """True for a `QuantizedWeight` leaf (the `is_leaf` of tree walks over quantized trees)."""
  return isinstance(x, QuantizedWeight)


def check_patterns(name: str, value) -> tuple[str, ...]:
  """`value` (None, one regex string or a sequence of them: which parameter paths a quantizer
  takes or leaves) as a tuple; TypeError / ValueError naming `name` otherwise."""
  if value is None:
    return ()
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
    raise TypeError(f"{name}: expected a regex string or a sequence of them, got {value!r}")
  for pattern in value:
    try:
      re.compile(pattern)
    except re.error as error:
      raise ValueError(f"{name}: {pattern!r} is not a regular expression ({error})") from None
  return tuple(value)
