"""Every drafter the training-free decoders run meets `draft_verify.Drafter`: each member, with
the protocol's signature (the loop calls them positionally)."""

from __future__ import annotations

import inspect

import pytest

from jaxinf.decoding.draft_verify import Drafter
from jaxinf.decoding.jacobi import JacobiDrafter, LookaheadDrafter, SJDDrafter
from jaxinf.decoding.lookup import PromptLookupDrafter, TrieDrafter

DRAFTERS = [
    PromptLookupDrafter(ngram=3, draft_len=5, pad_id=0),
    TrieDrafter(ngram=3, draft_len=5, branches=3, max_candidates=8, pad_id=0),
    JacobiDrafter(window=4),
    LookaheadDrafter(window=4, ngram=3, candidates=2, pool_size=2, vocab_size=16, pad_id=0),
    SJDDrafter(window=4, vocab_size=16),
]


def params(fn) -> list[str]:
  return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_the_protocol_lists_what_the_loop_uses():
  members = {n for n in vars(Drafter) if not n.startswith("_")}
  assert members == {"branches", "draft_len", "init", "propose", "update"}


@pytest.mark.parametrize("drafter", DRAFTERS, ids=lambda d: type(d).__name__)
def test_drafter_has_every_member_with_its_signature(drafter):
  hash(drafter)  # static argument of the jitted loop
  for name, proto in vars(Drafter).items():
    if name.startswith("_"):
      continue
    if isinstance(proto, property):
      value = getattr(drafter, name)
      assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, name
    else:
      assert params(getattr(drafter, name)) == params(proto), name
