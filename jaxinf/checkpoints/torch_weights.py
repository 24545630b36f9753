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

import jax.numpy as jnp
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
    try:
      with safe_open(str(path), framework="np") as f:
        names = list(f.keys())
        for name in names:
          if name in out:
            raise ValueError(f"paths: tensor {name!r} appears in more than one shard")
          out[name] = _read_f32(f, path, name)
    except (ValueError, TypeError):
      raise
    except Exception as e:  # safetensors' own errors (truncated file, bad header) name no file
      raise ValueError(f"paths: {str(path)!r} is not a readable safetensors file (expected an "
                       f"8-byte header size, a JSON header and the tensors it lists; truncated "
                       f"or corrupt?): {type(e).__name__}: {e}") from e
  return out


def _read_f32(f, path: Path, name: str) -> np.ndarray:
  """One tensor as fp32, refused (naming the file and tensor) unless it is floating and finite:
  an integer table where weights belong would otherwise be cast silently, and a NaN would only
  show up as NaN samples much later."""
  try:
    value = f.get_tensor(name)
  except (TypeError, ValueError):
    value = None  # a dtype numpy lacks (bfloat16): read through torch below
  if value is not None:
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp: knows ml_dtypes' bfloat16 too
      raise TypeError(f"paths: tensor {name!r} in {str(path)!r} has dtype {value.dtype.name}; "
                      "expected floating-point weights")
    return _finite(np.asarray(value, np.float32), path, name)
  return _finite(_read_f32_torch(path, name), path, name)


def _finite(value: np.ndarray, path: Path, name: str) -> np.ndarray:
  if not np.isfinite(value).all():
    raise ValueError(f"paths: tensor {name!r} in {str(path)!r} holds non-finite values (NaN or "
                     "inf)")
  return value


def _read_f32_torch(path: Path, name: str) -> np.ndarray:
  # numpy has no bfloat16, so safetensors' numpy backend refuses it; torch reads it exactly.
  try:
    import torch
    from safetensors import safe_open
  except ImportError as e:
    raise TypeError(f"paths: tensor {name!r} in {str(path)!r} has a dtype numpy cannot hold "
                    "(bfloat16); install torch to read it, or re-save the file in float32") from e
  with safe_open(str(path), framework="pt") as g:
    value = g.get_tensor(name)
    if not value.is_floating_point():
      raise TypeError(f"paths: tensor {name!r} in {str(path)!r} has dtype {value.dtype}; "
                      "expected floating-point weights")
    return value.to(torch.float32).numpy()


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
