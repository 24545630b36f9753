"""Reading PyTorch-layout weights from safetensors files and moving them into Flax layouts.

Only safetensors is read (never pickle: a `.pt`/`.bin` file can run code when loaded). The
converters (`jaxinf.checkpoints.dit`, `jaxinf.checkpoints.vae`) build on three things here: a
reader that returns fp32 numpy arrays by name, the two layout changes PyTorch -> Flax
(`nn.Linear` weight `[out, in]` -> kernel `[in, out]`; `nn.Conv2d` weight `[O, I, kh, kw]` ->
kernel `[kh, kw, I, O]`), and a key check that lists what is missing and what is unexpected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

StateDict = dict[str, np.ndarray]


def read_safetensors(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> StateDict:
  """All tensors of one safetensors file (or several shards) as fp32 numpy arrays by name.

  Half-precision files are widened to fp32, the dtype jaxinf keeps parameters in. bfloat16, which
  numpy lacks, is widened bit-exactly through its upper 16 bits.
  """
  from safetensors import safe_open  # imported here: only checkpoint loading needs it

  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [Path(p) for p in paths]
  if not paths:
    raise ValueError("paths: expected at least one safetensors file, got none")
  out: StateDict = {}
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f"paths: no such safetensors file: {str(path)!r}")
    if path.suffix != ".safetensors":
      raise ValueError(
          f"paths: expected a .safetensors file, got {str(path)!r} (pickled .pt/.bin checkpoints "
          "are not read; convert them to safetensors with torch + safetensors.torch.save_file)")
    with safe_open(str(path), framework="np") as f:
      for name in f.keys():
        if name in out:
          raise ValueError(f"paths: tensor {name!r} appears in more than one shard")
        out[name] = _read_f32(f, path, name)
  return out


def _read_f32(f, path: Path, name: str) -> np.ndarray:
  try:
    return np.asarray(f.get_tensor(name), np.float32)
  except (TypeError, ValueError):
    pass
  # numpy has no bfloat16, so safetensors' numpy backend refuses it; torch reads it exactly.
  try:
    import torch
    from safetensors import safe_open
  except ImportError as e:
    raise TypeError(f"paths: tensor {name!r} in {str(path)!r} has a dtype numpy cannot hold "
                    "(bfloat16); install torch to read it, or re-save the file in float32") from e
  with safe_open(str(path), framework="pt") as g:
    return g.get_tensor(name).to(torch.float32).numpy()


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
  """The safetensors file(s) of a checkpoint: a file, or diffusers' full-precision file (or its
  shards) in a folder. Half-precision variants beside it are not picked silently."""
  path = Path(path)
  if path.is_file():
    return [path]
  single = path / "diffusion_pytorch_model.safetensors"
  if single.is_file():
    return [single]
  shards = sorted(path.glob("diffusion_pytorch_model-*-of-*.safetensors"))
  if shards:
    return shards
  found = sorted(p.name for p in path.glob("*.safetensors"))
  raise FileNotFoundError(
      f"path: no diffusion_pytorch_model.safetensors (or shards) in {str(path)!r}; found {found}; "
      "pass the file to load")


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """`nn.Linear.weight [out, in]` -> Flax `Linear.kernel [in, out]`."""
  if weight.ndim != 2:
    raise ValueError(f"weight: expected a 2-D Linear weight, got shape {weight.shape}")
  return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """`nn.Conv2d.weight [O, I, kh, kw]` -> Flax `Conv.kernel [kh, kw, I, O]` (channels-last)."""
  if weight.ndim != 4:
    raise ValueError(f"weight: expected a 4-D Conv2d weight, got shape {weight.shape}")
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def check_source_keys(state_dict: Mapping[str, np.ndarray], expected: Iterable[str], what: str,
                      optional: Iterable[str] = ()) -> None:
  """Raises ValueError listing every missing and every unexpected name of a foreign state dict."""
  expected = set(expected)
  allowed = expected | set(optional)
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - allowed)
  if missing or unexpected:
    raise ValueError(f"{what}: does not match the model: missing keys {missing}, unexpected keys "
                     f"{unexpected}")
