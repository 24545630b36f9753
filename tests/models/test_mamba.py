"""Mamba-1 under the SequenceModel contract: prefill (selective_scan) vs step
(selective_scan_step) vs the cache-free forward, exact rollback of recurrent states, ragged
batches, generate, bad input."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models.mamba import MambaConfig, MambaLM
from sequence_contract import (check_generate_greedy, check_prefill_then_step,
                               check_ragged_batch, check_rollback, check_select,
                               random_tokens)

# init_std 0.5 for the embedding: logits of order 1-10 with the tied head.
TINY = MambaConfig(vocab_size=64, hidden_size=32, num_layers=2, state_size=8, init_std=0.5)


@pytest.fixture(scope="module", params=["tied", "untied_biases"])
def model_params(request):
  cfg = TINY if request.param == "tied" else dataclasses.replace(
      TINY, tie_embeddings=False, use_bias=True, use_conv_bias=False, conv_kernel=3)
  model = MambaLM(cfg, max_step=4)
  return model, model.init_params(0)


def test_prefill_then_step_equals_longer_prefill(model_params):
  model, params = model_params
  seq = random_tokens(model, (2, 11), seed=1)
  check_prefill_then_step(model, params, seq, prompt_len=5, chunk=3)


def test_step_rollback_is_exact(model_params):
  """Including keep = 0 (back to the prefill state) and keep = k; the conv and SSM states after
  the rollback equal those of stepping the kept tokens one by one."""
  model, params = model_params
  seq = random_tokens(model, (3, 16), seed=2)
  check_rollback(model, params, seq, prompt_len=5, k=4, keep=np.array([0, 2, 4]), n_after=3,
                 state_keys=("conv", "ssm"))


def test_select_reorders_and_repeats_rows_exactly(model_params):
  model, params = model_params
  seq = random_tokens(model, (3, 11), seed=4)
  check_select(model, params, seq, prompt_len=5, k=3, rows=[2, 0, 0, 1], keep=[0, 3, 1, 2])


def test_ragged_batch_rows_match_running_alone(model_params):
  """Padded positions leave the recurrent states as they were at each row's own length."""
  model, params = model_params
  prompts = [random_tokens(model, (n,), seed=10 + n).tolist() for n in (7, 2, 5)]
  continuation = random_tokens(model, (3, 3), seed=3)
  check_ragged_batch(model, params, prompts, continuation, pad_id=63)


def test_generate_greedy_end_to_end():
  model = MambaLM(TINY, max_step=4)
  params = model.init_params(0)
  check_generate_greedy(model, params, [[1, 2, 3, 4, 5], [7], [9, 10, 11]], max_new_tokens=6)


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
  with pytest.raises(ValueError, match=r"tokens: token ids \[64\] outside the vocabulary"):
    model.prefill(params, jnp.asarray([[1, 64]]), cache, jnp.asarray([2]))
  with pytest.raises(ValueError, match="tokens: 3 tokens in one step exceed max_step=2"):
    model.step(params, jnp.ones((1, 3), jnp.int32), cache)
  with pytest.raises(ValueError, match="cache: holds 1 rows, tokens have 2"):
    model.step(params, jnp.ones((2, 1), jnp.int32), cache)
  with pytest.raises(ValueError, match="cache: expected shapes"):
    MambaLM(TINY, max_step=3).step(params, jnp.ones((1, 1), jnp.int32), cache)
  _, cache = model.step(params, jnp.ones((1, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= the last step's \[2\]"):
    model.rollback(cache, jnp.asarray([3]))
  with pytest.raises(ValueError, match="conv_kernel: expected >= 2"):
    MambaConfig(conv_kernel=1)
