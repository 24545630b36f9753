"""generate: the compiled loop against a Python loop, ragged batches, EOS, streaming, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.data.tokenizer import ByteTokenizer
from jaxinf.decoding import sampling
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig

from .bigram import BigramModel

V = 32


@pytest.fixture(scope="module")
def model_params():
  model = BigramModel(vocab_size=V)
  return model, model.init_params(jax.random.key(0))


def python_greedy(table, prompt, n, eos=None):
  out, tok = [], prompt[-1]
  for _ in range(n):
    tok = int(np.argmax(table[tok]))
    out.append(tok)
    if tok == eos:
      break
  return out


def test_greedy_equals_python_loop_for_ragged_prompts(model_params):
  model, params = model_params
  prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
  out = generate(model, params, prompts, jax.random.key(0), max_new_tokens=12)
  table = np.asarray(params["table"])
  for row, p in enumerate(prompts):
    assert np.asarray(out.tokens[row]).tolist() == python_greedy(table, p, 12)
  assert np.asarray(out.lengths).tolist() == [12, 12, 12]


def test_rows_stop_at_their_own_eos(model_params):
  model, params = model_params
  table = np.asarray(params["table"])
  prompts = [[3], [4], [5]]
  eos = python_greedy(table, [4], 3)[-1]  # the 3rd token row 1 emits
  out = generate(model, params, prompts, jax.random.key(0), max_new_tokens=10, eos_id=eos,
                 pad_id=0)
  for row, p in enumerate(prompts):
    ref = python_greedy(table, p, 10, eos=eos)
    n = int(out.lengths[row])
    assert np.asarray(out.tokens[row, :n]).tolist() == ref
    assert (np.asarray(out.tokens[row, n:]) == 0).all()
  assert int(out.lengths[1]) == 3


def test_sampled_batch_rows_equal_the_rows_run_alone(model_params):
  """Right-padding must not leak: a prompt sampled inside a batch gives the same tokens as the
  same key restricted to... its own row-independent draws (same logits row, same key)."""
  model, params = model_params
  cfg = SamplerConfig(temperature=0.9, top_p=0.9)
  batch = generate(model, params, [[1, 2, 3], [4, 5]], jax.random.key(3), max_new_tokens=8,
                   sampler=cfg)
  # the draw for row r at step i is categorical(fold_in(key, i), logits)[r]: recompute it
  table = np.asarray(params["table"])
  for row, p in enumerate([[1, 2, 3], [4, 5]]):
    tok = p[-1]
    for i in range(8):
      logits = jnp.zeros((2, V)).at[row].set(table[tok])
      ref = sampling.sample_token(cfg, jax.random.fold_in(jax.random.key(3), i), logits, {})[0]
      tok = int(ref[row])
      assert int(batch.tokens[row, i]) == tok


def test_streaming_callback_sees_every_step(model_params):
  model, params = model_params
  seen = []
  out = generate(model, params, [[1], [2]], jax.random.key(0), max_new_tokens=6,
                 callback=lambda i, toks: seen.append((i, toks.tolist())))
  assert [i for i, _ in seen] == list(range(6))
  assert np.array([t for _, t in seen]).T.tolist() == np.asarray(out.tokens).tolist()


def test_byte_tokenizer_roundtrip():
  tok = ByteTokenizer()
  text = "def f(x):\n    return x ** 2  # ünïcödé"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
  assert tok.decode(ids) == text
  arr, lengths = tok.encode_batch(["ab", "abcd"])
  assert arr.shape == (2, 4) and lengths.tolist() == [2, 4] and arr[0, 2] == tok.pad_id


class TestBadInput:
  @pytest.mark.parametrize("kw,match", [
      (dict(prompts=[[1, 2, V]]), "prompts"),
      (dict(prompts=[[-1]]), "prompts"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(max_len=4), "max_len"),
      (dict(eos_id=V), "eos_id"),
      (dict(sampler=SamplerConfig(top_k=V + 1)), "top_k"),
      (dict(prompts=np.zeros((2, 3), np.int32), prompt_lengths=[3, 4]), "prompt_lengths"),
      (dict(prompts=np.zeros((2, 3), np.float32)), "prompts"),
  ])
  def test_raises(self, model_params, kw, match):
    model, params = model_params
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
      generate(model, params, key=jax.random.key(0), **args)

  def test_model_context(self, model_params):
    _, params = model_params
    with pytest.raises(ValueError, match="context"):
      generate(BigramModel(vocab_size=V, max_len=5), params, [[1, 2, 3]], jax.random.key(0),
               max_new_tokens=4)
