"""Static configuration: the checks every frozen config dataclass shares, whatever package it
belongs to (diffusion solvers, decoders' option sets).

Configuration is a frozen dataclass (STYLE.md, "Habits"); these helpers hold it to the rule that
bad input is an error naming the argument, raised before anything is traced: a misspelt option
is refused with the list of known ones (never silently ignored, as `**kwargs` would), and a
boolean switch given a truthy string such as "no" is refused instead of silently switching on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

C = TypeVar("C")


def strict_config(cls: type[C], what: str, options: dict[str, Any]) -> C:
  """`cls(**options)` for a config dataclass `cls`, refusing unknown option names with the list
  of known ones (`what` names the config in the message, e.g. "sampler", "DDIM")."""
  if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
    raise TypeError(f"cls: expected a dataclass type, got {cls!r}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f"options: unknown {what} option(s) {unknown}; known: {sorted(known)}")
  return cls(**options)


def check_bool_fields(config) -> None:
  """Every field of the dataclass instance `config` whose default is a bool holds a bool: a
  TypeError naming the field otherwise (a string such as "no" would switch it on silently)."""
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if isinstance(f.default, bool) and not isinstance(value, bool):
      raise TypeError(f"{f.name}: expected a bool, got {value!r}")


def check_int(name: str, value, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def check_flag(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _type_ok(value, annotation: str) -> bool:
  annotation = annotation.strip()
  if annotation == "None":
    return value is None
  if annotation == "bool":
    return isinstance(value, bool)
  if annotation == "int":
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
  if annotation == "float":
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  if annotation == "str":
    return isinstance(value, str)
  if annotation.startswith("tuple[") and annotation.endswith(", ...]"):
    inner = annotation[len("tuple["):-len(", ...]")]
    return isinstance(value, tuple) and all(_type_ok(v, inner) for v in value)
  return True  # an annotation this check does not know: left to the config's own checks


_EXPECTED = {"bool": "a bool", "int": "a positive int", "float": "a finite number",
             "str": "a str", "None": "None"}


def _describe(annotation: str) -> str:
  parts = []
  for part in annotation.split("|"):
    part = part.strip()
    if part.startswith("tuple[") and part.endswith(", ...]"):
      inner = _describe(part[len("tuple["):-len(", ...]")])
      parts.append(f"a tuple whose items are each {inner}")
    else:
      parts.append(_EXPECTED.get(part, part))
  return " or ".join(parts)


def check_fields(config, *, positive: tuple[str, ...] = ()) -> None:
  """The type checks every model config shares, read from its field annotations: `bool` fields
  hold bools (not "no"), `int` fields positive ints (not 2.0, not True, not 0), `float` fields
  finite real numbers (not nan, inf or "1e-5"), `str` fields strs, `tuple[T, ...]` tuples of T,
  `X | None` also None. Then every field named in `positive` (when not None) is > 0. Raises a
  ValueError naming the first bad field, before anything is built or traced."""
  for f in dataclasses.fields(config):
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    value = getattr(config, f.name)
    if not any(_type_ok(value, part) for part in annotation.split("|")):
      raise ValueError(f"{f.name}: expected {_describe(annotation)}, got {value!r}")
  for name in positive:
    value = getattr(config, name)
    if value is not None and not value > 0:
      raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_key(key, name: str = "key") -> None:
  """One PRNG key: a typed key of shape () (`jax.random.key(seed)`) or a legacy raw uint32 key of
  shape (2,) (`jax.random.PRNGKey(seed)`). An int (a seed), a float array or a batch of keys is
  refused by name (a batch would otherwise be split and broadcast into the wrong shapes). The one
  key check of every sampler and decoder."""
  dtype = getattr(key, "dtype", None)
  if dtype is None or not hasattr(key, "shape"):
    raise TypeError(f"{name}: expected a PRNG key such as jax.random.key(seed), got "
                    f"{type(key).__name__} {key!r}"[:200])
  if isinstance(key, jax.core.Tracer):
    return  # inside a user's jit/vmap: the caller's key is its business
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{name}: expected a single key, got a batch of keys of shape "
                       f"{tuple(key.shape)} (split it and call once per key, or vmap)")
    return
  if dtype == np.uint32 and tuple(key.shape) == (2,):
    return
  if dtype == np.uint32 and key.ndim >= 2 and key.shape[-1] == 2:
    raise ValueError(f"{name}: expected a single key, got a batch of raw keys of shape "
                     f"{tuple(key.shape)}")
  raise TypeError(f"{name}: expected a PRNG key such as jax.random.key(seed), got an array of "
                  f"dtype {dtype} and shape {tuple(key.shape)}")
