"""Shared cases for the training-free decoders' tests (test_lookup.py, test_jacobi.py): greedy
references from plain `generate` (computed once per process), the closed-form distribution of
a bigram model's first tokens for the chi-square tests, and a biased acceptance rule as their
negative control."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.decoding import draft_verify
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.verify import probs, verify

from .bigram import BigramModel
from .families import tiny_model
from .stats import chi_square_pvalue

MAX_NEW = 24
# ragged prompts: row 0 repeats a 5-gram, row 1 is short, row 2 repeats a 4-gram
PROMPTS = ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], [7, 8, 7], [9, 10, 11, 12, 9, 10, 11])
# an EOS each family's greedy output reaches early in one row, late or never in the others
EOS = {"transformer": 14, "rwkv7": 15}


@functools.cache
def greedy_reference(family: str):
  """(model, params, tokens [B, MAX_NEW], lengths [B]) of greedy `generate` with EOS."""
  model, params = tiny_model(family)
  out = generate(model, params, list(PROMPTS), jax.random.key(0), max_new_tokens=MAX_NEW,
                 eos_id=EOS[family])
  return model, params, np.asarray(out.tokens), np.asarray(out.lengths)


def check_greedy_and_counters(family: str, decode, **kwargs) -> np.ndarray:
  """Runs `decode` greedily on PROMPTS; asserts tokens and lengths equal `generate`'s and the
  counters are consistent. Returns the accepted counts."""
  model, params, ref_tokens, ref_lengths = greedy_reference(family)
  assert ref_lengths.min() < MAX_NEW, "the EOS must end some row early for this test to bite"
  out = decode(model, params, list(PROMPTS), jax.random.key(0), max_new_tokens=MAX_NEW,
               eos_id=EOS[family], **kwargs)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
  np.testing.assert_array_equal(np.asarray(out.lengths), ref_lengths)
  calls, drafted, accepted = (np.asarray(x) for x in (out.target_calls, out.drafted,
                                                      out.accepted))
  assert (accepted <= drafted).all() and (accepted >= 0).all()
  # the first token comes from prefill; each target call emits its accepted drafts and one more
  assert (ref_lengths >= calls + 1).all()
  assert (ref_lengths <= calls + accepted + 1).all()
  return accepted


# --- the bigram model's exact distribution --------------------------------------------------

V = 6
SAMPLER = SamplerConfig(temperature=0.9, top_k=5)
ROWS = 6000


@functools.cache
def bigram():
  model = BigramModel(vocab_size=V)
  return model, model.init_params(jax.random.key(3), scale=1.0)


def transition(params) -> np.ndarray:
  """P[a, b] = p(b | a): the sampler's distribution, computed here with numpy (top-k, then
  softmax of logits / T)."""
  logits = np.asarray(params["table"], np.float64) / SAMPLER.temperature
  kth = np.sort(logits, axis=1)[:, -SAMPLER.top_k][:, None]
  logits = np.where(logits >= kth, logits, -np.inf)
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def pvalues(tokens: np.ndarray, last: int, params) -> tuple[float, float]:
  """Chi-square p-values of the joint law of tokens 1-3 and of tokens 2-4 of each row, against
  the bigram chain started at `last`."""
  p = transition(params)
  first = p[last]
  joint123 = first[:, None, None] * p[:, :, None] * p[None, :, :]
  second = first @ p
  joint234 = second[:, None, None] * p[:, :, None] * p[None, :, :]
  t = np.asarray(tokens)
  cell123 = (t[:, 0] * V + t[:, 1]) * V + t[:, 2]
  cell234 = (t[:, 1] * V + t[:, 2]) * V + t[:, 3]
  return (chi_square_pvalue(cell123, joint123.ravel()),
          chi_square_pvalue(cell234, joint234.ravel()))


def check_transition_is_the_samplers():
  """The numpy law above is the one `generate` samples from (`verify.probs`)."""
  _, params = bigram()
  got = np.asarray(probs(SAMPLER, params["table"]))
  np.testing.assert_allclose(got, transition(params), rtol=1e-5, atol=1e-7)


def sample_rows(drafter, prompt: list[int], key: int, rule=None):
  """`ROWS` copies of `prompt` decoded 4 tokens by `drafter` (and an optional acceptance `rule`)
  in one call; the output and the chi-square p-values of tokens 1-3 and 2-4 (`pvalues`)."""
  model, params = bigram()
  checked = draft_verify.check_inputs(model, np.tile(prompt, (ROWS, 1)), None, max_new_tokens=4,
                                      sampler=SAMPLER, eos_id=None, pad_id=0, max_len=None,
                                      step_tokens=drafter.draft_len + 1)
  out = draft_verify.run_checked(model, params, checked, jax.random.key(key), drafter,
                                 sampler=SAMPLER, max_new_tokens=4, eos_id=None, pad_id=0,
                                 rule=rule)
  return out, pvalues(out.tokens, prompt[-1], params)


def no_residual(key, p, drafts, n_draft, q):
  """Biased (K = 1): min(1, p/q) acceptance like `verify`, but the token after a rejection drawn
  from p instead of the residual norm(max(0, p - q)), so a rejected draft can come back."""
  n_accept, _ = verify(key, p[:, 0], drafts[:, 0], None if q is None else q[:, 0], n_draft[:, 0])
  p_n = p[jnp.arange(p.shape[0]), 0, n_accept]
  nxt = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p_n), axis=-1)
  return jnp.zeros_like(n_accept), n_accept, nxt.astype(jnp.int32)
