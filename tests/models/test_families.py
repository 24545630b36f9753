"""The family registry (`jaxinf.models.families`): every registered family is built through it and
runs the SequenceModel contract suite (`sequence_contract`), the same checks for every family, each
against the model's other form; the registry's sizes, factory, value semantics, logical axis names
and bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.models import families
from sequence_contract import (CONTRACT_MODELS, check_generate_greedy, check_prefill_then_step,
                               check_ragged_batch, check_rollback, check_select, random_tokens)


@pytest.fixture(scope="module", params=sorted(CONTRACT_MODELS))
def lm(request):
  config, options = CONTRACT_MODELS[request.param]
  model, params = families.build(config, seed=0, **options)
  return model, params


def test_every_registered_family_runs_the_contract_suite():
  covered = {families.family_of(config).name for config, _ in CONTRACT_MODELS.values()}
  assert covered == set(families.FAMILIES)


def test_prefill_then_step_equals_longer_prefill(lm):
  model, params = lm
  check_prefill_then_step(model, params, random_tokens(model, (2, 11), seed=1), prompt_len=5,
                          chunk=3)


def test_step_rollback_is_exact(lm):
  """Including keep = 0 (back to the prefill state) and keep = k; recurrent states after the
  rollback equal those of stepping the kept tokens one by one."""
  model, params = lm
  check_rollback(model, params, random_tokens(model, (3, 16), seed=2), prompt_len=5, k=4,
                 keep=np.array([0, 2, 4]), n_after=3, compare_state=model.max_step is not None)


def test_select_reorders_and_repeats_rows_exactly(lm):
  model, params = lm
  check_select(model, params, random_tokens(model, (3, 11), seed=4), prompt_len=5, k=3,
               rows=[2, 0, 0, 1], keep=[0, 3, 1, 2])


def test_ragged_batch_rows_match_running_alone(lm):
  """Padded positions leave the cache as it was at each row's own length."""
  model, params = lm
  prompts = [random_tokens(model, (n,), seed=10 + n).tolist() for n in (7, 2, 5)]
  check_ragged_batch(model, params, prompts, random_tokens(model, (3, 3), seed=3),
                     pad_id=model.vocab_size - 1)


def test_generate_greedy_end_to_end(lm):
  model, params = lm
  check_generate_greedy(model, params, [[1, 2, 3, 4, 5], [7], [9, 10, 11]], max_new_tokens=6)


def test_bad_input_raises_by_name(lm):
  model, params = lm
  v = model.vocab_size
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match=rf"tokens: token ids \[{v}\] outside the vocabulary"):
    model.prefill(params, jnp.array([[1, v], [1, 2]]), cache, jnp.array([2, 2]))
  with pytest.raises(TypeError, match="tokens: expected integer token ids"):
    model.prefill(params, jnp.zeros((2, 3)), cache, jnp.array([3, 3]))
  with pytest.raises(ValueError, match="lengths: expected values in"):
    model.prefill(params, jnp.ones((2, 3), jnp.int32), cache, jnp.array([3, 4]))
  with pytest.raises(ValueError, match="cache: holds 2 rows, tokens have 3"):
    model.step(params, jnp.ones((3, 1), jnp.int32), cache)
  with pytest.raises(ValueError, match="batch: expected an int >= 1"):
    model.init_cache(0, 16)
  if model.max_step is not None:
    with pytest.raises(ValueError, match=f"exceed max_step={model.max_step}"):
      model.step(params, jnp.ones((2, model.max_step + 1), jnp.int32), cache)
  with pytest.raises(ValueError, match="max_len: the longest prompt"):
    generate(model, params, [[1, 2, 3, 4, 5, 6]], jax.random.key(0), max_new_tokens=4, max_len=8)
  _, stepped = model.step(params, jnp.ones((2, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= the last step's \[2, 2\]"):
    model.rollback(stepped, jnp.array([3, 0]))
  with pytest.raises(ValueError, match="impl"):
    dataclasses.replace(model, impl="bogus")
  with pytest.raises(TypeError, match="config: expected a"):
    type(model)(object())


def _first_case(family: str):
  return next(c for c in CONTRACT_MODELS.values() if families.family_of(c[0]).name == family)


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_pallas_kernels_through_the_model_match_the_reference(family):
  """The model's calls into its Pallas kernels (the interpreter on CPU) on a ragged prefill, then
  a 2-token step from its cache, against the same model on the naive reference kernels."""
  config, options = _first_case(family)
  options = {k: v for k, v in options.items() if k != "impl"}
  fast, params = families.build(config, impl="pallas", interpret=True, **options)
  slow = dataclasses.replace(fast, impl="reference", interpret=False)
  toks = jnp.asarray(random_tokens(fast, (2, 9), seed=5))
  lengths = jnp.asarray([9, 4])
  a, cache_a = fast.prefill(params, toks, fast.init_cache(2, 12), lengths)
  b, cache_b = slow.prefill(params, toks, slow.init_cache(2, 12), lengths)
  valid = np.arange(9)[None] < np.asarray(lengths)[:, None]
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=0, atol=2e-5)
  a, _ = fast.step(params, toks[:, :2], cache_a)
  b, _ = slow.step(params, toks[:, :2], cache_b)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_context_limit_is_refused_by_name(family):
  config, options = _first_case(family)
  if not hasattr(config, "max_len"):
    pytest.skip("no context limit: the recurrent state does not grow")
  short, params = families.build(dataclasses.replace(config, max_len=4), **options)
  with pytest.raises(ValueError, match="exceed"):
    short.init_cache(2, 6)
  with pytest.raises(ValueError, match="tokens: .*(exceed the model's context|does not fit the "
                                       "cache) of 4"):
    short.prefill(params, jnp.ones((2, 6), jnp.int32), short.init_cache(2, 4), jnp.array([6, 6]))


@pytest.mark.parametrize("size", families.sizes())
def test_every_named_size_builds_with_full_axis_names(size):
  """The factory gives the family's own init_params for the seed; every parameter has one logical
  axis name per dimension, and a name means one size within the model."""
  family = families.family_of(size)
  model, params = families.build(size, seed=3)
  assert isinstance(model, family.model_type) and families.family_of(model) is family
  abstract = model.abstract_params()
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  axes = families.param_axes(model)
  sizes: dict[str, set[int]] = {}
  for leaf, names in zip(jax.tree.leaves(abstract),
                         jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert len(names) == leaf.ndim
    for name, n in zip(names, leaf.shape):
      sizes.setdefault(name, set()).add(n)
  assert all(len(s) == 1 for s in sizes.values()), sizes
  assert sizes["embed"] == {model.config.d_model if hasattr(model.config, "d_model")
                            else model.config.hidden_size}
  assert sizes["vocab"] == {model.vocab_size}


def test_factory_params_equal_the_familys_own_initialisation():
  for name in families.FAMILIES:
    model, params = families.build(f"{name}-tiny", seed=7)
    again = model.init_params(jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, params, again)


def test_equal_configs_are_one_model_and_one_compilation():
  """Value semantics: models of equal configs are equal and hash alike, so jit (for which the
  model is a static argument) compiles once; another impl is another model."""
  for name in families.FAMILIES:
    config = families.named_config(f"{name}-tiny")
    a, params = families.build(config)
    b, _ = families.build(dataclasses.replace(config))
    assert a == b and hash(a) == hash(b) and a is not b
    assert dataclasses.replace(a, impl="reference") != a
    tokens = jnp.ones((1, 3), jnp.int32)
    f = jax.jit(lambda m, p, t: m(p, t), static_argnums=0)
    f(a, params, tokens)
    f(b, params, tokens)
    assert f._cache_size() == 1


def test_rollback_keys_name_cache_entries():
  for name in families.FAMILIES:
    model, _ = families.build(f"{name}-tiny")
    cache = jax.eval_shape(lambda: model.init_cache(2, 8))
    assert set(model.rollback_keys) < set(cache) and "length" not in model.rollback_keys
    assert set(model.cache_batch_axes(cache)) == set(cache)


def test_registry_bad_input():
  with pytest.raises(ValueError, match="family: unknown family 'gpt'"):
    families.get_family("gpt")
  with pytest.raises(ValueError, match="size: unknown model size 'rwkv7-70b'"):
    families.build("rwkv7-70b")
  with pytest.raises(ValueError, match=r"overrides: \['d_modle'\] are not fields"):
    families.named_config("rwkv7-tiny", d_modle=64)
  with pytest.raises(ValueError, match=r"model_options: \['max_step'\] are not options of the "
                                       "transformer family"):
    families.build("transformer-tiny", max_step=4)
  with pytest.raises(TypeError, match="config: expected the config or model"):
    families.build(object())
  with pytest.raises(ValueError, match="max_step: expected an int >= 1"):
    families.build("mamba-tiny", max_step=0)
  model, params = families.build("transnormer-tiny")
  params["layers"][0]["token_mixer"]["extra"] = params["lm_head"]
  with pytest.raises(ValueError, match="no transnormer axis rule covers parameter "
                                       "'layers/0/token_mixer/extra'"):
    families.param_axes(model, params)
