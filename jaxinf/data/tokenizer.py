"""A byte-level tokenizer: no external vocabulary. Ids 0..255 are bytes; then BOS, EOS, PAD."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  bos_id: int = 256
  eos_id: int = 257
  pad_id: int = 258

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"text: expected str, got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids: {bad[:5]} outside [0, {self.vocab_size})")
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[B, T]` int32 ids and their lengths `[B]`."""
    seqs = [self.encode(t, bos=bos) for t in texts]
    return pad_batch(seqs, self.pad_id)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Ragged sequences -> right-padded `[B, T]` int32 array and lengths `[B]`."""
  if not seqs:
    raise ValueError("seqs: expected at least one sequence")
  lengths = np.array([len(s) for s in seqs], np.int32)
  if lengths.min() < 1:
    raise ValueError("seqs: every sequence needs at least one token")
  out = np.full((len(seqs), int(lengths.max())), pad_id, np.int32)
  for i, s in enumerate(seqs):
    out[i, : len(s)] = np.asarray(s, np.int32)
  return out, lengths
