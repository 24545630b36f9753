"""The arithmetic generator and its exact verifier: hand-written cases, round trips of generated
problems, and the canonical solution checked by Python's own evaluation of the expression."""

from __future__ import annotations

import pytest

from jaxinf.data import arithmetic as A
from jaxinf.data.tokenizer import ByteTokenizer

P = A.Problem((37, 5, 12, 4), ("+", "*", "-"))   # 37 + 5*12 - 4 = 93


def test_hand_written_problem():
  assert P.expression == "37+5*12-4"
  assert P.prompt == "Q:37+5*12-4=\nA:"
  assert P.solution == "5*12=60;37+60=97;97-4=93;#93"
  assert P.answer == 93


@pytest.mark.parametrize("completion, labels", [
    ("5*12=60;37+60=97;97-4=93;#93", [True, True, True, True]),
    ("5*12=61;37+61=98;98-4=94;#94", [False, False, False, False]),   # arithmetic slip
    ("37+5=42;42*12=504;504-4=500;#500", [False, False, False, False]),  # precedence broken
    ("5*12=60;60-4=56;37+56=93;#93", [True, False, False, False]),  # right answer, illegal step
    ("5*12=60;37+60=97;97-4=93;#94", [True, True, True, False]),    # wrong final answer
    ("5*12=60;37+60=97;#97", [True, True, False]),                  # stopped before the end
    ("5*12=60;37+60=97;97-4=93;93", [True, True, True, False]),     # no answer mark
    ("5 * 12=60", [False]),
])
def test_step_labels_hand_written(completion, labels):
  assert A.step_labels(P, completion) == labels


def test_any_legal_multiplication_order_is_accepted():
  p = A.Problem((2, 3, 4, 5), ("*", "+", "*"))   # 2*3 + 4*5 = 26
  assert A.step_labels(p, "4*5=20;2*3=6;6+20=26;#26") == [True] * 4
  assert A.step_labels(p, "2*3=6;4*5=20;6+20=26;#26") == [True] * 4
  # + before the multiplications are done is not legal, even with the right sum
  assert A.step_labels(p, "2*3=6;6+4=10;10*5=50;#50") == [True, False, False, False]
  q = A.Problem((9, 4, 8), ("-", "-"))           # left to right: (9-4)-8 = -3
  assert A.step_labels(q, "9-4=5;5-8=-3;#-3") == [True, True, True]
  assert A.step_labels(q, "4-8=-4;9--4=13;#13")[0] is False


def test_partial_solutions():
  assert A.step_labels(P, "5*12=60;37+6", finished=False) == [True]
  assert A.prefix_correct(P, "5*12=60;37+6")          # the trailing half step is not judged
  assert not A.prefix_correct(P, "5*12=70;37+6")
  assert A.prefix_correct(P, "")
  assert A.parse_answer("5*12=60;#9", finished=False) is None   # '#9' may be cut from '#93'
  assert A.parse_answer("5*12=60;#93") == 93
  assert A.answer_correct(P, "#93")                    # the outcome verifier checks the answer only
  assert not A.answer_correct(P, "#93", finished=False)


@pytest.mark.parametrize("cfg", [A.ArithmeticConfig(), A.ArithmeticConfig(2, 6, 99, ("-", "*"))])
def test_generated_problems_round_trip(cfg):
  tok = ByteTokenizer()
  for p in A.sample_problems(cfg, 300, seed=1):
    assert cfg.min_operands <= len(p.operands) <= cfg.max_operands
    assert set(p.ops) <= set(cfg.ops) and max(p.operands) <= cfg.max_operand
    assert A.parse_problem(p.prompt) == p
    assert p.answer == eval(p.expression)               # Python's own precedence
    assert all(A.step_labels(p, p.solution))
    ids = A.encode_example(p, tok)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    text, finished = A.decode_completion(ids[len(A.encode_prompt(p, tok)):] + [tok.pad_id] * 3)
    assert finished and text == p.solution and A.answer_correct(p, text)
  assert A.sample_problems(cfg, 5, seed=3) == A.sample_problems(cfg, 5, seed=3)


def test_bad_input():
  with pytest.raises(ValueError, match="ops"):
    A.ArithmeticConfig(ops=("/",))
  with pytest.raises(ValueError, match="min_operands"):
    A.ArithmeticConfig(min_operands=3, max_operands=2)
  with pytest.raises(ValueError, match="max_operand"):
    A.ArithmeticConfig(max_operand=0)
  with pytest.raises(ValueError, match="operands, ops"):
    A.Problem((1, 2), ())
  with pytest.raises(ValueError, match="operands"):
    A.Problem((1, -2), ("+",))
  with pytest.raises(ValueError, match="n:"):
    A.sample_problems(A.ArithmeticConfig(), 0, seed=0)
  with pytest.raises(ValueError, match="prompt"):
    A.parse_problem("Q:1+=\nA:")
  with pytest.raises(TypeError, match="completion"):
    A.step_labels(P, b"5*12=60")
