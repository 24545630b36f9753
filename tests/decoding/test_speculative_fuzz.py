"""Hypothesis fuzz of `speculative_generate` (issue 12): a named error, or well-formed output.

A request is a valid prompt kind, a key kind and one of three valid configurations (greedy with
gamma 2; top-k sampling with the heuristic gamma schedule, gamma_init and an EOS; top-p sampling
with a greedy draft sampler and a draft-confidence cut), plus at most a couple of faults drawn
from: gamma (0, negative, float, bool, string, None, huge), gamma_schedule and gamma_init out of
range, draft_confidence outside [0, 1] / NaN / a string, a draft over another vocabulary, a
params dict in the model's place, missing draft params, target and draft samplers with
out-of-range or stateful settings (repetition penalty, Mirostat), eos/pad ids outside the
vocabulary, max_new_tokens and max_len out of range, bad prompts (empty, ids outside the
vocabulary, floats, 1-D, lengths past the row) and bad keys (an int, a batch of keys).

The outcome must be one of: a ValueError/TypeError whose message starts with an argument's name
("gamma: ...", "draft: ..."), or tokens of shape [B, max_new_tokens] inside the vocabulary,
lengths in [1, max_new_tokens], pad_id after each row's end, and counters that add up (accepted
<= drafted, at least one target call per row). Never another exception. A request with no
fault must run and one with a fault that the docstrings rule out must be refused. Every valid
request compiles one of the three configurations (prompts share one padded shape), so the whole
run is three compilations plus the checks.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.speculative import speculative_generate

from .families import tiny_model

V = 16
NAMED = re.compile(r"^[A-Za-z_][A-Za-z_0-9, ]*:")
TARGET, TARGET_PARAMS = tiny_model("transformer", vocab_size=V)
DRAFT, DRAFT_PARAMS = tiny_model("transformer", vocab_size=V, seed=1)
OTHER_VOCAB, OTHER_PARAMS = tiny_model("transformer", vocab_size=V - 4, seed=1)

# Every valid prompt kind pads to [2, 4] with longest length 4: one cache size, one compilation.
PROMPTS = {
    "lists": [[1, 2, 3, 4], [5, 6, 7, 8]],
    "ragged": [[1, 2, 3, 4], [5, 6]],
    "array": np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32),
    "array+lengths": (np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32), np.array([4, 2])),
}
VALID_PROMPTS = sorted(PROMPTS)
BAD_PROMPTS = {
    "bad lengths": (np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int32), np.array([5, 2])),
    "empty batch": [],
    "empty prompt": [[], [1, 2]],
    "id >= V": [[1, 2, V], [1, 2, 3]],
    "negative id": [[1, -2, 3]],
    "float": np.ones((2, 4), np.float32),
    "1-D": np.ones((4,), np.int32),
}

CONFIGS = {
    "greedy": dict(gamma=2, max_new_tokens=3),
    "top-k heuristic": dict(gamma=3, max_new_tokens=3, gamma_schedule="heuristic", gamma_init=1,
                            eos_id=1, sampler=dict(temperature=0.8, top_k=4)),
    "top-p confident": dict(gamma=2, max_new_tokens=3, draft_confidence=0.3, pad_id=2,
                            sampler=dict(temperature=1.0, top_p=0.9),
                            draft_sampler=dict(temperature=0.0)),
}

# field -> fault label -> the value put in its place. Each is outside what the docstrings allow.
FAULTS = {
    "gamma": {"0": 0, "-1": -1, "2.0": 2.0, "True": True, "'2'": "2", "None": None,
              "huge": 10**6},
    "gamma_schedule": {"bogus": "bogus", "None": None, "Fixed": "Fixed"},
    "gamma_init": {"0": 0, "gamma+1": "gamma+1", "1.5": 1.5},
    "draft_confidence": {"-0.1": -0.1, "1.5": 1.5, "nan": math.nan, "'0.5'": "0.5"},
    "draft": {"other vocab": "other vocab", "params dict": "params dict"},
    "draft_params": {"None": None, "other shapes": "other shapes"},
    "sampler": {"temperature -1": dict(temperature=-1.0), "temperature nan": dict(temperature=math.nan),
                "top_k 0": dict(top_k=0), "top_k > V": dict(top_k=V + 1),
                "top_p 1.5": dict(top_p=1.5), "repetition penalty": dict(repetition_penalty=1.3),
                "mirostat": dict(mirostat=2), "dict": "dict"},
    "draft_sampler": {"mirostat": dict(mirostat=2), "top_k > V": dict(top_k=V + 1),
                      "string": "greedy"},
    "eos_id": {"-1": -1, "V": V, "2.0": 2.0},
    "pad_id": {"-1": -1, "V": V, "None": None},
    "max_new_tokens": {"0": 0, "-1": -1, "2.0": 2.0, "None": None},
    "max_len": {"too small": 5, "float": 12.5, "past context": 1000},
    "prompts": {k: k for k in BAD_PROMPTS},
    "key": {"int": 0, "batch": "batch", "None": None},
}


@st.composite
def requests(draw):
  """(prompt kind, config, faults as ((field, label), ...)); no fault half the time."""
  n_faults = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
  fields = draw(st.permutations(sorted(FAULTS)))[:n_faults]
  faults = tuple((f, draw(st.sampled_from(sorted(FAULTS[f])))) for f in fields)
  return draw(st.sampled_from(VALID_PROMPTS)), draw(st.sampled_from(sorted(CONFIGS))), faults


def _sampler(value):
  return SamplerConfig(**value) if isinstance(value, dict) else value


def _arguments(prompt_kind, config, faults):
  """The positional models/params and keyword arguments of the call."""
  kw = dict(CONFIGS[config])
  target, target_params, draft, draft_params = TARGET, TARGET_PARAMS, DRAFT, DRAFT_PARAMS
  prompts, key = PROMPTS[prompt_kind], jax.random.key(0)
  for field, label in faults:
    value = FAULTS[field][label]
    if field == "draft":
      draft, draft_params = ((OTHER_VOCAB, OTHER_PARAMS) if value == "other vocab"
                             else (DRAFT_PARAMS, DRAFT_PARAMS))
    elif field == "draft_params":
      draft_params = OTHER_PARAMS if value == "other shapes" else None
    elif field == "prompts":
      prompts = BAD_PROMPTS[value]
    elif field == "key":
      key = jax.random.split(key, 2) if value == "batch" else value
    elif field == "gamma_init" and value == "gamma+1":
      kw["gamma_init"] = kw["gamma"] + 1 if isinstance(kw["gamma"], int) else 2
    elif field == "sampler" and isinstance(value, dict):
      kw["sampler"] = dict(kw.get("sampler", {}), **value)
    else:
      kw[field] = value
  if isinstance(prompts, tuple):
    prompts, kw["prompt_lengths"] = prompts
  return target, target_params, draft, draft_params, prompts, key, kw


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(("lists", "greedy", ()))
@example(("ragged", "top-k heuristic", ()))
@example(("array+lengths", "top-p confident", ()))
@example(("lists", "greedy", (("gamma", "huge"),)))
@example(("lists", "top-p confident", (("draft_confidence", "'0.5'"),)))
@example(("array", "greedy", (("draft", "other vocab"),)))
def test_speculative_is_named_error_or_well_formed(request):
  faults = request[2]
  target, target_params, draft, draft_params, prompts, key, kw = _arguments(*request)
  max_new, pad_id = kw["max_new_tokens"], kw.get("pad_id", 0)
  try:
    for name in ("sampler", "draft_sampler"):
      if name in kw:
        kw[name] = _sampler(kw[name])
    out = speculative_generate(target, target_params, draft, draft_params, prompts, key, **kw)
  except (TypeError, ValueError) as e:
    message = str(e)
    event(f"refused: {message.split(':')[0]}")
    assert NAMED.match(message), f"unnamed {type(e).__name__} for {request}: {message}"
    assert faults, f"refused a valid request {request}: {message}"
    return
  event("generated")
  assert not faults, f"accepted {request}"
  tokens = np.asarray(out.tokens)
  rows = len(prompts)
  assert tokens.shape == (rows, max_new), (tokens.shape, request)
  lengths = np.asarray(out.lengths)
  assert ((lengths >= 1) & (lengths <= max_new)).all(), request
  emitted = np.arange(max_new)[None, :] < lengths[:, None]
  assert ((tokens >= 0) & (tokens < V))[emitted].all(), request
  assert (tokens[~emitted] == pad_id).all(), request  # after EOS: padding
  drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
  assert ((accepted >= 0) & (accepted <= drafted)).all(), request
  assert (np.asarray(out.target_calls)[lengths > 1] >= 1).all(), request  # a round ran
  assert (np.asarray(out.rejected) <= np.asarray(out.target_calls)).all(), request
