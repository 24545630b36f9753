"""Mamba-1 beyond the shared SequenceModel contract suite (tests/models/test_families.py, which
holds prefill (selective_scan) vs step (selective_scan_step), exact rollback of the recurrent
states, ragged batches, generate and the Pallas scan through the model): its own bad input."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxinf.models.mamba import MambaConfig, MambaLM
from sequence_contract import MAMBA_CFG

TINY = MAMBA_CFG  # init_std 0.5 for the embedding: logits of order 1-10 with the tied head


def test_bad_input_raises():
  model = MambaLM(TINY, max_step=2)
  params = model.init_params(0)
  cache = model.init_cache(1)
  with pytest.raises(ValueError, match="cache: expected shapes"):
    MambaLM(TINY, max_step=3).step(params, jnp.ones((1, 1), jnp.int32), cache)
  with pytest.raises(ValueError, match="conv_kernel: expected >= 2"):
    MambaConfig(conv_kernel=1)
