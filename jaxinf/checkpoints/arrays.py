"""Parameters as a flat file of named arrays (`.npz`, read with `allow_pickle=False`).

Names are the '/'-joined paths of the nested params dict. Loading against a template refuses,
with the lists, any missing or unexpected name and any shape mismatch — nothing is dropped or
filled in silently.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from jaxinf.checkpoints.validate import check_finite, check_params


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
  """Raises `ParamsMismatchError` (a ValueError) listing missing/unexpected names, shape and
  dtype mismatches (`jaxinf.checkpoints.validate.check_params`, exact dtypes)."""
  check_params(expected, flat, name=what, dtypes="exact", what="the model")


def save_params(path: str | os.PathLike, params: dict, **meta: np.ndarray) -> None:
  """Writes params (and `meta__<name>` arrays) to an `.npz` file."""
  flat = flatten_params(params)
  flat.update({f"meta__{k}": np.asarray(v) for k, v in meta.items()})
  np.savez(path, **flat)


def load_params(path: str | os.PathLike, template: dict | None = None) -> tuple[dict, dict]:
  """(params, meta) from `save_params`'s file; with a template, names, shapes and dtypes must
  match. Every floating array must be finite (checked once, here). Errors name the file."""
  where = f"checkpoint {os.fspath(path)!r}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"path: no such file {os.fspath(path)!r}")
  try:
    with np.load(path, allow_pickle=False) as data:
      if not hasattr(data, "files"):
        raise ValueError(f"{where}: expected an .npz archive of named arrays (save_params), got "
                         f"a single {type(data).__name__}")
      flat = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
    raise ValueError(f"{where}: not a readable .npz archive (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e
  except ValueError as e:
    if str(e).startswith(where):
      raise
    raise ValueError(f"{where}: not a readable .npz archive of numeric arrays (truncated, "
                     f"corrupt or pickled?): {e}") from e
  meta = {k[len("meta__"):]: v for k, v in flat.items() if k.startswith("meta__")}
  flat = {k: v for k, v in flat.items() if not k.startswith("meta__")}
  if template is not None:
    check_keys(flat, flat_leaves(template), what=where)
  check_finite(flat, where=where)
  return unflatten_params(flat), meta
