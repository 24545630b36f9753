"""LM training and bits per byte against closed forms, on a bigram model and a synthetic stream."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxinf.data.stdlib_code import is_heldout, load_corpus, stdlib_files
from jaxinf.train.lm import LMTrainConfig, bits_per_byte, train_lm
from jaxinf.train.step import OptimizerConfig
from tests.decoding.bigram import BigramModel

V = 8


def transitions(seed=0):
  return np.random.default_rng(seed).dirichlet(np.full(V, 0.3), size=V)


def markov_stream(n, trans=None, seed=0):
  """A first-order Markov chain with a known transition matrix."""
  trans = transitions() if trans is None else trans
  rng = np.random.default_rng(seed + 1)
  x = np.empty(n, np.int64)
  x[0] = 0
  u = rng.random(n)
  cum = trans.cumsum(1)
  for i in range(1, n):
    x[i] = min(np.searchsorted(cum[x[i - 1]], u[i]), V - 1)
  return x.astype(np.int32), trans


def test_bits_per_byte_equals_the_exact_cross_entropy():
  model = BigramModel(vocab_size=V)
  params = model.init_params(jax.random.key(0), scale=1.0)
  stream, _ = markov_stream(4097)
  table = np.asarray(params["table"], np.float64)
  logp = table - np.log(np.exp(table).sum(1, keepdims=True))
  expected = -np.mean(logp[stream[:-1], stream[1:]]) / math.log(2)
  got = bits_per_byte(model, params, stream, seq_len=64, batch_size=7)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_training_reaches_the_entropy_rate_of_the_chain(tmp_path):
  """A bigram model trained on a Markov chain predicts held-out text of the chain as well as the
  true transition matrix does (the best possible model), on the same held-out sample."""
  stream, trans = markov_stream(50_000)
  heldout, _ = markov_stream(20_001, trans, seed=7)
  true_ce = -np.mean(np.log2(trans[heldout[:-1], heldout[1:]]))
  model = BigramModel(vocab_size=V)
  cfg = LMTrainConfig(steps=300, batch_size=16, seq_len=64, checkpoint_every=300,
                      optimizer=OptimizerConfig(learning_rate=0.1, warmup_steps=10,
                                                weight_decay=0.0))
  state, records = train_lm(model, model.init_params(jax.random.key(1), 0.0), stream, cfg=cfg,
                            out_dir=tmp_path, progress=False)
  assert records[0]["loss"] == pytest.approx(math.log(V), rel=1e-5)  # uniform start
  bpb = bits_per_byte(model, state["params"], heldout, seq_len=64)
  # the fitted table differs from the truth by O(1/sqrt(50k)) per entry: it may win or lose by a
  # few thousandths of a bit on a finite sample, and is within 0.02 bits of the optimum
  assert -0.01 < bpb - true_ce < 0.02, (bpb, true_ce)


def test_stdlib_corpus_split_by_whole_files():
  train, held = load_corpus()
  assert train.dtype == np.int32 and train.max() <= 257 and held.size > 100_000
  files = stdlib_files()
  assert not any("test" in f.parts for f in files)
  names = [str(f) for f in files]
  held_names = [n for n in names if is_heldout(n.split("python3.")[-1][3:], 0.05)]
  assert 0 < len(held_names) < len(names)
