"""A draft model trained for its target: FastDraft's recipe (Zafrir et al. 2024, "FastDraft:
How to Train Your Draft"): pre-train a small model on the data, then align it to the target by
fine-tuning on text the target generated (sequence-level distillation, as in Kim & Rush 2016), so
the draft's proposals agree with the target's and speculative decoding accepts more of them.

    stream = target_text(target, t_params, corpus, key, n_sequences=512, prompt_len=32,
                         new_tokens=224, sampler=SamplerConfig(temperature=1.0))
    state, losses = train_lm(draft, pretrained_params, stream, cfg=..., out_dir=...)

The generated text is the target's own samples from prompts drawn out of the training corpus (no
held-out text is used); each sequence is its prompt and continuation followed by EOS, so the draft
learns the target's continuations in context.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.tokenizer import ByteTokenizer


def target_text(target, params, corpus, key, *, n_sequences: int, prompt_len: int,
                new_tokens: int, sampler: SamplerConfig = SamplerConfig(temperature=1.0),
                batch: int = 64, seed: int = 0) -> np.ndarray:
  """A token stream of `n_sequences` target continuations (prompt + `new_tokens` + EOS each),
  generated `batch` sequences per compiled call, prompts being random windows of `corpus`."""
  corpus = np.asarray(corpus)
  for name, value in (("n_sequences", n_sequences), ("prompt_len", prompt_len),
                      ("new_tokens", new_tokens), ("batch", batch)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
  if corpus.ndim != 1 or corpus.size <= prompt_len:
    raise ValueError(f"corpus: expected a 1-D stream longer than prompt_len={prompt_len}")
  eos = ByteTokenizer.eos_id
  rng = np.random.default_rng(seed)
  pieces = []
  for i, start in enumerate(range(0, n_sequences, batch)):
    b = min(batch, n_sequences - start)
    starts = rng.integers(0, corpus.size - prompt_len, size=batch)
    prompts = np.stack([corpus[s:s + prompt_len] for s in starts]).astype(np.int32)
    out = generate(target, params, prompts, jax.random.fold_in(key, i), max_new_tokens=new_tokens,
                   sampler=sampler, eos_id=eos)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(b):
      cont = tokens[row, :lengths[row]]
      if cont.size and cont[-1] == eos:
        cont = cont[:-1]
      pieces.append(np.concatenate([prompts[row], cont, [eos]]))
  return np.concatenate(pieces).astype(np.int32)

