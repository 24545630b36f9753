"""Flax NNX modules as pure functions: split once, merge inside jit.

This is the pattern of Flax's performance guide and MaxText: the module's state becomes a plain
nested dict of arrays (`params`), and `apply(params, *args)` rebuilds the module from the static
graph definition inside the traced function, so jit sees only pytrees. Create `apply` once per
model and reuse it: jit caches on its identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def to_functional(module: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], dict]:
  """Returns `(apply, params)` with `apply(params, *args, **kwargs) == module.<method>(*args)`.

  `params` is a nested dict of arrays (`nnx.to_pure_dict`), the form checkpoints and converters use.
  """
  if not hasattr(module, method):
    raise ValueError(f"method: {type(module).__name__} has no method {method!r}")
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)

  def apply(params: dict, *args: Any, **kwargs: Any) -> Any:
    return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)

  apply.__name__ = f"{type(module).__name__}.{method.strip('_') or 'call'}"
  return apply, params
