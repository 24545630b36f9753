"""The softmax transformer beyond the shared SequenceModel contract suite (tests/models/
test_families.py): grouped-query heads, the Pallas kernels through the model, matched sizes, and
its own bad input (cache overflow, context)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.models.transformer import TransformerConfig, TransformerLM
from sequence_contract import TRANSFORMER_CFG, random_tokens

TINY = TRANSFORMER_CFG  # init_std 0.2: logits of order 1-10, so a wrong mask or position shows


def test_gqa_equals_mha_with_repeated_kv_heads():
  """Grouped-query attention == full multi-head attention whose k/v heads are copies: an
  independent check of the head grouping (query head h reads kv head h // (H / Hkv))."""
  gqa = TransformerLM(TINY)
  mha = TransformerLM(dataclasses.replace(TINY, num_kv_heads=TINY.num_heads))
  params = gqa.init_params(0)
  wide = jax_tree_copy(params)
  d, g = TINY.head_dim, TINY.num_heads // TINY.num_kv_heads
  for layer in wide["layers"].values():
    for name in ("k_proj", "v_proj"):
      kernel = np.asarray(layer["self_attn"][name]["kernel"]).reshape(TINY.hidden_size, -1, d)
      layer["self_attn"][name]["kernel"] = jnp.asarray(
          np.repeat(kernel, g, axis=1).reshape(TINY.hidden_size, -1))
  seq = jnp.asarray(random_tokens(gqa, (2, 9), seed=4))
  np.testing.assert_allclose(np.asarray(gqa(params, seq)), np.asarray(mha(wide, seq)), rtol=0,
                             atol=2e-5)


def test_named_1m_configs_are_matched_in_size():
  """The family comparison's sizes: ~1M parameters each over the byte vocabulary, within 2%."""
  from jaxinf.data.tokenizer import ByteTokenizer
  from jaxinf.models.mamba import MambaLM, mamba_config
  from jaxinf.models.transformer import transformer_config

  count = lambda m: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(m.abstract_params()))
  sizes = [count(TransformerLM(transformer_config("transformer-1m"))),
           count(MambaLM(mamba_config("mamba-1m")))]
  assert all(0.9e6 < n < 1.1e6 for n in sizes), sizes
  assert abs(sizes[0] - sizes[1]) < 0.02 * max(sizes), sizes
  assert transformer_config("transformer-1m").vocab_size == ByteTokenizer().vocab_size
  assert mamba_config("mamba-1m").vocab_size == ByteTokenizer().vocab_size
  with pytest.raises(ValueError, match="name: unknown transformer config"):
    transformer_config("transformer-7b")


def jax_tree_copy(tree):
  return {k: jax_tree_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


# --- bad input -------------------------------------------------------------------------------


def test_token_ids_out_of_range_raise():
  model = TransformerLM(TINY)
  params = model.init_params(0)
  cache = model.init_cache(1, 8)
  with pytest.raises(ValueError, match=r"tokens: token ids \[64\] outside the vocabulary"):
    model.prefill(params, jnp.asarray([[1, 64, 2]]), cache, jnp.asarray([3]))
  with pytest.raises(ValueError, match=r"tokens: token ids \[-1\]"):
    model.step(params, jnp.asarray([[-1]]), cache)
  with pytest.raises(TypeError, match="tokens: expected integer token ids"):
    model.prefill(params, jnp.zeros((1, 3)), cache, jnp.asarray([3]))
  with pytest.raises(ValueError, match="prompts: token ids"):
    generate(model, params, [[1, 99]], jax.random.key(0), max_new_tokens=2)
  # a padded position may hold anything: only positions < lengths are ids
  model.prefill(params, jnp.asarray([[1, 2, 999]]), cache, jnp.asarray([2]))


def test_prompt_longer_than_cache_or_context_raises():
  model = TransformerLM(TINY)
  params = model.init_params(0)
  with pytest.raises(ValueError, match="tokens: a prompt of 9 positions does not fit the cache"):
    model.prefill(params, jnp.ones((1, 9), jnp.int32), model.init_cache(1, 8), jnp.asarray([9]))
  with pytest.raises(ValueError, match="max_len: 49 exceeds the model's context of 48"):
    model.init_cache(1, 49)
  cache = model.init_cache(1, 4)
  _, cache = model.prefill(params, jnp.ones((1, 3), jnp.int32), cache, jnp.asarray([3]))
  with pytest.raises(ValueError, match="tokens: 2 more tokens overflow the cache of 4"):
    model.step(params, jnp.ones((1, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match="exceed the model's context of 48"):
    generate(model, params, [[1] * 40], jax.random.key(0), max_new_tokens=10)
  with pytest.raises(ValueError, match=r"lengths: expected values in \[0, T=3\]"):
    model.prefill(params, jnp.ones((1, 3), jnp.int32), model.init_cache(1, 8), jnp.asarray([4]))


def test_bad_config_raises():
  with pytest.raises(ValueError, match="num_kv_heads: 3 must divide num_heads 4"):
    TransformerConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="head_dim: expected an even int"):
    TransformerConfig(hidden_size=12, num_heads=4)
  with pytest.raises(ValueError, match="impl must be one of"):
    TransformerLM(TINY, impl="cuda")
