"""Every public decoding entry point refuses bad input by name, before tracing (issue 12).

Walks the issue's classes for `jaxinf.decoding` through `tests/bad_input.py`'s
`raises_before_tracing` (error type, message naming the argument, no frame inside JAX's tracing
machinery), for each of generate, speculative, Medusa, prompt lookup / trie lookahead, Jacobi /
lookahead / SJD, contrastive, EAD and the inference-scaling loops (`sample_n`,
`particle_filter`):
- keys: an int seed, a batch of typed keys, a batch of raw keys, a float array;
- models and parameters: `object()` where a model goes, params `{}` / `None` / another family's
  tree / one leaf of another shape, for every model and params argument;
- prompts: a batch of 0 rows; `pad_id=None`;
- samplers: temperature 1e-40, repetition_penalty 1e-30, Mirostat tau/eta inf or NaN;
- streaming: `callback=42` refused; an exception raised in the callback reaches the caller.
Also the other side of the max_step rule (issue class 5): a jaxinf recurrent draft whose kept
history is shorter than the block is resized and decodes exactly (greedy speculative equals the
target's greedy chain worked out in numpy), and a model that cannot be resized is refused naming
the option and the max_step it needs.
Nothing here compiles except the callback and the max_step cases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding import sampling
from jaxinf.decoding.adaptive import ead_generate
from jaxinf.decoding.contrastive import contrastive_generate
from jaxinf.decoding.generate import generate
from jaxinf.decoding.jacobi import jacobi_generate, lookahead_generate, sjd_generate
from jaxinf.decoding.lookup import prompt_lookup_generate, trie_lookahead_generate
from jaxinf.decoding.medusa import medusa_generate, tree_from_topk
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.scaling import particle_filter, sample_n
from jaxinf.decoding.speculative import speculative_generate
from jaxinf.models.medusa import medusa_heads
from tests.bad_input import raises_before_tracing

from .bigram import BigramModel
from .families import tiny_model

V = 16
PROMPTS = [[1, 2, 3], [4, 5]]


@pytest.fixture(scope="module")
def models():
  """A tiny transformer (target / expert / large) and a tiny Mamba (draft / amateur / small)."""
  t, tp = tiny_model("transformer", vocab_size=V)
  m, mp = tiny_model("mamba", vocab_size=V)
  heads, hp = medusa_heads(t, tp, num_heads=2)
  return {"t": t, "tp": tp, "m": m, "mp": mp, "heads": heads, "hp": hp}


def _score(params, tokens, lengths):
  del params, lengths
  return jnp.zeros(tokens.shape[0])


# entry point -> (function, keyword arguments beyond prompts/key/max_new_tokens as fixture names
# or values, the (model argument, its params argument) pairs)
ENTRIES = {
    "generate": (generate, {"model": "t", "params": "tp"}, [("model", "params")]),
    "speculative_generate": (
        speculative_generate,
        {"target": "t", "target_params": "tp", "draft": "m", "draft_params": "mp", "gamma": 2},
        [("target", "target_params"), ("draft", "draft_params")]),
    "medusa_generate": (
        medusa_generate,
        {"model": "t", "params": "tp", "heads": "heads", "head_params": "hp",
         "tree": tree_from_topk((2, 1))},
        [("model", "params"), (None, "head_params")]),
    "prompt_lookup_generate": (prompt_lookup_generate, {"model": "t", "params": "tp"},
                               [("model", "params")]),
    "trie_lookahead_generate": (trie_lookahead_generate, {"model": "t", "params": "tp"},
                                [("model", "params")]),
    "jacobi_generate": (jacobi_generate, {"model": "t", "params": "tp", "window": 3},
                        [("model", "params")]),
    "lookahead_generate": (lookahead_generate, {"model": "t", "params": "tp"},
                           [("model", "params")]),
    "sjd_generate": (sjd_generate, {"model": "t", "params": "tp", "window": 3},
                     [("model", "params")]),
    "contrastive_generate": (
        contrastive_generate,
        {"expert": "t", "expert_params": "tp", "amateur": "m", "amateur_params": "mp"},
        [("expert", "expert_params"), ("amateur", "amateur_params")]),
    "ead_generate": (
        ead_generate, {"small": "m", "small_params": "mp", "large": "t", "large_params": "tp"},
        [("small", "small_params"), ("large", "large_params")]),
    "sample_n": (sample_n, {"model": "t", "params": "tp", "n": 2}, [("model", "params")]),
    "particle_filter": (
        particle_filter,
        {"model": "t", "params": "tp", "n": 2, "scorer": _score, "scorer_params": None,
         "delimiter_id": 3, "eos_id": 4},
        [("model", "params")]),
}


def call(models, entry, **overrides):
  fn, defaults, _ = ENTRIES[entry]
  args = {k: models[v] if isinstance(v, str) and v in models else v for k, v in defaults.items()}
  args.update(prompts=PROMPTS, key=jax.random.key(0), max_new_tokens=3)
  args.update(overrides)
  return fn(**args)


def _reshaped(params):
  """`params` with one entry cut off the last axis of its first leaf (one leaf of another
  shape, the rest as expected)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  assert leaves[0].ndim >= 1 and leaves[0].shape[-1] > 1
  return jax.tree_util.tree_unflatten(tree, [leaves[0][..., :-1]] + leaves[1:])


KEY_CASES = {
    "int": (lambda: 0, TypeError),
    "typed_batch": (lambda: jax.random.split(jax.random.key(0), 2), ValueError),
    "raw_batch": (lambda: jax.random.split(jax.random.PRNGKey(0), 2), ValueError),
    "float": (lambda: jnp.zeros((2,), jnp.float32), TypeError),
    "none": (lambda: None, TypeError),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_key_must_be_one_prng_key(models, entry, case):
  make, error = KEY_CASES[case]
  with raises_before_tracing(error, r"^key: "):
    call(models, entry, key=make())


def test_a_legacy_raw_key_is_still_accepted():
  from jaxinf.decoding.checks import check_key
  check_key(jax.random.PRNGKey(0))
  check_key(jax.random.key(0))
  check_key(np.asarray(jax.random.PRNGKey(3)))


MODEL_ARGS = [(e, m) for e, (_, _, pairs) in ENTRIES.items() for m, _ in pairs if m]
PARAMS_ARGS = [(e, p) for e, (_, _, pairs) in ENTRIES.items() for _, p in pairs]


@pytest.mark.parametrize("entry,arg", MODEL_ARGS)
def test_a_non_model_is_refused_by_name(models, entry, arg):
  overrides = {arg: object()}
  with raises_before_tracing((TypeError, ValueError), rf"^{arg}: "):
    call(models, entry, **overrides)


@pytest.mark.parametrize("case", ["empty", "none", "other_family", "reshaped"])
@pytest.mark.parametrize("entry,arg", PARAMS_ARGS)
def test_params_of_another_tree_are_refused_by_name(models, entry, arg, case):
  _, defaults, _ = ENTRIES[entry]
  good = models[defaults[arg]]
  if case == "empty":
    bad, error = {}, ValueError
  elif case == "none":  # contrastive: an amateur without its params is a missing argument
    bad, error = None, ValueError if arg == "amateur_params" else TypeError
  elif case == "other_family":  # the transformer's params where the Mamba's go, and vice versa
    bad, error = (models["mp"] if defaults[arg] != "mp" else models["tp"]), ValueError
  else:
    bad, error = _reshaped(good), ValueError
  with raises_before_tracing(error, rf"^{arg}: "):
    call(models, entry, **{arg: bad})


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_batch_of_no_rows_is_refused(models, entry):
  with raises_before_tracing(ValueError, r"^prompts: "):
    call(models, entry, prompts=np.zeros((0, 3), np.int32))
  with raises_before_tracing(ValueError, r"^prompts: "):
    call(models, entry, prompts=[])


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_pad_id_none_is_refused(models, entry):
  with raises_before_tracing(ValueError, r"^pad_id: "):
    call(models, entry, pad_id=None)


# --- samplers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": 1e-4}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"repetition_penalty": 1e-30}, "repetition_penalty"),
    ({"repetition_penalty": 1e30}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"top_k": True}, "top_k"),
    ({"mirostat": True}, "mirostat"),
    ({"mirostat": 2, "mirostat_tau": float("inf")}, "mirostat_tau"),
    ({"mirostat": 2, "mirostat_eta": float("inf")}, "mirostat_eta"),
    ({"mirostat": 1, "mirostat_tau": float("nan")}, "mirostat_tau"),
    ({"mirostat": 1, "mirostat_eta": float("nan")}, "mirostat_eta"),
    ({"mirostat": 2, "mirostat_tau": 1e9}, "mirostat_tau"),
    ({"mirostat": 1, "mirostat_m": 2.5}, "mirostat_m"),
])
def test_sampler_bounds_are_refused_by_name(kw, name):
  with raises_before_tracing(ValueError, rf"^{name}: "):
    SamplerConfig(**kw)


def test_the_sampler_bounds_keep_logits_finite():
  """At the extreme accepted settings (temperature and repetition penalty at their minimum, a
  seen token with a large logit) the scaled logits and the draw stay finite: the bound is what
  the docstring says, not an arbitrary number."""
  cfg = SamplerConfig(temperature=sampling.MIN_TEMPERATURE,
                      repetition_penalty=sampling.MIN_REPETITION_PENALTY)
  logits = jnp.asarray([[30.0, -30.0, 0.5, 29.0]])
  seen = jnp.asarray([[True, True, False, False]])
  tok, _, surprise = sampling.sample_token(cfg, jax.random.key(0), logits,
                                           sampling.init_state(cfg, 1), seen)
  assert int(tok[0]) == 0 and np.isfinite(np.asarray(surprise)).all()


@pytest.mark.parametrize("entry", ["generate", "sample_n"])
def test_a_non_sampler_is_refused(models, entry):
  with raises_before_tracing(TypeError, r"^sampler: "):
    call(models, entry, sampler="greedy")


# --- streaming callback and flags -------------------------------------------------------------

@pytest.fixture(scope="module")
def bigram():
  model = BigramModel(V)
  return model, model.init_params(jax.random.key(1))


@pytest.mark.parametrize("callback", [42, "print", np.zeros(3)])
def test_a_non_callable_callback_is_refused(bigram, callback):
  model, params = bigram
  with raises_before_tracing(TypeError, r"^callback: "):
    generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=3, callback=callback)


@pytest.mark.parametrize("flag", [1, "yes", None, np.bool_(True)])
def test_check_finite_must_be_a_bool(bigram, flag):
  model, params = bigram
  with raises_before_tracing(TypeError, r"^check_finite: "):
    generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=3, check_finite=flag)


def test_an_exception_in_the_callback_reaches_the_caller(bigram):
  model, params = bigram
  calls = []

  def callback(step, tokens):
    calls.append(step)
    if step == 2:
      raise RuntimeError("consumer failed at step 2")

  with pytest.raises(RuntimeError, match="consumer failed at step 2"):
    generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=6, callback=callback)
  assert calls == [0, 1, 2]  # later items are dropped once the callback has failed
  # and a healthy callback after it still streams every step (the failure left no state behind)
  seen = []
  out = generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=6,
                 callback=lambda step, tokens: seen.append((step, np.asarray(tokens).copy())))
  assert [s for s, _ in seen] == list(range(6))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], 1), np.asarray(out.tokens))


# --- max_step: resized when it can be, refused by name when it cannot --------------------------

def _greedy_chain(table, prompt, n):
  out, tok = [], prompt[-1]
  for _ in range(n):
    tok = int(np.argmax(table[tok]))
    out.append(tok)
  return out


def test_a_short_recurrent_history_is_resized_to_the_block(bigram):
  """A Mamba draft keeping 4 states with gamma=4 (a 5-token verify block) used to be refused;
  it is now run with max_step 5 and greedy output is still the target's greedy chain."""
  target, tp = bigram
  draft, dp = tiny_model("mamba", vocab_size=V, max_step=4)
  assert draft.max_step == 4
  out = speculative_generate(target, tp, draft, dp, PROMPTS, jax.random.key(0),
                             max_new_tokens=7, gamma=4)
  table = np.asarray(tp["table"])
  want = [_greedy_chain(table, p, 7) for p in PROMPTS]
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want))
  assert int(np.asarray(out.drafted).sum()) > 0


@dataclasses.dataclass(frozen=True, eq=False)
class _FixedHistory(BigramModel):
  """A model whose max_step is a property, not a field: it cannot be rebuilt with a larger one."""

  @property
  def max_step(self):
    return 2


@pytest.mark.parametrize("decode,kw,arg", [
    (prompt_lookup_generate, {"draft_len": 3}, "draft_len"),
    (jacobi_generate, {"window": 3}, "window"),
])
def test_a_model_that_cannot_be_resized_is_refused_naming_the_option(decode, kw, arg):
  model = _FixedHistory(V)
  params = model.init_params(jax.random.key(0))
  with raises_before_tracing(ValueError, rf"^{arg}: .*max_step=2.*max_step >= 4"):
    decode(model, params, PROMPTS, jax.random.key(0), max_new_tokens=3, **kw)


def test_speculative_refuses_a_fixed_history_draft_naming_gamma(bigram):
  target, tp = bigram
  draft = _FixedHistory(V)
  with raises_before_tracing(ValueError, r"^gamma: .*draft's max_step=2.*max_step >= 5"):
    speculative_generate(target, tp, draft, draft.init_params(jax.random.key(0)), PROMPTS,
                         jax.random.key(0), max_new_tokens=3, gamma=4)
