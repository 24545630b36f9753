"""Medusa-1 training: the loss against the paper's formula written in numpy, training lowers the
heads' held-out loss and raises their accuracy on a tiny frozen target, and resume is exact."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.models.medusa import MedusaConfig, MedusaHeads, medusa_heads
from jaxinf.models.transformer import TransformerLM, transformer_config
from jaxinf.decoding.sampling import GREEDY
from jaxinf.train.medusa import (MedusaTrainConfig, head_accuracy, medusa_loss,
                                 target_features, train_medusa,
                                 train_medusa_self_distilled)
from jaxinf.train.draft import target_text
from jaxinf.train.step import OptimizerConfig

CFG = MedusaTrainConfig(num_heads=3, steps=40, batch_size=8, seq_len=16, checkpoint_every=20,
                        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=5,
                                                  weight_decay=0.0))


@pytest.fixture(scope="module")
def target():
  model = TransformerLM(transformer_config("transformer-tiny", init_std=0.3))
  return model, model.init_params(0)


def periodic_corpus(n: int, period: int = 7, seed: int = 0) -> np.ndarray:
  """A stream repeating `period` distinct tokens: token t + k + 1 is a function of token t, so a
  head reading the target's hidden state at t can learn it."""
  cycle = np.random.default_rng(seed).permutation(64)[:period]
  return np.tile(cycle, n // period + 1)[:n].astype(np.int32)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("labels", ["corpus", "target"])
def test_loss_is_the_papers_weighted_sum(labels):
  """Σ_k 0.8^k CE(head k at t, y_{t+k+1}) (or the target's soft label at t + k), in numpy."""
  heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=5))
  keys = jax.random.split(jax.random.key(0), 5)
  hp = {"w_res": 0.3 * jax.random.normal(keys[0], (2, 1, 8, 8)),
        "b_res": 0.3 * jax.random.normal(keys[1], (2, 1, 8)),
        "w_out": jax.random.normal(keys[2], (2, 8, 5))}
  b, t = 3, 4
  hidden = jax.random.normal(keys[3], (b, t, 8))
  windows = jax.random.randint(keys[4], (b, t + 3), 0, 5)
  tlogits = jax.random.normal(jax.random.key(9), (b, t + 2, 5))
  loss, per_head = medusa_loss(heads, hp, hidden, windows, tlogits, decay=0.8, labels=labels)
  logp = log_softmax(np.asarray(heads(hp, hidden), np.float64))  # [B, T, K, V]
  w, tl = np.asarray(windows), np.asarray(tlogits, np.float64)
  want = []
  for k in (1, 2):
    ce = []
    for r in range(b):
      for s in range(t):
        if labels == "corpus":
          ce.append(-logp[r, s, k - 1, w[r, s + k + 1]])
        else:
          soft = np.exp(log_softmax(tl[r, s + k]))
          ce.append(-(soft * logp[r, s, k - 1]).sum())
    want.append(np.mean(ce))
  np.testing.assert_allclose(np.asarray(per_head), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.8 * want[0] + 0.64 * want[1], rtol=1e-5)


def test_training_lowers_the_heads_loss(target, tmp_path):
  model, params = target
  corpus = periodic_corpus(4000)
  heldout = periodic_corpus(400, seed=0)[3:]  # same cycle, other phase
  windows = jnp.asarray(np.stack([heldout[i * 20:i * 20 + 20] for i in range(8)]))

  def heldout_loss(heads, hp):
    hidden, logits = target_features(model, params, windows, 3)
    return float(medusa_loss(heads, hp, hidden, windows, logits, decay=0.8, labels="corpus")[0])

  _, hp0 = medusa_heads(model, params, num_heads=3)  # the initialisation training starts from
  heads, hp, records = train_medusa(model, params, corpus, CFG, tmp_path / "run", progress=False)
  before, after = heldout_loss(heads, hp0), heldout_loss(heads, hp)
  assert after < 0.3 * before, (before, after)
  assert np.mean([r["loss"] for r in records[-5:]]) < 0.3 * records[0]["loss"]
  acc = head_accuracy(model, params, heads, hp, heldout, seq_len=16, max_windows=8, top=2)
  assert acc["corpus"].shape == (3, 2) and (acc["corpus"][:, 0] > 0.9).all(), acc


def test_resume_is_exact(target, tmp_path):
  model, params = target
  corpus = periodic_corpus(2000, seed=1)
  cfg = dataclasses.replace(CFG, steps=4, checkpoint_every=2, labels="target")
  _, straight, rec_a = train_medusa(model, params, corpus, cfg, tmp_path / "a", progress=False)
  train_medusa(model, params, corpus, dataclasses.replace(cfg, steps=2), tmp_path / "b",
               progress=False)
  _, resumed, rec_b = train_medusa(model, params, corpus, cfg, tmp_path / "b", progress=False)
  assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_raises(target, tmp_path):
  model, params = target
  with pytest.raises(ValueError, match="labels"):
    MedusaTrainConfig(labels="soft")
  with pytest.raises(ValueError, match="decay"):
    MedusaTrainConfig(decay=0.0)
  with pytest.raises(ValueError, match="num_heads"):
    MedusaTrainConfig(num_heads=0)
  with pytest.raises(ValueError, match="corpus"):
    train_medusa(model, params, np.arange(10, dtype=np.int32), CFG, tmp_path)
  with pytest.raises(ValueError, match="corpus"):
    train_medusa(model, params, np.full(100, 64, np.int32), CFG, tmp_path)
  with pytest.raises(TypeError, match="cfg"):
    train_medusa(model, params, periodic_corpus(100), {"steps": 1}, tmp_path)


def test_target_text_is_prompts_then_the_targets_text(target):
  """Each row of the stream is a corpus window followed by the target's own greedy continuation
  (checked by argmax over the cache-free forward), cut after EOS."""
  model, params = target
  corpus = periodic_corpus(500, seed=2)
  stream = target_text(model, params, corpus, jax.random.key(0), num_prompts=3,
                                    prompt_len=5, new_tokens=6, samplers=(GREEDY,),
                                    batch_size=2, eos_id=None)
  assert stream.shape == (3 * 11,)
  for row in stream.reshape(3, 11):
    assert any((corpus[s:s + 5] == row[:5]).all() for s in range(len(corpus) - 5))
    seq = row[:5].copy()
    for _ in range(6):
      seq = np.append(seq, np.argmax(np.asarray(model(params, jnp.asarray(seq[None])))[0, -1]))
    np.testing.assert_array_equal(row, seq)
  eos = int(stream[7])  # the third generated token of row 0 as EOS: row 0 ends there
  cut = target_text(model, params, corpus, jax.random.key(0), num_prompts=3,
                                 prompt_len=5, new_tokens=6, samplers=(GREEDY,), batch_size=2,
                                 eos_id=eos)
  first_eos = 5 + int(np.argmax(stream[5:11] == eos))
  np.testing.assert_array_equal(cut[:first_eos + 1], stream[:first_eos + 1])
  assert len(cut) < len(stream)


def test_self_distilled_train_or_load_reuses_its_folder(target, tmp_path):
  model, params = target
  cfg = dataclasses.replace(CFG, steps=2, checkpoint_every=2, seq_len=8)
  corpus = periodic_corpus(300, seed=3)
  kw = dict(num_prompts=2, prompt_len=8, new_tokens=16, progress=False)
  _, hp, rec = train_medusa_self_distilled(model, params, corpus, cfg, tmp_path, **kw)
  stream = np.load(tmp_path / "self_distill.npy")
  assert stream.shape == (2 * 2 * (8 + 16),)  # two samplers, no EOS given
  # a second call loads the finished heads (no step runs: another corpus changes nothing)
  _, hp2, rec2 = train_medusa_self_distilled(model, params, corpus[::-1].copy(), cfg, tmp_path,
                                             **kw)
  assert rec2 == rec
  for a, b in zip(jax.tree.leaves(hp), jax.tree.leaves(hp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bad", [dict(num_prompts=0), dict(prompt_len=0), dict(new_tokens=-1)])
def test_target_text_bad_sizes_refused(target, bad):
  model, params = target
  with pytest.raises(ValueError, match=next(iter(bad))):
    target_text(model, params, periodic_corpus(50), jax.random.key(0),
                **{**dict(num_prompts=1, prompt_len=4, new_tokens=2), **bad})
