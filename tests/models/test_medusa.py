"""Medusa's model-side pieces: the transformer's tree attention step against stepping each node's
path one token at a time, commit_path then stepping against sequential decoding, the final hidden
state against the logits it produces, and the heads against eq. 1 written in numpy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.medusa import DEFAULT_TREE
from jaxinf.models.medusa import MedusaConfig, MedusaHeads, lm_head_matrix, medusa_heads
from jaxinf.models.transformer import TransformerConfig, TransformerLM
from jaxinf.models.tree_attention import tree_structure
from sequence_contract import ATOL, copied, random_tokens, step_one_by_one

TINY = TransformerConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_hidden=64, max_len=48, init_std=0.2)
PARENTS = DEFAULT_TREE.parents  # 13 nodes, depth 4, several branchings
PROMPTS = np.array([7, 3])      # ragged rows: the tree sits at a different offset in each


@pytest.fixture(scope="module", params=["untied", "tied"])
def model_params(request):
  model = TransformerLM(dataclasses.replace(TINY, tie_embeddings=request.param == "tied"))
  return model, model.init_params(0)


@pytest.fixture(scope="module")
def untied():
  model = TransformerLM(TINY)
  return model, model.init_params(0)


def prefilled(model, params, seq, size=32):
  cache = model.init_cache(seq.shape[0], size)
  _, cache = model.prefill(params, jnp.asarray(seq), cache, jnp.asarray(PROMPTS, jnp.int32))
  return cache


def node_path(parents, i):
  chain = []
  while i >= 0:
    chain.append(i)
    i = parents[i]
  return chain[::-1]


def test_tree_structure_depths_and_ancestors():
  depth, anc = tree_structure((-1, 0, 0, 1, 3))
  np.testing.assert_array_equal(depth, [0, 1, 1, 2, 3])
  np.testing.assert_array_equal(np.nonzero(anc[4])[0], [0, 1, 3, 4])
  np.testing.assert_array_equal(np.nonzero(anc[2])[0], [0, 2])


def test_tree_step_equals_stepping_each_path(model_params):
  """Every node's logits and hidden state == stepping its root-to-node path token by token from
  the same prefix (each row at its own prefix length); the cache length does not move."""
  model, params = model_params
  seq = random_tokens(model, (2, 8), seed=1)
  nodes = random_tokens(model, (2, len(PARENTS)), seed=2)
  cache = prefilled(model, params, seq)
  logits, hidden, after = model.tree_step(params, jnp.asarray(nodes), cache, PARENTS,
                                          return_hidden=True)
  plain, _ = model.tree_step(params, jnp.asarray(nodes), cache, PARENTS)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(after["length"]), PROMPTS)
  head = np.asarray(lm_head_matrix(model, params))
  for i in range(len(PARENTS)):
    path = node_path(PARENTS, i)
    c = copied(cache)  # `step` donates its cache; every path starts from the prefilled one
    for j in path:
      ref_logits, ref_hidden, c = model.step(params, jnp.asarray(nodes[:, j:j + 1]), c,
                                             return_hidden=True)
    np.testing.assert_allclose(np.asarray(logits[:, i]), np.asarray(ref_logits[:, 0]), rtol=0,
                               atol=ATOL, err_msg=f"node {i} (path {path})")
    np.testing.assert_allclose(np.asarray(hidden[:, i]), np.asarray(ref_hidden[:, 0]), rtol=0,
                               atol=ATOL)
  # the hidden state is the head's input: head(hidden) reproduces the logits
  np.testing.assert_allclose(np.asarray(hidden) @ head, np.asarray(logits), rtol=0, atol=1e-4)


def test_commit_path_then_step_equals_sequential_decoding(untied):
  """tree_step, commit a different path per row (root included; 0 to all of its nodes), then
  step on: the logits equal stepping the committed tokens and the continuation one by one, and
  the committed K/V sit in the cache's contiguous slots."""
  model, params = untied
  seq = random_tokens(model, (2, 8), seed=3)
  nodes = random_tokens(model, (2, len(PARENTS)), seed=4)
  cont = random_tokens(model, (2, 3), seed=5)
  depth, _ = tree_structure(PARENTS)
  d = int(depth.max()) + 1
  leaf = int(np.argmax(depth))  # the deepest node: a full path
  branch = [i for i in range(len(PARENTS)) if depth[i] == 2 and node_path(PARENTS, i)[1] != 1][0]
  for paths, n_accept in (([leaf, branch], [5, 3]), ([branch, leaf], [2, 0])):
    idx = np.zeros((2, d), np.int32)
    for r, node in enumerate(paths):
      chain = node_path(PARENTS, node)
      idx[r, :len(chain)] = chain
      idx[r, len(chain):] = chain[-1]
    cache = prefilled(model, params, seq)
    _, tree_cache = model.tree_step(params, jnp.asarray(nodes), cache, PARENTS)
    committed = model.commit_path(tree_cache, jnp.asarray(idx), jnp.asarray(n_accept))
    np.testing.assert_array_equal(np.asarray(committed["length"]), PROMPTS + n_accept)
    got, _ = step_one_by_one(model, params, committed, cont)
    for r in range(2):
      kept = nodes[r, idx[r, :n_accept[r]]]
      row_seq = np.concatenate([kept, cont[r]])[None]
      c1 = prefilled(model, params, seq[r:r + 1].repeat(2, 0))  # batch 2: one compiled shape
      want, c1 = step_one_by_one(model, params, c1, row_seq.repeat(2, 0))
      np.testing.assert_allclose(got[r], want[r, n_accept[r]:], rtol=0, atol=ATOL,
                                 err_msg=f"row {r}, n_accept {n_accept[r]}")
      end = PROMPTS[r] + n_accept[r]
      np.testing.assert_allclose(np.asarray(committed["k"][:, r, :, :end]),   # [L, B, Hkv, S, D]
                                 np.asarray(c1["k"][:, r, :, :end]), rtol=0, atol=ATOL)


def test_return_hidden_keeps_logits_and_matches_the_forward(model_params):
  model, params = model_params
  seq = jnp.asarray(random_tokens(model, (2, 8), seed=6))
  logits, hidden = model(params, seq, return_hidden=True)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(params, seq)))
  lengths = jnp.full((2,), 8, jnp.int32)
  p_logits, p_hidden, _ = model.prefill(params, seq, model.init_cache(2, 8), lengths,
                                        return_hidden=True)
  np.testing.assert_allclose(np.asarray(p_hidden), np.asarray(hidden), rtol=0, atol=ATOL)
  head = np.asarray(lm_head_matrix(model, params))
  np.testing.assert_allclose(np.asarray(hidden) @ head, np.asarray(logits), rtol=0, atol=1e-4)


def test_heads_follow_eq_1_and_start_as_the_lm_head():
  model = TransformerLM(TINY)
  params = model.init_params(0)
  heads, hp = medusa_heads(model, params, num_heads=3)
  hidden = jax.random.normal(jax.random.key(0), (2, 5, TINY.hidden_size))
  # freshly initialised: W_1 = 0, so every head is the target's LM head
  out = np.asarray(heads(hp, hidden))
  assert out.shape == (2, 5, 3, TINY.vocab_size)
  want = np.asarray(hidden) @ np.asarray(lm_head_matrix(model, params))
  for k in range(3):
    np.testing.assert_allclose(out[:, :, k], want, rtol=0, atol=1e-5)
  # random weights, two residual layers: numpy eq. 1 applied twice
  heads2 = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=11, num_layers=2))
  keys = jax.random.split(jax.random.key(1), 3)
  hp2 = {"w_res": 0.3 * jax.random.normal(keys[0], (2, 2, 8, 8)),
         "b_res": 0.3 * jax.random.normal(keys[1], (2, 2, 8)),
         "w_out": jax.random.normal(keys[2], (2, 8, 11))}
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 8)), np.float64)
  got = np.asarray(heads2(hp2, jnp.asarray(x, jnp.float32)))
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  for k in range(2):
    h = x
    for layer in range(2):
      h = h + silu(h @ np.asarray(hp2["w_res"][k, layer]) + np.asarray(hp2["b_res"][k, layer]))
    np.testing.assert_allclose(got[:, k], h @ np.asarray(hp2["w_out"][k]), rtol=1e-5, atol=1e-5)


def test_bad_input_raises():
  model = TransformerLM(TINY)
  params = model.init_params(0)
  cache = model.init_cache(2, 16)
  toks = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(TypeError, match="parents"):
    model.tree_step(params, toks, cache, [-1, 0, 0])
  with pytest.raises(ValueError, match="parents"):
    model.tree_step(params, toks, cache, (-1, 0, 2))
  with pytest.raises(ValueError, match="parents"):
    model.tree_step(params, toks, cache, (0, 0, 1))
  with pytest.raises(ValueError, match="tokens"):
    model.tree_step(params, toks, cache, (-1, 0))
  with pytest.raises(ValueError, match="tokens"):
    model.tree_step(params, jnp.zeros((2, 17), jnp.int32), cache, (-1,) + tuple(range(16)))
  with pytest.raises(ValueError, match="cache"):
    model.tree_step(params, jnp.zeros((3, 3), jnp.int32), cache, (-1, 0, 0))
  with pytest.raises(TypeError, match="return_hidden"):
    model.step(params, toks, cache, return_hidden=1)
  idx = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="n_accept"):
    model.commit_path(cache, idx, jnp.asarray([4, 0]))
  with pytest.raises(ValueError, match="node_indices"):
    model.commit_path(cache, jnp.zeros((3, 3), jnp.int32), jnp.asarray([1, 1]))
  with pytest.raises(ValueError, match="node_indices"):
    model.commit_path(cache, jnp.full((2, 3), 16, jnp.int32), jnp.asarray([1, 1]))
  with pytest.raises(ValueError, match="num_heads"):
    MedusaConfig(num_heads=0)
  heads, _ = medusa_heads(model, params, num_heads=2)
  with pytest.raises(ValueError, match="lm_head"):
    heads.init_params(0, jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="head_params"):
    heads.check_params({"w_res": jnp.zeros(1), "b_res": jnp.zeros(1), "w_out": jnp.zeros(1)})
