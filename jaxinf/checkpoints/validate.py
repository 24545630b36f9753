"""The one parameter-tree check: expected vs given, by path, before anything is traced.

Every model entry point (`FamilyLM.__call__`/`prefill`/`step`, `to_functional`'s `apply` for the
DiT and the VAE), every converter (`jaxinf.checkpoints.*`) and every restore path
(`jaxinf.checkpoints.native.CheckpointStore.restore`, `jaxinf.checkpoints.arrays.load_params`,
`jaxinf.parallel.shard.restore_params`) compares what it was given with the tree it expects here
and raises one `ParamsMismatchError` (a `ValueError`) that lists which leaves are missing, extra,
of another shape or of another dtype:

    params: does not match the parameter tree of DiT (2 differences; shapes and dtypes as given !=
    expected): missing keys ['blocks/0/attn/qkv/bias'],
    shape ['final_layer/linear/kernel': expected (32, 8), got (32, 16)]

Only `.shape` and `.dtype` are read, so the check works on `jax.ShapeDtypeStruct` trees, on host
arrays and on sharded device arrays without moving any data. A tree that passed once is remembered
by its signature (tree structure, shapes, dtypes), so checking at every call costs one flatten.

Finiteness (`check_finite`) is the other load-time check: checkpoints and converters verify once
at load that every floating tensor is finite and name the first bad ones and the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The longest list of paths a message shows per kind of difference.
MAX_LISTED = 8


class ParamsMismatchError(ValueError):
  """A parameter tree that does not match the expected one (missing, extra, shape, dtype)."""


def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_quantized(x: Any) -> bool:
  from jaxinf.quant.base import (
    QuantizedWeight,  # here: jaxinf.quant may import this module
  )
  return isinstance(x, QuantizedWeight)


def leaf_paths(tree: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf} of any pytree (dicts, lists, tuples, NNX pure dicts). A low-bit weight
  (`jaxinf.quant.base.QuantizedWeight`) is one leaf, checked by its logical shape and dtype."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _is_array_like(leaf: Any) -> bool:
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _dtype_matches(expected: np.dtype, given: np.dtype, dtypes: str) -> bool:
  if dtypes == "exact":
    return expected == given
  # "kind": floating stays floating, integers stay integers (a bf16 copy of fp32 weights is fine,
  # an integer table where weights belong is not).
  for kind in (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating):
    if jnp.issubdtype(expected, kind):
      return jnp.issubdtype(given, kind)
  return expected == given


def _listing(label: str, items: list[str]) -> str:
  shown = "[" + ", ".join(repr(x) for x in items[:MAX_LISTED])
  more = f", ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
  return f"{label} {shown}{more}]"


def param_differences(expected: Any, given: Any, *, dtypes: str = "exact") -> tuple[int, list[str]]:
  """(number of differing leaves, readable lists by kind) between two parameter trees: missing
  keys, unexpected keys, shape mismatches ('path: given != expected'), dtype mismatches, leaves
  that are not arrays. (0, []) when they match."""
  want, got = leaf_paths(expected), leaf_paths(given)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shape, dtype, not_array = [], [], []
  for path in sorted(set(want) & set(got)):
    w, g = want[path], got[path]
    if not _is_array_like(g):
      not_array.append(f"{path}: {type(g).__name__}")
      continue
    if tuple(w.shape) != tuple(g.shape):
      shape.append(f"{path}: {tuple(g.shape)} != {tuple(w.shape)}")
    if not _dtype_matches(np.dtype(w.dtype), np.dtype(g.dtype), dtypes):
      dtype.append(f"{path}: {np.dtype(g.dtype).name} != {np.dtype(w.dtype).name}")
  kinds = [("missing keys", missing), ("unexpected keys", extra),
           ("shape mismatches", shape), ("dtype mismatches", dtype), ("not arrays", not_array)]
  return (len(missing) + len(extra) + len(shape) + len(dtype) + len(not_array),
          [_listing(label, items) for label, items in kinds if items])


def _signature(tree: Any) -> tuple | None:
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_quantized)
  try:
    return treedef, tuple((tuple(x.shape), np.dtype(x.dtype).str) for x in leaves)
  except (AttributeError, TypeError):
    return None


_seen: set = set()


def check_params(expected: Any, given: Any, *, name: str = "params", dtypes: str = "exact",
                 what: str = "the model's parameter tree") -> None:
  """Raises `ParamsMismatchError` naming `name` when `given` differs from `expected`.

  Args:
    expected: the tree wanted (arrays or `jax.ShapeDtypeStruct`s, e.g. `abstract_params()`).
    given: the tree received (host, device or sharded arrays; tracers too: only shapes/dtypes).
    name: the argument (or file) to name in the message.
    dtypes: "exact" (restore and converters) or "kind" (model entry points: floating stays
      floating, integer stays integer; a bf16 copy of fp32 weights is accepted).
    what: what `expected` is, for the message.
  """
  if dtypes not in ("exact", "kind"):
    raise ValueError(f"dtypes: expected 'exact' or 'kind', got {dtypes!r}")
  if not isinstance(given, (Mapping, list, tuple)):
    raise TypeError(f"{name}: expected a nested dict of arrays ({what}), got "
                    f"{type(given).__name__}")
  want_sig, got_sig = _signature(expected), _signature(given)
  key = None
  if want_sig is not None and got_sig is not None:
    key = (want_sig, got_sig, dtypes)
    try:
      if key in _seen:
        return
    except TypeError:  # an unhashable tree structure: check every time
      key = None
  n, diffs = param_differences(expected, given, dtypes=dtypes)
  if n:
    raise ParamsMismatchError(f"{name}: does not match {what} ({n} difference"
                              f"{'s' if n != 1 else ''}; shapes and dtypes as given != "
                              f"expected): " + ", ".join(diffs))
  if key is not None:
    if len(_seen) > 1024:
      _seen.clear()
    _seen.add(key)


def abstract_tree(tree: Any) -> Any:
  """`tree` as `jax.ShapeDtypeStruct`s (no data read)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree,
                      is_leaf=_is_quantized)


@jax.jit
def _finite_flags(leaves: list) -> list:
  return [jnp.isfinite(x).all() for x in leaves]


def nonfinite_paths(tree: Any) -> list[str]:
  """Paths of the floating leaves of `tree` that hold a NaN or an inf. Host arrays are checked
  with numpy; device (also sharded) arrays by an on-device reduction: only one bool per leaf
  comes to the host."""
  flat = leaf_paths(tree)
  bad, device = [], {}
  for path, leaf in flat.items():
    if not _is_array_like(leaf) or not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    if isinstance(leaf, jax.Array):
      device[path] = leaf
    elif not np.isfinite(np.asarray(leaf)).all():
      bad.append(path)
  if device:
    flags = _finite_flags(list(device.values()))
    bad += [p for p, ok in zip(device, flags) if not bool(ok)]
  return sorted(bad)


def check_finite(tree: Any, *, where: str) -> None:
  """Raises ValueError naming the first non-finite tensors of `tree` and `where` they came from
  (a file, a state dict). The load-time finiteness check of every checkpoint and converter."""
  bad = nonfinite_paths(tree)
  if bad:
    raise ValueError(f"{where}: non-finite values (NaN or inf) in " +
                     _listing(f"{len(bad)} tensor{'s' if len(bad) != 1 else ''}", bad))


def check_floating(state_dict: Mapping[str, Any], *, where: str) -> None:
  """Raises TypeError naming the tensors of a foreign state dict that are not floating point
  (an integer table where weights belong would otherwise be cast to fp32 silently)."""
  bad = sorted(f"{k}: {np.dtype(v.dtype).name}" for k, v in state_dict.items()
               if _is_array_like(v) and not jnp.issubdtype(v.dtype, jnp.floating))
  if bad:
    raise TypeError(f"{where}: expected floating-point weights, got " +
                    _listing(f"{len(bad)} tensor{'s' if len(bad) != 1 else ''}", bad))


def check_state_dict(state_dict: Any, *, where: str = "state_dict") -> None:
  """A foreign state dict (name -> array) at a converter's entry: a mapping of floating, finite
  arrays; errors name `where` and the tensors."""
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"{where}: expected a mapping of tensor names to arrays, got "
                    f"{type(state_dict).__name__}")
  not_arrays = sorted(str(k) for k, v in state_dict.items() if not _is_array_like(v)
                      and not isinstance(v, (list, tuple)))
  if not_arrays:
    raise TypeError(f"{where}: expected arrays, got other values at " +
                    _listing(f"{len(not_arrays)} names", not_arrays))
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  check_floating(state_dict, where=where)
  check_finite(state_dict, where=where)
