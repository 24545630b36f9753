"""Flax NNX modules as pure functions: split once, merge inside jit.

This is the pattern of Flax's performance guide and MaxText: the module's state becomes a plain
nested dict of arrays (`params`), and `apply(params, *args)` rebuilds the module from the static
graph definition inside the traced function, so jit sees only pytrees. Create `apply` once per
model and reuse it: jit caches on its identity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.checkpoints.validate import abstract_tree, check_params
from jaxinf.config import check_int
from jaxinf.parallel.rules import constrain
from pallas_kernels import dispatch


def to_functional(module: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], dict]:
  """Returns `(apply, params)` with `apply(params, *args, **kwargs) == module.<method>(*args)`.

  `params` is a nested dict of arrays (`nnx.to_pure_dict`), the form checkpoints and converters use.
  """
  if not hasattr(module, method):
    raise ValueError(f"method: {type(module).__name__} has no method {method!r}")
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)
  expected = abstract_tree(params)
  owner = f"the parameter tree of {type(module).__name__}"

  def apply(params: dict, *args: Any, **kwargs: Any) -> Any:
    # Shapes and dtypes only (cached per signature): a mismatch is named here, not as a reshape
    # error deep in the model or "Incorrect number of leaves" from merge.
    check_params(expected, params, name="params", dtypes="kind", what=owner)
    return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)

  apply.__name__ = f"{type(module).__name__}.{method.strip('_') or 'call'}"
  # lets callers (trainers, samplers) check a tree before they trace anything
  apply.check_params = functools.partial(check_params, expected, dtypes="kind", what=owner)
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
    appending k >= 1 tokens to every row. It may donate `cache` (the transformer's does): callers
    use the returned cache and step a copy to step twice from one cache.
  - `rollback(cache, keep [B]) -> cache`: undoes the last `step` but for its first keep[b] tokens
    (0 <= keep <= k), exactly — a length pointer for a KV cache, a kept state history for
    recurrent models. This is what speculative verification uses.
  - `mark(cache) -> mark` and `restore(cache, mark) -> cache`: returns a cache to the state it had
    at `mark` after any number of further steps, exactly. Provided here as a copy of the whole
    cache; the transformer's KV cache marks only its lengths (later steps write past them), so a
    self-draft can step in the target's own cache and hand it back for verification
    (`speculative_generate(share_cache=True)`).
  - `select(cache, rows [B']) -> cache`: the cache of rows `rows` (any int32 indices into the
    batch, repeats allowed, so B' may differ from B): what branch expansion, beam-like search and
    particle resampling use. Provided here from `cache_batch_axes(cache)`, the batch axis of every
    leaf, which each family declares; history kept for `rollback` travels with its row.
  - `max_step: int | None`: the most tokens one `step` may take (None: no limit; recurrent
    families bound it by the state history they keep).
  """

  vocab_size: int
  max_len: int | None = None
  max_step: int | None = None

  def init_cache(self, batch: int, max_len: int):  # pragma: no cover - interface
    raise NotImplementedError

  def prefill(self, params, tokens, cache, lengths):  # pragma: no cover - interface
    raise NotImplementedError

  def step(self, params, tokens, cache):  # pragma: no cover - interface
    raise NotImplementedError

  def rollback(self, cache, keep):  # pragma: no cover - interface
    raise NotImplementedError

  def cache_batch_axes(self, cache):  # pragma: no cover - interface
    """A pytree like `cache` whose leaves are the batch axis of each cache leaf."""
    raise NotImplementedError

  def mark(self, cache):
    """What `restore` needs to return `cache` to its present state: here a copy of it."""
    return jax.tree.map(jnp.copy, cache)

  def restore(self, cache, mark):
    """`cache` as it was when `mark` was taken, after any number of further steps."""
    del cache
    return mark

  def select(self, cache, rows):
    """The cache of rows `rows` [B'] (gather on every leaf's batch axis; repeats allowed)."""
    check_rows(rows, cache)
    rows = jnp.asarray(rows, jnp.int32)
    return jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), cache,
                        self.cache_batch_axes(cache))


@functools.cache
def _abstract_module(module_type: type, config: Any) -> nnx.Module:
  """The family's NNX module with abstract weights (`nnx.eval_shape`: nothing is allocated)."""
  return nnx.eval_shape(lambda: module_type(config, rngs=nnx.Rngs(0)))


@functools.cache
def _abstract_params(module_type: type, config: Any) -> dict:
  return nnx.to_pure_dict(nnx.state(_abstract_module(module_type, config)))


@functools.cache
def _pure_method(module_type: type, config: Any, method: str) -> Callable[..., Any]:
  return to_functional(_abstract_module(module_type, config), method)[0]


@dataclasses.dataclass(frozen=True)
class FamilyLM(SequenceModel):
  """The one template of jaxinf's language-model families (transformer, Mamba, RWKV-7,
  TransNormerLLM): a frozen dataclass of a frozen config and the kernel choice.

  - `config`: the family's config dataclass (`config_type`); the NNX module `module_type(config,
    rngs=...)` is built from it, so the model is a value: equal configs give equal, hashable models
    and one jit compilation (models are static arguments of the decoders' jits).
  - `impl`, `interpret`: the kernels' implementation ("auto" | "reference" | "xla" | "pallas") and
    Pallas interpret mode, in this one place for every family.
  - recurrent families add `max_step`, the most tokens one `step` may append (the per-position
    states kept for exact `rollback`).

  Class attributes declare the rest of the family's interface: `rollback_keys` (the top-level
  cache entries that only serve `rollback`, not the state a fresh prompt needs) and
  `cache_batch_axes`. `jaxinf.models.families` registers each family by name.
  """

  config: Any
  impl: str = "auto"
  interpret: bool = False

  config_type: ClassVar[type]
  module_type: ClassVar[type]
  rollback_keys: ClassVar[tuple[str, ...]] = ("last_k",)

  def __post_init__(self):
    if not isinstance(self.config, self.config_type):
      raise TypeError(f"config: expected a {self.config_type.__name__}, got "
                      f"{type(self.config).__name__}")
    dispatch.resolve_impl(self.impl, self.interpret)  # validates both
    if "max_step" in {f.name for f in dataclasses.fields(self)}:
      check_int("max_step", self.max_step)

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_len(self) -> int | None:
    return getattr(self.config, "max_len", None)

  def __call__(self, params: dict, tokens) -> jax.Array:
    """Cache-free logits `[B, T, V]` of full sequences (scoring, training): the parallel form
    from an empty cache. Families with a separate training forward override it."""
    self.check_params(params)
    b, t = tokens.shape
    logits, _ = self.prefill(params, tokens, self.init_cache(b, t), jnp.full((b,), t, jnp.int32))
    return logits

  def constrain_cache(self, cache):
    """`cache` with each leaf's batch axis (`cache_batch_axes`) on the mesh axes of the rule
    "batch" when a mesh is active (`jaxinf.parallel.rules.constrain`; other axes are left to XLA),
    so caches and recurrent states follow the batch; the identity without a mesh."""
    return jax.tree.map(
        lambda x, axis: constrain(x, tuple("batch" if d == axis else None for d in range(x.ndim))),
        cache, self.cache_batch_axes(cache))

  def init_params(self, seed: int | jax.Array = 0) -> dict:
    """Random parameters (the family's own initialisation) as a nested dict of fp32 arrays;
    `seed` an int or a `jax.random.key`."""
    return nnx.to_pure_dict(nnx.state(self.module_type(self.config, rngs=nnx.Rngs(seed))))

  def abstract_params(self) -> dict:
    """The parameter tree's shapes (`jax.ShapeDtypeStruct`), for key checks without weights."""
    return nnx.to_pure_dict(nnx.state(_abstract_module(self.module_type, self.config)))

  def check_params(self, params, name: str = "params") -> None:
    """`params` has this model's tree: every leaf present, no extra one, the shapes of
    `abstract_params()` and floating weights (`jaxinf.checkpoints.validate.check_params`; only
    shapes and dtypes are read, once per signature). Every entry point calls it first."""
    check_params(_abstract_params(self.module_type, self.config), params, name=name,
                 dtypes="kind", what=f"the parameter tree of this {type(self).__name__}")

  def pure(self, method: str = "__call__") -> Callable[..., Any]:
    """The module's `method` as a pure function of (params, ...), built once per config."""
    return _pure_method(self.module_type, self.config, method)

  def module(self, params: dict) -> nnx.Module:
    """The NNX module holding `params` (inside a traced function: merge is cheap)."""
    self.check_params(params)
    return nnx.merge(nnx.graphdef(_abstract_module(self.module_type, self.config)), params)

  def check_cache_request(self, batch, max_len) -> None:
    check_int("batch", batch)
    if max_len is not None:
      check_int("max_len", max_len)
      if self.max_len is not None and max_len > self.max_len:
        raise ValueError(f"max_len: {max_len} exceeds the model's context of {self.max_len}")

  def check_tokens(self, tokens, cache, *, step: bool = False) -> None:
    """Token ids (every position, padding too: an id outside the table would be clamped
    silently), the batch against the cache, the context, and for `step` the history size."""
    check_token_ids("tokens", tokens, self.vocab_size)
    check_cache_batch(cache, tokens.shape[0])
    if self.max_len is not None and tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: {tokens.shape[1]} positions exceed the model's context of "
                       f"{self.max_len}")
    if step and self.max_step is not None and tokens.shape[1] > self.max_step:
      raise ValueError(f"tokens: {tokens.shape[1]} tokens in one step exceed "
                       f"max_step={self.max_step} (the per-position state history kept for "
                       f"rollback); build the model with a larger max_step")


# ---------------------------------------------------------------------------------------------
# Input checks shared by the SequenceModel implementations: all run before tracing, on concrete
# values only (inside jit, e.g. in `generate`, the caller has checked already).


def check_token_ids(name: str, tokens, vocab_size: int, lengths=None) -> None:
  """`tokens` `[B, T]` integer ids in [0, vocab_size) (only positions < lengths[b] if given)."""
  if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
    raise TypeError(f"{name}: expected an integer array [B, T], got {type(tokens).__name__}")
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"{name}: expected shape [B, T] with T >= 1, got {tuple(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
  value = dispatch.concrete_value(tokens)
  if value is None:
    return
  if lengths is not None:
    n = dispatch.concrete_value(lengths)
    if n is None:
      return
    value = value[np.arange(value.shape[1])[None] < n[:, None]]
  bad = value[(value < 0) | (value >= vocab_size)]
  if bad.size:
    raise ValueError(f"{name}: token ids {sorted(set(bad.tolist()))[:5]} outside the vocabulary "
                     f"[0, {vocab_size})")


def check_prefill_lengths(lengths, batch: int, t: int) -> None:
  dispatch.check_lengths("lengths", lengths, batch)
  value = dispatch.concrete_value(lengths)
  if value is not None and ((value < 0) | (value > t)).any():
    raise ValueError(f"lengths: expected values in [0, T={t}], got {value.tolist()}")


def check_cache_batch(cache, batch: int) -> None:
  if not isinstance(cache, dict) or "length" not in cache:
    raise TypeError(f"cache: expected the dict from init_cache, got {type(cache).__name__}")
  if cache["length"].shape != (batch,):
    raise ValueError(f"cache: holds {cache['length'].shape[0]} rows, tokens have {batch}")


def check_keep(keep, cache) -> None:
  """0 <= keep[b] <= the number of tokens the last step appended to row b."""
  dispatch.check_lengths("keep", keep, cache["length"].shape[0])
  value, last = dispatch.concrete_value(keep), dispatch.concrete_value(cache["last_k"])
  if value is not None and last is not None and ((value < 0) | (value > last)).any():
    raise ValueError(f"keep: expected 0 <= keep <= the last step's {last.tolist()} tokens, got "
                     f"{value.tolist()}")


def check_rows(rows, cache) -> None:
  """`rows` a 1-D integer array of indices into the cache's batch."""
  if not isinstance(cache, dict) or "length" not in cache:
    raise TypeError(f"cache: expected the dict from init_cache, got {type(cache).__name__}")
  if not hasattr(rows, "shape") or not hasattr(rows, "dtype"):
    raise TypeError(f"rows: expected a 1-D integer array, got {type(rows).__name__}")
  if rows.ndim != 1 or rows.shape[0] < 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
    raise ValueError(f"rows: expected a non-empty 1-D integer array, got {rows.dtype} "
                     f"{tuple(rows.shape)}")
  b = cache["length"].shape[0]
  value = dispatch.concrete_value(rows)
  if value is not None and ((value < 0) | (value >= b)).any():
    raise ValueError(f"rows: indices {sorted(set(value[(value < 0) | (value >= b)].tolist()))[:5]}"
                     f" outside the cache's {b} rows")
