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


class SequenceModel:
  """The contract every language-model family provides to the decoders (DESIGN.md).

  A model object is static (hashable; it is passed to jit as a static argument) and exposes:

  - `vocab_size: int`, `max_len: int | None` (the longest context it supports, None if unbounded).
  - `init_cache(batch, max_len) -> cache`: a pytree with fixed shapes; `cache["length"]` `[B]` int32
    counts the tokens each row holds.
  - `prefill(params, tokens [B, T], cache, lengths [B]) -> (logits [B, T, V], cache)`: the parallel
    form over right-padded prompts; row b's positions >= lengths[b] must leave its cache untouched
    (their logits are ignored). Afterwards `cache["length"] == lengths`.
  - `step(params, tokens [B, k], cache) -> (logits [B, k, V], cache)`: the recurrent / cached form,
    appending k >= 1 tokens to every row.
  - `rollback(cache, keep [B]) -> cache`: undoes the last `step` but for its first keep[b] tokens
    (0 <= keep <= k), exactly — a length pointer for a KV cache, a kept state history for
    recurrent models. This is what speculative verification uses.
  """

  vocab_size: int
  max_len: int | None = None

  def init_cache(self, batch: int, max_len: int):  # pragma: no cover - interface
    raise NotImplementedError

  def prefill(self, params, tokens, cache, lengths):  # pragma: no cover - interface
    raise NotImplementedError

  def step(self, params, tokens, cache):  # pragma: no cover - interface
    raise NotImplementedError

  def rollback(self, cache, keep):  # pragma: no cover - interface
    raise NotImplementedError
