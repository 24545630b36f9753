"""FastDraft's target text: each sequence is a corpus window, the target's own `generate`
continuation from it, and EOS."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models.transformer import TransformerLM, transformer_config
from jaxinf.train.draft import target_text

EOS = 257


def test_target_text_is_the_targets_continuations():
  model = TransformerLM(transformer_config("transformer-tiny", vocab_size=259, max_len=64))
  params = model.init_params(0)
  corpus = np.arange(200, dtype=np.int32) % 250
  key = jax.random.key(3)
  sampler = SamplerConfig(temperature=1.0)
  stream = target_text(model, params, corpus, key, n_sequences=3, prompt_len=5, new_tokens=6,
                       sampler=sampler, batch=2, seed=1)
  seqs = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
  assert len(seqs) == 3 and all(s[-1] == EOS for s in seqs)
  # the same prompts and keys through generate directly
  rng = np.random.default_rng(1)
  expected = []
  for i, b in enumerate((2, 1)):
    starts = rng.integers(0, corpus.size - 5, size=2)
    prompts = np.stack([corpus[s:s + 5] for s in starts])
    out = generate(model, params, prompts, jax.random.fold_in(key, i), max_new_tokens=6,
                   sampler=sampler, eos_id=EOS)
    for row in range(b):
      cont = np.asarray(out.tokens)[row, :int(out.lengths[row])]
      expected.append(np.concatenate([prompts[row], cont[cont != EOS], [EOS]]))
  for got, want in zip(seqs, expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [dict(n_sequences=0), dict(prompt_len=0), dict(new_tokens=-1)])
def test_bad_sizes_refused(bad):
  model = TransformerLM(transformer_config("transformer-tiny", vocab_size=259, max_len=64))
  kw = {**dict(n_sequences=1, prompt_len=4, new_tokens=2), **bad}
  with pytest.raises(ValueError, match=next(iter(bad))):
    target_text(model, model.init_params(0), np.arange(50), jax.random.key(0), **kw)
