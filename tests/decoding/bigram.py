"""A bigram language model implementing the SequenceModel contract: the smallest real model the
decoding tests can drive (logits of the next token depend on the current token only)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinf.models.functional import SequenceModel


@dataclasses.dataclass(frozen=True, eq=False)
class BigramModel(SequenceModel):
  vocab_size: int
  max_len: int | None = None

  def init_params(self, key, scale=2.0):
    return {"table": scale * jax.random.normal(key, (self.vocab_size, self.vocab_size))}

  def init_cache(self, batch, max_len):
    # the token history is kept so that rollback is exact and tests can inspect it
    return {"tokens": jnp.zeros((batch, max_len), jnp.int32),
            "length": jnp.zeros((batch,), jnp.int32), "last_k": jnp.zeros((batch,), jnp.int32)}

  def prefill(self, params, tokens, cache, lengths):
    t = tokens.shape[1]
    valid = jnp.arange(t)[None] < lengths[:, None]
    hist = cache["tokens"].at[:, :t].set(jnp.where(valid, tokens, 0))
    return params["table"][tokens], dict(cache, tokens=hist, length=lengths.astype(jnp.int32))

  def step(self, params, tokens, cache):
    b, k = tokens.shape
    pos = cache["length"][:, None] + jnp.arange(k)[None]
    hist = cache["tokens"].at[jnp.arange(b)[:, None], pos].set(tokens)
    return params["table"][tokens], dict(cache, tokens=hist, length=cache["length"] + k,
                                         last_k=jnp.full((b,), k, jnp.int32))

  def cache_batch_axes(self, cache):
    return {"tokens": 0, "length": 0, "last_k": 0}

  def rollback(self, cache, keep):
    return dict(cache, length=cache["length"] - cache["last_k"] + keep)
