"""Hypothesis fuzz of `generate` (issue 12): a named error, or finite, correctly shaped output.

Draws prompts (token lists, ragged lists, arrays with and without `prompt_lengths`, empty
batches, ids outside the vocabulary, float arrays), `max_new_tokens`, the key (a key, an int, a
batch of keys), a sampler (valid settings and out-of-range ones: temperature 1e-40 / NaN / -1,
top-k 0, top-p 0 / 1.5 / NaN, a repetition penalty of 1e-30, Mirostat with tau = inf), `eos_id`
and `pad_id`, always with `check_finite=True` on a finite model. The outcome must be one of: a
ValueError/TypeError whose message starts with an argument's name ("prompts: ...",
"temperature: ..."), or tokens of shape [B, max_new_tokens] inside the vocabulary, lengths in
[1, max_new_tokens] and finite surprise. Never another exception, never a non-finite report
from finite input. Few distinct valid shapes and samplers keep the compiled loops to a handful.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig

from .families import tiny_model

V = 16
NAMED = re.compile(r"^[A-Za-z_][A-Za-z_0-9, ]*( \(--?[a-z.-]+\))?:")
MODEL, PARAMS = tiny_model("transformer", vocab_size=V)

PROMPTS = {
    "lists": [[1, 2, 3, 4], [5, 6, 7, 8]],
    "ragged": [[1, 2, 3, 4], [5, 6]],
    "array": np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32),
    "array+lengths": (np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32), np.array([4, 2])),
    "bad lengths": (np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32), np.array([5, 2])),
    "empty batch": [],
    "empty prompt": [[], [1, 2]],
    "id >= V": [[1, 2, V], [1, 2, 3]],
    "negative id": [[1, -2, 3]],
    "float": np.ones((2, 4), np.float32),
    "1-D": np.ones((4,), np.int32),
}
SAMPLERS = {
    "greedy": dict(temperature=0.0),
    "top-k": dict(temperature=0.8, top_k=4),
    "top-p + penalty": dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3),
    "tiny temperature": dict(temperature=1e-40),
    "nan temperature": dict(temperature=float("nan")),
    "negative temperature": dict(temperature=-1.0),
    "top-k 0": dict(top_k=0),
    "top-p 0": dict(top_p=0.0),
    "top-p 1.5": dict(top_p=1.5),
    "top-p nan": dict(top_p=float("nan")),
    "tiny penalty": dict(repetition_penalty=1e-30),
    "mirostat tau inf": dict(mirostat=2, mirostat_tau=float("inf")),
}


VALID_PROMPTS = ["lists", "ragged", "array", "array+lengths"]
VALID_SAMPLERS = ["greedy", "top-k", "top-p + penalty"]


def _mostly_valid(good, every):
  """Each argument is valid three times in four, so whole requests often pass every check."""
  return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good),
                   st.sampled_from(every))


@st.composite
def requests(draw):
  return (draw(_mostly_valid(VALID_PROMPTS, sorted(PROMPTS))),
          draw(_mostly_valid([1, 3], [1, 3, 0, -1, 2.0, None])),
          draw(_mostly_valid(["key"], ["key", "int", "batch"])),
          draw(_mostly_valid(VALID_SAMPLERS, sorted(SAMPLERS))),
          draw(_mostly_valid([None, 1], [None, 1, -1, V])),
          draw(_mostly_valid([0], [0, -1, None, V])))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(("lists", 3, "key", "greedy", None, 0))
@example(("ragged", 3, "key", "top-k", 1, 0))
@example(("array+lengths", 1, "key", "top-p + penalty", None, 0))
def test_generate_is_named_error_or_well_formed(request):
  prompt_kind, max_new, key_kind, sampler_kind, eos_id, pad_id = request
  prompts, lengths = PROMPTS[prompt_kind], None
  if isinstance(prompts, tuple):
    prompts, lengths = prompts
  key = {"key": jax.random.key(0), "int": 0,
         "batch": jax.random.split(jax.random.key(0), 2)}[key_kind]
  try:
    out = generate(MODEL, PARAMS, prompts, key, max_new_tokens=max_new,
                   sampler=SamplerConfig(**SAMPLERS[sampler_kind]), eos_id=eos_id,
                   prompt_lengths=lengths, pad_id=pad_id, check_finite=True)
  except (TypeError, ValueError) as e:
    message = str(e)
    event(f"refused: {message.split(':')[0]}")
    assert NAMED.match(message), f"unnamed {type(e).__name__} for {request}: {message}"
    return
  event("generated")
  tokens = np.asarray(out.tokens)
  rows = len(prompts)
  assert tokens.shape == (rows, max_new), (tokens.shape, request)
  lengths_out = np.asarray(out.lengths)
  assert ((lengths_out >= 1) & (lengths_out <= max_new)).all(), request
  emitted = np.arange(max_new)[None, :] < lengths_out[:, None]
  assert ((tokens >= 0) & (tokens < V))[emitted].all(), request
  assert (tokens[~emitted] == pad_id).all(), request  # after EOS: padding
  assert np.isfinite(np.asarray(out.surprise)).all(), request
  assert sampler_kind in VALID_SAMPLERS, f"accepted {request}"
  assert prompt_kind in VALID_PROMPTS, f"accepted {request}"


def test_the_fuzzed_model_is_finite():
  """The fuzz's 'never a non-finite report' relies on a finite model."""
  logits = MODEL(PARAMS, jnp.asarray(PROMPTS["array"]))
  assert np.isfinite(np.asarray(logits)).all()
