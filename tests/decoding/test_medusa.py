"""Medusa decoding: greedy equals greedy `generate` token for token (sparse and full trees, EOS,
ragged prompts, typical acceptance too); exact acceptance passes a chi-square test of the emitted
tokens against the target's own distribution (computed in numpy by enumerating every
continuation), and typical acceptance — lossy — fails the same test (the negative control);
counters; bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding.generate import generate
from jaxinf.decoding.medusa import (DEFAULT_TREE, MedusaTree, medusa_generate,
                                    tree_from_accuracies, tree_from_topk)
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models.medusa import medusa_heads
from jaxinf.models.transformer import TransformerLM, transformer_config

from .bigram import BigramModel
from .stats import chi_square_pvalue

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9]]


def noisy_heads(model, params, num_heads, scale, seed):
  """LM-head-initialised heads with perturbed projections: candidates that are sometimes right."""
  heads, hp = medusa_heads(model, params, num_heads=num_heads)
  noise = jax.random.normal(jax.random.key(seed), hp["w_out"].shape)
  return heads, dict(hp, w_out=hp["w_out"] + scale * noise)


@pytest.fixture(scope="module")
def tiny():
  model = TransformerLM(transformer_config("transformer-tiny", init_std=0.3))
  params = model.init_params(0)
  heads, hp = noisy_heads(model, params, 4, 0.3, 1)
  return model, params, heads, hp


@pytest.fixture(scope="module")
def small_vocab():
  """Six tokens: every continuation can be enumerated, and a full tree covers all of them."""
  model = TransformerLM(transformer_config("transformer-tiny", vocab_size=6, init_std=0.5))
  params = model.init_params(3)
  heads, hp = noisy_heads(model, params, 2, 0.5, 2)
  return model, params, heads, hp


def test_greedy_equals_generate(tiny):
  model, params, heads, hp = tiny
  ref = generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=24)
  out = medusa_generate(model, params, heads, hp, PROMPTS, jax.random.key(5), max_new_tokens=24)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.lengths), 24)
  # the test means something only if candidates were accepted (paths longer than the root)
  assert int(out.accepted.sum()) >= 5
  assert (np.asarray(out.accepted) <= np.asarray(out.drafted)).all()
  np.testing.assert_array_equal(out.drafted, out.target_calls * (DEFAULT_TREE.num_nodes - 1))
  # each call emits 1 + accepted tokens; the first token comes from the prefill
  assert (np.asarray(out.target_calls + out.accepted) >= 23).all()

  # an EOS in the middle of row 0: both stop there, padding after it
  eos = int(ref.tokens[0, 9])
  ref = generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=24, eos_id=eos,
                 pad_id=63)
  typical = medusa_generate(model, params, heads, hp, PROMPTS, jax.random.key(5),
                            max_new_tokens=24, eos_id=eos, pad_id=63, acceptance="typical")
  np.testing.assert_array_equal(np.asarray(typical.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(typical.lengths), np.asarray(ref.lengths))
  assert int(ref.lengths[0]) <= 10


def test_greedy_full_tree_accepts_every_level(small_vocab):
  """With every continuation in the tree the greedy walk always reaches its depth: two accepted
  tokens per call, and still exactly `generate`'s tokens."""
  model, params, heads, hp = small_vocab
  tree = tree_from_topk((6, 6))
  assert tree.num_nodes == 1 + 6 + 36
  prompts = [[1, 2, 3, 4, 5], [0, 5], [3]]
  ref = generate(model, params, prompts, jax.random.key(0), max_new_tokens=13)
  out = medusa_generate(model, params, heads, hp, prompts, jax.random.key(0), max_new_tokens=13,
                        tree=tree)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.accepted), 2 * np.asarray(out.target_calls))
  np.testing.assert_array_equal(np.asarray(out.target_calls), 4)  # 1 + 4 * 3 = 13 tokens


def exact_joint(model, params, prompt, sampler, n):
  """p(x_1..x_n | prompt) of every continuation, float64, from the cache-free forward: softmax of
  logits / T over the top-k (the sampler's rule written out)."""
  v = model.vocab_size
  seqs = np.array(list(itertools.product(range(v), repeat=n)), np.int32)
  full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
  logits = np.asarray(model(params, jnp.asarray(full[:, :-1])), np.float64)
  logits = logits[:, len(prompt) - 1:] / sampler.temperature
  kth = np.sort(logits, axis=-1)[..., -sampler.top_k][..., None]
  logits = np.where(logits >= kth, logits, -np.inf)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  steps = np.take_along_axis(logp, seqs[..., None], -1)[..., 0]
  return seqs, np.exp(steps.sum(-1))


def test_exact_acceptance_matches_the_target_distribution(small_vocab):
  """The first three tokens of 4000 independent rows, drawn with a temperature/top-k sampler:
  chi-square against the exact joint over all 216 continuations. Typical acceptance (lossy)
  is rejected by the same test: the negative control."""
  model, params, heads, hp = small_vocab
  sampler = SamplerConfig(temperature=0.8, top_k=5)
  # every token at depth 1 (the drafts always decide x_2); at depth 2 every token under head 1's
  # top-3 only, so x_3 is sometimes an accepted draft and sometimes drawn after a mismatch
  tree = MedusaTree(tuple((r,) for r in range(6))
                    + tuple((r, s) for r in range(3) for s in range(6)))
  prompt = np.array([1, 2, 3], np.int32)
  n_rows = 4000
  prompts = np.tile(prompt, (n_rows, 1))
  seqs, joint = exact_joint(model, params, prompt, sampler, 3)
  assert abs(joint.sum() - 1) < 1e-9

  def cells(out):
    toks = np.asarray(out.tokens)
    return (toks[:, 0] * 36 + toks[:, 1] * 6 + toks[:, 2]).astype(np.int64)

  index = seqs[:, 0] * 36 + seqs[:, 1] * 6 + seqs[:, 2]
  probs = np.zeros(216)
  probs[index] = joint
  exact = medusa_generate(model, params, heads, hp, prompts, jax.random.key(11),
                          max_new_tokens=3, tree=tree, sampler=sampler)
  # drafts decided x_2 in every row and x_3 in many
  accepted = np.asarray(exact.accepted)
  assert (accepted >= 1).all() and 200 < (accepted == 2).sum() < n_rows - 200
  assert chi_square_pvalue(cells(exact), probs) > 1e-3
  typical = medusa_generate(model, params, heads, hp, prompts, jax.random.key(11),
                            max_new_tokens=3, tree=tree, sampler=sampler, acceptance="typical")
  assert chi_square_pvalue(cells(typical), probs) < 1e-6


def test_typical_acceptance_with_sampling_runs_and_counts(tiny):
  model, params, heads, hp = tiny
  sampler = SamplerConfig(temperature=0.7, top_p=0.9)
  out = medusa_generate(model, params, heads, hp, PROMPTS, jax.random.key(2), max_new_tokens=20,
                        sampler=sampler, acceptance="typical", typical_epsilon=0.2,
                        typical_delta=0.5)
  toks, calls = np.asarray(out.tokens), np.asarray(out.target_calls)
  assert ((toks >= 0) & (toks < model.vocab_size)).all()
  np.testing.assert_array_equal(np.asarray(out.lengths), 20)
  assert (np.asarray(out.accepted) <= np.asarray(out.drafted)).all()
  assert (calls + np.asarray(out.accepted) >= 19).all() and (calls >= 19 / 5).all()


def test_tree_builders():
  tree = tree_from_topk((2, 3))
  assert tree.num_nodes == 1 + 2 + 6 and tree.top_k == (2, 3) and tree.depth == 2
  assert tree.parents == (-1, 0, 0, 1, 1, 1, 2, 2, 2)
  acc = np.array([[0.6, 0.2, 0.1], [0.5, 0.1, 0.05]])
  # greedy by expected acceptance: 0.6, 0.6*0.5 = 0.3, 0.2, then (2,) at 0.1 ties (1, 0) at
  # 0.2*0.5 = 0.1 and wins as the shallower node
  assert set(tree_from_accuracies(acc, 4).paths) == {(0,), (0, 0), (1,), (2,)}
  assert set(tree_from_accuracies(acc, 3).paths) == {(0,), (0, 0), (1,)}
  with pytest.raises(ValueError, match="prefix-closed"):
    MedusaTree(((0,), (1, 0)))
  with pytest.raises(ValueError, match="duplicate"):
    MedusaTree(((0,), (0,)))
  with pytest.raises(ValueError, match="paths"):
    MedusaTree(((0, -1),))
  with pytest.raises(ValueError, match="sizes"):
    tree_from_topk((2, 0))
  with pytest.raises(ValueError, match="accuracy"):
    tree_from_accuracies(np.array([[1.5]]), 1)


def test_bad_input_raises(tiny):
  model, params, heads, hp = tiny
  key = jax.random.key(0)
  run = lambda **kw: medusa_generate(  # noqa: E731
      **{"model": model, "params": params, "heads": heads, "head_params": hp,
         "prompts": PROMPTS, "key": key, "max_new_tokens": 8, **kw})
  bigram = BigramModel(64)
  with pytest.raises(ValueError, match="model"):
    run(model=bigram, params=bigram.init_params(key))
  with pytest.raises(ValueError, match="acceptance"):
    run(acceptance="lossless")
  with pytest.raises(ValueError, match="typical_epsilon"):
    run(acceptance="typical", typical_epsilon=1.5)
  with pytest.raises(ValueError, match="typical_delta"):
    run(typical_delta=0.0)
  with pytest.raises(ValueError, match="tree"):
    run(tree=tree_from_topk((1, 1, 1, 1, 1)))
  with pytest.raises(TypeError, match="tree"):
    run(tree=((0,), (1,)))
  with pytest.raises(ValueError, match="sampler"):
    run(sampler=SamplerConfig(mirostat=2))
  with pytest.raises(ValueError, match="max_new_tokens"):
    run(max_new_tokens=0)
  with pytest.raises(ValueError, match="max_len"):
    run(max_len=10)
  with pytest.raises(ValueError, match="prompts"):
    run(max_new_tokens=60)  # prompt + tokens + tree nodes exceed the context of 64
  with pytest.raises(ValueError, match="prompts"):
    run(prompts=[[1, 64]])
  with pytest.raises(ValueError, match="prompt_lengths"):
    run(prompts=np.ones((2, 3), np.int32), prompt_lengths=np.array([1, 4]))
  with pytest.raises(ValueError, match="eos_id"):
    run(eos_id=64)
  with pytest.raises(TypeError, match="key"):
    run(key=0)
  other, other_hp = medusa_heads(TransformerLM(transformer_config("transformer-tiny",
                                                                  vocab_size=32)))
  with pytest.raises(ValueError, match="heads"):
    run(heads=other, head_params=other_hp)
  with pytest.raises(ValueError, match="head_params"):
    run(head_params=dict(hp, w_out=hp["w_out"][:2]))
  with pytest.raises(TypeError, match="heads"):
    run(heads=None)
