"""The copy data of `LMTrainConfig.copy` (`jaxinf.train.lm.CopyTask`): each mixing rule against a
direct check of what it must produce, and bad input refused by name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.recipes import code_models
from jaxinf.train.lm import CopyTask, LMTrainConfig, copy_windows, train_lm
from jaxinf.models import families

T = 97
B = 64


def run(task, windows, seed=0):
  return np.asarray(jax.jit(copy_windows, static_argnums=2)(jax.random.key(seed), windows, task))


def test_repeat_windows_are_periodic_random_tokens_and_the_rest_untouched():
  task = CopyTask(repeat_windows=0.5, min_period=5, max_period=40, token_low=300, token_high=400)
  windows = np.tile(np.arange(T, dtype=np.int32), (B, 1))   # every token < 300
  out = run(task, windows)
  replaced = (out >= 300).all(1)
  assert ((out < 300).all(1) | replaced).all()              # a window is replaced whole or not
  np.testing.assert_array_equal(out[~replaced], windows[~replaced])
  assert 15 < replaced.sum() < 49                           # p = 0.5 of 64 (5 sigma: 12-52)
  periods = []
  for row in out[replaced]:
    # the smallest p with row[t] == row[t - p] for every t >= p is the drawn period
    p = next(p for p in range(1, T) if (row[p:] == row[:-p]).all())
    periods.append(p)
    assert 5 <= p <= 40
    assert len(set(row[:p].tolist())) > p // 2            # random tokens, not a constant run
  assert len(set(periods)) > 5


@pytest.mark.parametrize("random_span", [0.0, 1.0])
def test_a_span_is_copied_from_an_earlier_place_to_a_later_one(random_span):
  task = CopyTask(spans=1, min_span=4, max_span=30, random_span=random_span, token_low=500,
                  token_high=600)
  windows = np.tile(np.arange(T, dtype=np.int32), (B, 1))   # token == position: copies show
  out = run(task, windows, seed=3)
  lengths, gaps = [], []
  for row in out:
    if random_span:   # the source is refilled with tokens >= 500, and copied: two equal runs
      runs = np.flatnonzero(row >= 500)
      length = len(runs) // 2
      src, dst = runs[0], runs[length]
      assert (runs[:length] == src + np.arange(length)).all()
      assert (runs[length:] == dst + np.arange(length)).all()
      np.testing.assert_array_equal(row[src:src + length], row[dst:dst + length])
    else:             # the positions whose token is not their own are one run, holding src + i
      moved = np.flatnonzero(row != np.arange(T))
      length, dst = len(moved), moved[0]
      src = row[dst]
      assert (moved == dst + np.arange(length)).all()
      np.testing.assert_array_equal(row[dst:dst + length], src + np.arange(length))
    assert 4 <= length <= 30 and src + length <= dst and dst + length <= T
    keep = np.ones(T, bool)
    keep[dst:dst + length] = False
    if random_span:
      keep[src:src + length] = False
    np.testing.assert_array_equal(row[keep], np.arange(T)[keep])
    lengths.append(length)
    gaps.append(dst - src - length)
  assert min(lengths) < 10 and max(lengths) > 24            # the range is drawn, not one length
  assert min(gaps) < 10 and max(gaps) > 40


def test_several_spans_compose():
  task = CopyTask(spans=3, min_span=4, max_span=8, random_span=1.0, token_low=500, token_high=600)
  out = run(task, np.tile(np.arange(T, dtype=np.int32), (B, 1)), seed=1)
  assert ((out >= 500).sum(1) >= 8).all()                   # at least one span and its copy
  assert ((out >= 500).sum(1) > 16).mean() > 0.5            # most rows hold more than one


def test_the_copy_task_reaches_training_and_leaves_the_corpus_windows_alone(tmp_path):
  """Same seed on a random corpus: a copy task that replaces no window (probability 1e-12) trains
  to the very weights of no copy task, so the corpus windows drawn are the same ones; a task that
  replaces every window trains to other weights."""
  model, params = families.build("transformer-tiny")
  corpus = np.random.default_rng(0).integers(0, model.vocab_size, 400).astype(np.int32)
  base = dict(steps=2, batch_size=2, seq_len=16, checkpoint_every=2)

  def trained(name, copy):
    state, _ = train_lm(model, params, corpus, cfg=LMTrainConfig(**base, copy=copy),
                        out_dir=tmp_path / name, progress=False)
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]

  plain = trained("plain", None)
  for a, b in zip(plain, trained("never", CopyTask(repeat_windows=1e-12, max_period=8, token_high=64))):
    np.testing.assert_array_equal(a, b)
  always = trained("always", CopyTask(repeat_windows=1.0, max_period=8, token_high=64))
  assert any(not np.array_equal(a, b) for a, b in zip(plain, always))


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeat_windows=1.5), "^repeat_windows"),
    (dict(spans=1, random_span=-0.1), "^random_span"),
    (dict(spans=-1), "^spans"),
    (dict(spans=1, min_span=0), "^min_span"),
    (dict(spans=1, min_span=9, max_span=8), "^max_span"),
    (dict(repeat_windows=1.0, min_period=9, max_period=8), "^max_period"),
    (dict(spans=1, token_low=5, token_high=5), "^token_high"),
    (dict(), "^repeat_windows, spans"),
    (dict(repeat_windows=True), "^repeat_windows"),
])
def test_bad_copy_tasks_are_refused_by_name(kwargs, match):
  with pytest.raises(ValueError, match=match):
    CopyTask(**kwargs)


def test_copy_tasks_that_do_not_fit_the_windows_or_the_vocab_are_refused(tmp_path):
  with pytest.raises(ValueError, match="^max_period"):
    LMTrainConfig(seq_len=15, copy=CopyTask(repeat_windows=1.0, max_period=16))
  with pytest.raises(ValueError, match="^max_span"):
    LMTrainConfig(seq_len=15, copy=CopyTask(spans=1, max_span=9))
  with pytest.raises(TypeError, match="^copy"):
    LMTrainConfig(copy={"spans": 1})
  model, params = families.build("transformer-tiny")
  cfg = LMTrainConfig(steps=1, batch_size=1, seq_len=16,
                      copy=CopyTask(spans=1, max_span=8, token_high=model.vocab_size + 1))
  with pytest.raises(ValueError, match="^token_high"):
    train_lm(model, params, np.zeros(100, np.int32), cfg=cfg, out_dir=tmp_path)
  assert not list(tmp_path.iterdir())


def tiny_window_lm(**kwargs):
  return code_models.WindowLM(hidden_size=16, num_layers=1, max_len=32, train_steps=2,
                              batch_size=2, seq_len=32, **kwargs)


def test_window_lm_warms_up_on_copies_then_trains_on_code_and_guards_its_folder(tmp_path):
  recipe = tiny_window_lm(copy_warmup_steps=2, copy_warmup_batch=2, copy_warmup_len=16,
                          copy=CopyTask(spans=1, max_span=8))
  warm, code = recipe.train_configs()
  assert warm.copy == CopyTask(repeat_windows=1.0, min_period=8, max_period=8, token_low=32,
                               token_high=127)
  assert (warm.steps, warm.batch_size, warm.seq_len) == (2, 2, 16)
  assert code.copy == recipe.copy and code.seq_len == 32
  corpus = np.random.default_rng(0).integers(0, 256, 2000).astype(np.int32)
  _, params, records = code_models.window_lm(recipe, corpus, tmp_path, progress=False)
  assert (tmp_path / "copy_warmup" / "checkpoints").exists()
  assert [r["step"] for r in records] == [1, 2]             # the code phase's records
  # reused, not retrained: the same weights come back
  _, again, _ = code_models.window_lm(recipe, corpus, tmp_path, progress=False)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="^out_dir: .* another recipe"):
    code_models.window_lm(tiny_window_lm(), corpus, tmp_path, progress=False)
  (tmp_path / "recipe.json").unlink()
  with pytest.raises(ValueError, match="^out_dir: .* unrecorded recipe"):
    code_models.window_lm(recipe, corpus, tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(copy_warmup_steps=-1), ValueError, "copy_warmup_steps"),
    (dict(copy_warmup_len=0), ValueError, "copy_warmup_len"),
    (dict(copy={"spans": 1}), TypeError, "^copy"),
    (dict(copy=CopyTask(spans=1, max_span=17)), ValueError, "^max_span"),
])
def test_bad_window_lm_recipes_are_refused_by_name(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    tiny_window_lm(**kwargs)
