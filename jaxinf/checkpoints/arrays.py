"""Parameters as a flat file of named arrays (`.npz`, read with `allow_pickle=False`).

Names are the '/'-joined paths of the nested params dict. Loading against a template refuses,
with the lists, any missing or unexpected name and any shape mismatch — nothing is dropped or
filled in silently.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
  return {name: np.asarray(leaf) for name, leaf in flat_leaves(params, prefix).items()}


def flat_leaves(params: dict, prefix: str = "") -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict, leaves as they are (arrays or ShapeDtypeStructs,
  e.g. of `model.abstract_params()`)."""
  flat = {}
  for key, value in params.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flat_leaves(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
  return tree


def check_keys(flat: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
  """Raises ValueError listing missing/unexpected names and shape mismatches."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  bad_shape = sorted(f"{k}: {flat[k].shape} != {expected[k].shape}"
                     for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape)
  if missing or unexpected or bad_shape:
    raise ValueError(f"{what}: does not match the model: missing keys {missing}, unexpected keys "
                     f"{unexpected}, shape mismatches {bad_shape}")


def save_params(path: str | os.PathLike, params: dict, **meta: np.ndarray) -> None:
  """Writes params (and `meta__<name>` arrays) to an `.npz` file."""
  flat = flatten_params(params)
  flat.update({f"meta__{k}": np.asarray(v) for k, v in meta.items()})
  np.savez(path, **flat)


def load_params(path: str | os.PathLike, template: dict | None = None) -> tuple[dict, dict]:
  """(params, meta) from `save_params`'s file; with a template, names and shapes must match."""
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  meta = {k[len("meta__"):]: v for k, v in flat.items() if k.startswith("meta__")}
  flat = {k: v for k, v in flat.items() if not k.startswith("meta__")}
  if template is not None:
    check_keys(flat, flatten_params(template), what=f"checkpoint {os.fspath(path)!r}")
  return unflatten_params(flat), meta
