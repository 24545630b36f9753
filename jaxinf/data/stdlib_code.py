"""A byte-level code corpus every Python install carries: the standard library's own source.

Files are the `.py` files under `sysconfig`'s stdlib directory, excluding test suites, GUI and
legacy packages (their size would dominate a small corpus), sorted by relative path. A file is held
out when a hash of its relative path falls in the held-out fraction — a split by whole files, stable
across machines with the same Python version. Each file is encoded as bytes followed by EOS.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

from jaxinf.data.tokenizer import ByteTokenizer

EXCLUDED_PARTS = ("test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                  "site-packages", "__pycache__")


def stdlib_files(root: str | None = None) -> list[Path]:
  root = Path(root or sysconfig.get_paths()["stdlib"])
  if not root.is_dir():
    raise ValueError(f"root: {root} is not a directory")
  return sorted((p for p in root.rglob("*.py")
                 if not any(part in EXCLUDED_PARTS for part in p.relative_to(root).parts)),
                key=lambda p: str(p.relative_to(root)))


def is_heldout(relative_path: str, fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "little")
  return h / 2**64 < fraction


@functools.cache
def load_corpus(heldout_fraction: float = 0.05, root: str | None = None,
                max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(train ids, held-out ids) as int32 arrays of byte ids with EOS between files.

  `max_bytes` caps each split (train files first in path order) to keep small runs small.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction: expected in (0, 1), got {heldout_fraction}")
  tok = ByteTokenizer()
  root_path = Path(root or sysconfig.get_paths()["stdlib"])
  splits: dict[bool, list[bytes]] = {False: [], True: []}
  sizes = {False: 0, True: 0}
  for path in stdlib_files(root):
    held = is_heldout(str(path.relative_to(root_path)), heldout_fraction)
    if max_bytes is not None and sizes[held] >= max_bytes:
      continue
    data = path.read_bytes()
    splits[held].append(data)
    sizes[held] += len(data) + 1
  def encode(chunks):
    out = np.empty(sum(len(c) + 1 for c in chunks), np.int32)
    pos = 0
    for c in chunks:
      out[pos:pos + len(c)] = np.frombuffer(c, np.uint8)
      out[pos + len(c)] = tok.eos_id
      pos += len(c) + 1
    return out[:max_bytes] if max_bytes is not None else out
  train, held = encode(splits[False]), encode(splits[True])
  if len(held) == 0:
    raise ValueError("heldout_fraction: no file was held out; use a larger fraction")
  return train, held
