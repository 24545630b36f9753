"""`generate(..., check_finite=True)`: the first non-finite logits are reported by position, row
and (jaxinf families) layer; off, the compiled loop is the unchecked one.

The expected position and row are worked out independently of the checker: from a bigram chain
whose greedy path is known by construction (one row reaches a NaN row of the table earlier than
another; a row that already met EOS feeds the NaN pad token and must not be reported), and for a
tiny transformer from the finite model's own greedy tokens (a NaN embedding row of a token first
generated at position k makes the logits at k + 1 non-finite, and nothing before). The layer comes
from the NaN planted in one layer's weight. With the check on, a finite run returns exactly the
unchecked result; with it off a NaN passes through unreported (the documented policy) and the
traced loop carries no finiteness test.
"""

from __future__ import annotations

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.decoding import generate as generate_module
from jaxinf.decoding.generate import NonFiniteLogitsError, diagnose_nonfinite, generate
from jaxinf.decoding.sampling import SamplerConfig

from .bigram import BigramModel
from .families import tiny_model

V = 16
EOS = 7
NAN_TOKEN = 9
# greedy successor of each token; 0 (the pad id) and NAN_TOKEN have NaN rows
SUCCESSOR = {1: 2, 2: 3, 3: NAN_TOKEN, 4: EOS, 5: 6, 6: NAN_TOKEN, EOS: 1, 8: 1}


@pytest.fixture(scope="module")
def chain():
  table = np.full((V, V), -4.0, np.float32)
  for tok, nxt in SUCCESSOR.items():
    table[tok, nxt] = 4.0
  table[0] = np.nan
  table[NAN_TOKEN, 3] = np.inf
  table[NAN_TOKEN, 5] = np.nan
  return BigramModel(V), {"table": jnp.asarray(table)}


def expected_first_bad(prompts, n):
  """(position, row) of the first non-finite logits of live rows, by walking the chain."""
  found = []
  for row, prompt in enumerate(prompts):
    tok = prompt[-1]
    for pos in range(n):
      if tok in (0, NAN_TOKEN):
        found.append((pos, row))
        break
      tok = SUCCESSOR[tok]
      if tok == EOS:
        break
  return min(found) if found else None


# row 0 ends at EOS on its first token and then feeds the pad id (a NaN row) every step: not
# reported; row 1 reaches the NaN row after one token, row 2 after three.
PROMPTS = [[4], [5, 6], [1]]


def test_position_and_row_of_the_first_non_finite_logits(chain):
  model, params = chain
  pos, row = expected_first_bad(PROMPTS, 6)
  assert (pos, row) == (1, 1)
  with pytest.raises(NonFiniteLogitsError) as info:
    generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=6, eos_id=EOS,
             check_finite=True)
  message = str(info.value)
  assert re.search(rf"\bposition {pos} \(row {row};", message), message
  # a model without a (params, tokens) forward gets no layer, and says nothing wrong about it
  assert "layer" not in message


@pytest.mark.parametrize("prompts", [[[1]], [[2], [8]], [[4], [1]]])
def test_later_positions_and_other_rows(chain, prompts):
  model, params = chain
  pos, row = expected_first_bad(prompts, 6)
  with pytest.raises(NonFiniteLogitsError, match=rf"\bposition {pos} \(row {row};"):
    generate(model, params, prompts, jax.random.key(0), max_new_tokens=6, eos_id=EOS,
             check_finite=True)


def test_rows_that_never_meet_a_non_finite_value_pass(chain):
  model, params = chain
  out = generate(model, params, [[4], [4, 4]], jax.random.key(0), max_new_tokens=6, eos_id=EOS,
                 check_finite=True)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], [EOS, EOS])
  np.testing.assert_array_equal(np.asarray(out.lengths), [1, 1])


def test_off_the_nan_passes_through_unreported(chain):
  model, params = chain
  out = generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=6, eos_id=EOS)
  assert not np.isfinite(np.asarray(out.surprise)).all()


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _while_carry_sizes(jaxpr):
  """The carry size of every while loop in `jaxpr`, nested ones included."""
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      sizes.append(len(eqn.outvars))
    for sub in _sub_jaxprs(eqn.params):
      sizes += _while_carry_sizes(sub)
  return sizes


def test_off_the_loop_has_no_finiteness_test(chain):
  model, params = chain
  prompts = jnp.asarray([[1, 2]], jnp.int32)
  lengths = jnp.asarray([2], jnp.int32)
  traced = {}
  for flag in (False, True):
    traced[flag] = jax.make_jaxpr(lambda p, t, n, k, flag=flag: generate_module._generate(
        model, p, t, n, k, sampler=SamplerConfig(temperature=0.7, top_k=3), max_new_tokens=4,
        eos_id=EOS, pad_id=0, cap=8, emit=None, check_finite=flag))(
            params, prompts, lengths, jax.random.key(0))
  off, on = (str(traced[f]) for f in (False, True))
  assert "is_finite" not in off and "is_finite" in on
  loops_off, loops_on = (sorted(_while_carry_sizes(traced[f].jaxpr)) for f in (False, True))
  assert loops_off and len(loops_on) == len(loops_off)
  # the decode loop (the largest carry) gains the first-bad position per row, nothing else
  assert loops_on == loops_off[:-1] + [loops_off[-1] + 1], (loops_off, loops_on)


# --- a real family: the layer is named ----------------------------------------------------------

@pytest.fixture(scope="module")
def transformer():
  return tiny_model("transformer", vocab_size=V)


def _poison(params, path, index=0):
  """A copy of `params` with one NaN in the leaf at `path` ('layers/1/self_attn/v_proj/kernel')."""
  def visit(p, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
    if name != path:
      return leaf
    visit.hit = True
    return leaf.at[np.unravel_index(index, leaf.shape)].set(jnp.nan)
  visit.hit = False
  out = jax.tree_util.tree_map_with_path(visit, params)
  assert visit.hit, path
  return out


TPROMPTS = [[1, 2, 3, 4], [5, 6]]


def test_a_nan_weight_in_one_layer_is_named(transformer):
  model, params = transformer
  bad = _poison(params, "layers/1/self_attn/v_proj/kernel")
  with pytest.raises(NonFiniteLogitsError) as info:
    generate(model, bad, TPROMPTS, jax.random.key(0), max_new_tokens=4, check_finite=True)
  message = str(info.value)
  # every row's prompt passes layer 1: the first non-finite logits are the prefill's, row 0
  assert "position 0 (row 0;" in message, message
  assert "layer 1 (self_attn/v_proj/kernel)" in message, message
  assert "layers/1/self_attn/v_proj/kernel" in message, message


def test_a_nan_appearing_mid_generation_is_found_at_its_position(transformer):
  """A NaN embedding row for a token the model first generates at position k (and that no prompt
  holds): the logits are finite up to k and non-finite at k + 1, in the row that generated it."""
  model, params = transformer
  ref = generate(model, params, TPROMPTS, jax.random.key(0), max_new_tokens=6)
  tokens = np.asarray(ref.tokens)
  in_prompts = {0} | {t for p in TPROMPTS for t in p}  # 0: the pad id fills row 1's prompt
  firsts = {}
  for row in range(tokens.shape[0]):
    for pos, tok in enumerate(tokens[row, :-1]):
      firsts.setdefault(int(tok), []).append((pos, row))
  candidates = sorted((min(v), t) for t, v in firsts.items() if t not in in_prompts)
  assert candidates, tokens  # the tiny model's greedy tokens include one no prompt holds
  (pos, row), tok = candidates[0]
  bad = _poison(params, "embed_tokens/embedding", index=tok * params["embed_tokens"][
      "embedding"].shape[1])
  with pytest.raises(NonFiniteLogitsError) as info:
    generate(model, bad, TPROMPTS, jax.random.key(0), max_new_tokens=6, check_finite=True)
  message = str(info.value)
  assert f"position {pos + 1} (row {row};" in message, message
  assert f"token id {tok})" in message, message
  assert "embed_tokens/embedding" in message, message


def test_finite_runs_are_identical_with_the_check_on_and_off(transformer):
  model, params = transformer
  sampler = SamplerConfig(temperature=0.8, top_k=6, repetition_penalty=1.3)
  kw = {"max_new_tokens": 6, "sampler": sampler, "eos_id": 2}
  off = generate(model, params, TPROMPTS, jax.random.key(3), **kw)
  on = generate(model, params, TPROMPTS, jax.random.key(3), check_finite=True, **kw)
  for a, b in zip(off, on):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["transformer", "mamba"])
def test_the_diagnosis_names_the_layer_and_raises_no_false_alarm(family):
  model, params = tiny_model(family, vocab_size=V)
  tokens = np.asarray([[1, 2, 3, 4, 5]], np.int32)
  assert diagnose_nonfinite(model, params, tokens) is None
  path = {"transformer": "layers/1/mlp/up_proj/kernel", "mamba": "layers/1/mixer/in_proj/kernel"}
  found = diagnose_nonfinite(model, _poison(params, path[family]), tokens)
  assert found is not None and f"layer 1 ({path[family].split('/', 2)[2]})" in found, found


def test_an_overflow_from_finite_inputs_is_reported():
  """An inf made from finite values (not a -inf mask passed along) counts as non-finite."""

  class Overflow:
    vocab_size = V

    def __call__(self, params, tokens):
      return jax.nn.one_hot(tokens, V) * params["scale"] * 1e30

  found = diagnose_nonfinite(Overflow(), {"scale": jnp.float32(1e10)}, np.ones((1, 2), np.int32))
  assert found is not None and "mul" in found, found
