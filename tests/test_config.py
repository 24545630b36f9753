"""`jaxinf.config`: the strict constructor and the bool-field check every config shares."""

from __future__ import annotations

import dataclasses

import pytest

from jaxinf.config import check_bool_fields, strict_config


@dataclasses.dataclass(frozen=True)
class _Config:
  rate: float = 0.5
  enabled: bool = False

  def __post_init__(self):
    check_bool_fields(self)


def test_strict_config_builds_known_options():
  assert strict_config(_Config, "toy", {"rate": 0.25}) == _Config(rate=0.25)


def test_strict_config_names_unknown_and_known_options():
  with pytest.raises(ValueError, match=r"unknown toy option\(s\) \['rat'\]; known: "
                                       r"\['enabled', 'rate'\]"):
    strict_config(_Config, "toy", {"rat": 0.25})


def test_strict_config_refuses_a_non_dataclass():
  with pytest.raises(TypeError, match="cls"):
    strict_config(dict, "toy", {})


@pytest.mark.parametrize("value", ["no", 0, None])
def test_bool_field_refuses_a_non_bool(value):
  with pytest.raises(TypeError, match="enabled: expected a bool"):
    _Config(enabled=value)
