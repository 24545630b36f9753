"""Static configuration: the checks every frozen config dataclass shares, whatever package it
belongs to (diffusion solvers, decoders' option sets).

Configuration is a frozen dataclass (STYLE.md, "Habits"); these helpers hold it to the rule that
bad input is an error naming the argument, raised before anything is traced: a misspelt option
is refused with the list of known ones (never silently ignored, as `**kwargs` would), and a
boolean switch given a truthy string such as "no" is refused instead of silently switching on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

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
