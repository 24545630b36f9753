"""Mamba-1 beyond the shared SequenceModel contract suite (tests/models/test_families.py, which
holds prefill (selective_scan) vs step (selective_scan_step), exact rollback of the recurrent
states, ragged batches and generate): the Pallas scan through the model and its own bad input."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models.mamba import MambaConfig, MambaLM
from sequence_contract import MAMBA_CFG, random_tokens

TINY = MAMBA_CFG  # init_std 0.5 for the embedding: logits of order 1-10 with the tied head


def test_pallas_scan_through_the_model_matches_the_reference():
  """The model's ragged prefill through the Pallas selective-scan kernel (interpreter on CPU),
  masked deltas of -inf included, against the reference scan; then a step from its states."""
  fast = MambaLM(TINY, impl="pallas", interpret=True)
  slow = MambaLM(TINY, impl="reference")
  params = fast.init_params(0)
  toks = jnp.asarray(random_tokens(fast, (2, 9), seed=5))
  lengths = jnp.asarray([9, 4])
  a, cache_a = fast.prefill(params, toks, fast.init_cache(2), lengths)
  b, cache_b = slow.prefill(params, toks, slow.init_cache(2), lengths)
  valid = np.arange(9)[None] < np.asarray(lengths)[:, None]
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=0, atol=2e-5)
  a, _ = fast.step(params, toks[:, :2], cache_a)
  b, _ = slow.step(params, toks[:, :2], cache_b)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def test_bad_input_raises():
  model = MambaLM(TINY, max_step=2)
  params = model.init_params(0)
  cache = model.init_cache(1)
  with pytest.raises(ValueError, match="cache: expected shapes"):
    MambaLM(TINY, max_step=3).step(params, jnp.ones((1, 1), jnp.int32), cache)
  with pytest.raises(ValueError, match="conv_kernel: expected >= 2"):
    MambaConfig(conv_kernel=1)
