"""Text a target model wrote itself, for training models that serve it: a draft aligned to its
target (FastDraft, Zafrir et al. 2024, "FastDraft: How to Train Your Draft": pre-train small,
then fine-tune on target-generated text) and Medusa heads (self-distillation, Cai et al. 2024,
§2.3.2). Decoding verifies the target's own continuations, so models trained on them accept more.

    stream = target_text(target, params, corpus, key, num_prompts=256, prompt_len=64,
                         new_tokens=192, samplers=(SamplerConfig(temperature=1.0),), eos_id=257)
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import GREEDY, SamplerConfig


def target_text(model, params, corpus, key, *, num_prompts: int = 64,
              prompt_len: int = 64, new_tokens: int = 192,
              samplers: tuple = (GREEDY, SamplerConfig(temperature=0.7)),
              batch_size: int = 32, eos_id: int | None = None) -> np.ndarray:
  """Text the target wrote itself: prompts are random corpus windows, each continued by
  `generate` with every sampler in `samplers` (`batch_size` rows per compiled call); rows (prompt
  + continuation, cut after `eos_id`) are concatenated into one stream. Windows drawn from the
  stream may straddle two rows (a small fraction of them)."""
  for name, value in (("num_prompts", num_prompts), ("prompt_len", prompt_len),
                      ("new_tokens", new_tokens), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
  if not samplers or not all(isinstance(s, SamplerConfig) for s in samplers):
    raise TypeError(f"samplers: expected a non-empty tuple of SamplerConfig, got {samplers!r}")
  corpus = np.asarray(corpus)
  if corpus.ndim != 1 or corpus.shape[0] < prompt_len:
    raise ValueError(f"corpus: expected a 1-D stream of at least prompt_len = {prompt_len} tokens")
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  rows = []
  for i, sampler in enumerate(samplers):
    starts = rng.integers(0, corpus.shape[0] - prompt_len + 1, num_prompts)
    prompts = np.stack([corpus[s:s + prompt_len] for s in starts]).astype(np.int32)
    for j in range(0, num_prompts, batch_size):
      row_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
      out = generate(model, params, prompts[j:j + batch_size], row_key,
                     max_new_tokens=new_tokens, sampler=sampler, eos_id=eos_id)
      toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      rows += [np.concatenate([p, t[:n]])
               for p, t, n in zip(prompts[j:j + batch_size], toks, lengths)]
  return np.concatenate(rows).astype(np.int32)
