"""Procedurally generated arithmetic with step-by-step solutions and an exact verifier.

A problem is an integer expression over `+ - *` with the usual precedence (multiplications first,
then additions and subtractions left to right). Its text, in bytes for `ByteTokenizer`:

    Q:37+5*12-4=
    A:5*12=60;37+60=97;97-4=93;#93

The prompt is everything up to and including `A:`; the solution is a sequence of steps, each one
binary operation `x op y=z` on the current expression, separated by `;` (the step delimiter a
process scorer scores partial solutions at), and a final step `#<answer>` followed by EOS.

The verifier is exact and independent of the generator's own solution: it replays the steps on the
expression. A step is *legal* if it reduces an operation that precedence allows next (any `*`
between two numbers — multiplication is associative and binds tighter — or, once no `*` is left,
the leftmost `+`/`-`), quotes that operation's current operands and computes its result exactly.
`step_labels` says, after each step of a (partial) solution, whether every step so far is legal
and correct — the labels a process reward model learns (Lightman et al. 2023, "Let's verify step
by step", with exact labels instead of human ones); `answer_correct` checks only the final answer
(the outcome verifier of repeated sampling, Brown et al. 2024).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxinf.data.tokenizer import ByteTokenizer

OPS = ("+", "-", "*")
STEP_DELIMITER = ";"
ANSWER_MARK = "#"
_STEP = re.compile(r"(-?\d+)([+*-])(\d+)=(-?\d+)")
_ANSWER = re.compile(r"#(-?\d+)")
_PROMPT = re.compile(r"Q:(\d+(?:[+*-]\d+)+)=\nA:")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Difficulty: expressions of `min_operands..max_operands` operands drawn uniformly from
  `[0, max_operand]` joined by operators drawn uniformly from `ops`."""

  min_operands: int = 2
  max_operands: int = 4
  max_operand: int = 20
  ops: tuple[str, ...] = OPS

  def __post_init__(self):
    for name in ("min_operands", "max_operands", "max_operand"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.min_operands < 2 or self.max_operands < self.min_operands:
      raise ValueError(f"min_operands, max_operands: expected 2 <= min <= max, got "
                       f"{self.min_operands}, {self.max_operands}")
    if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
      raise ValueError(f"ops: expected distinct operators from {OPS}, got {self.ops!r}")


def apply_op(x: int, op: str, y: int) -> int:
  if op == "+":
    return x + y
  if op == "-":
    return x - y
  if op == "*":
    return x * y
  raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def next_legal(ops: list[str]) -> list[int]:
  """Indices i of the operations `ops[i]` (between numbers i and i+1) that may be reduced next."""
  mults = [i for i, op in enumerate(ops) if op == "*"]
  return mults if mults else ([0] if ops else [])


@dataclasses.dataclass(frozen=True)
class Problem:
  operands: tuple[int, ...]
  ops: tuple[str, ...]

  def __post_init__(self):
    if len(self.operands) < 2 or len(self.ops) != len(self.operands) - 1:
      raise ValueError(f"operands, ops: expected n >= 2 operands and n - 1 ops, got "
                       f"{len(self.operands)} and {len(self.ops)}")
    if any(op not in OPS for op in self.ops):
      raise ValueError(f"ops: expected operators from {OPS}, got {self.ops!r}")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.operands):
      raise ValueError(f"operands: expected non-negative ints, got {self.operands!r}")

  @property
  def expression(self) -> str:
    out = str(self.operands[0])
    for op, x in zip(self.ops, self.operands[1:]):
      out += f"{op}{x}"
    return out

  @property
  def prompt(self) -> str:
    return f"Q:{self.expression}=\nA:"

  def steps(self) -> list[tuple[int, str, int, int]]:
    """The canonical reduction: the leftmost legal operation each time, as (x, op, y, x op y)."""
    nums, ops, out = list(self.operands), list(self.ops), []
    while ops:
      i = next_legal(ops)[0]
      z = apply_op(nums[i], ops[i], nums[i + 1])
      out.append((nums[i], ops[i], nums[i + 1], z))
      nums[i: i + 2], ops[i: i + 1] = [z], []
    return out

  @property
  def answer(self) -> int:
    return self.steps()[-1][3]

  @property
  def solution(self) -> str:
    """Steps and final answer, without the EOS that ends them in token form."""
    steps = "".join(f"{x}{op}{y}={z}{STEP_DELIMITER}" for x, op, y, z in self.steps())
    return f"{steps}{ANSWER_MARK}{self.answer}"


def sample_problems(cfg: ArithmeticConfig, n: int, seed: int) -> list[Problem]:
  """`n` problems drawn with numpy's PCG64 seeded by `seed` (the same list on every machine)."""
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n: expected a positive int, got {n!r}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(cfg.min_operands, cfg.max_operands + 1))
    operands = tuple(int(x) for x in rng.integers(0, cfg.max_operand + 1, size=k))
    ops = tuple(cfg.ops[int(i)] for i in rng.integers(0, len(cfg.ops), size=k - 1))
    out.append(Problem(operands, ops))
  return out


def parse_problem(prompt: str) -> Problem:
  """The problem of a prompt `Q:<expression>=\\nA:`."""
  m = _PROMPT.fullmatch(prompt)
  if m is None:
    raise ValueError(f"prompt: expected 'Q:<expression>=\\nA:', got {prompt!r}")
  parts = re.split(r"([+*-])", m.group(1))
  return Problem(tuple(int(x) for x in parts[0::2]), tuple(parts[1::2]))


def _check_step(nums: list[int], ops: list[str], text: str) -> bool:
  """Applies step `text` to (nums, ops) in place if it is legal and correct; returns whether."""
  m = _STEP.fullmatch(text)
  if m is None:
    return False
  x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
  for i in next_legal(ops):
    if (nums[i], ops[i], nums[i + 1]) == (x, op, y):
      if apply_op(x, op, y) != z:
        return False
      nums[i: i + 2], ops[i: i + 1] = [z], []
      return True
  return False


def step_labels(problem: Problem, completion: str, *, finished: bool = True) -> list[bool]:
  """Whether the solution is still correct after each of its steps (prefix-closed: once False,
  False after). Steps are the `;`-separated segments; the last segment counts only if `finished`
  (the completion ended, with EOS), and then it must be the answer step `#<value>` with the
  expression fully reduced to that value. An unfinished trailing segment is not labelled."""
  if not isinstance(completion, str):
    raise TypeError(f"completion: expected str, got {type(completion).__name__}")
  segments = completion.split(STEP_DELIMITER)
  if not finished:
    segments = segments[:-1]
  nums, ops = list(problem.operands), list(problem.ops)
  labels, ok = [], True
  for j, seg in enumerate(segments):
    last = finished and j == len(segments) - 1
    if ok:
      if last:
        m = _ANSWER.fullmatch(seg)
        ok = m is not None and not ops and int(m.group(1)) == nums[0]
      else:
        ok = _check_step(nums, ops, seg)
    labels.append(ok)
  return labels


def prefix_correct(problem: Problem, completion: str, *, finished: bool = False) -> bool:
  """True while every complete step of `completion` is legal and correct (vacuously for none)."""
  labels = step_labels(problem, completion, finished=finished)
  return all(labels)


def parse_answer(completion: str, *, finished: bool = True) -> int | None:
  """The final answer of a completion: the integer after `#` in its last segment, or None when
  the completion does not end in an answer step (or did not finish: `#9` cut short of `#93`)."""
  if not isinstance(completion, str):
    raise TypeError(f"completion: expected str, got {type(completion).__name__}")
  if not finished:
    return None
  m = _ANSWER.fullmatch(completion.split(STEP_DELIMITER)[-1])
  return int(m.group(1)) if m else None


def answer_correct(problem: Problem, completion: str, *, finished: bool = True) -> bool:
  """The outcome verifier: the (finished) completion's final answer equals the problem's value."""
  return parse_answer(completion, finished=finished) == problem.answer


# --- token form ---------------------------------------------------------------------------------

def encode_example(problem: Problem, tok: ByteTokenizer = ByteTokenizer()) -> list[int]:
  """BOS, prompt, solution, EOS: one training example."""
  return tok.encode(problem.prompt + problem.solution, bos=True, eos=True)


def encode_prompt(problem: Problem, tok: ByteTokenizer = ByteTokenizer()) -> list[int]:
  return tok.encode(problem.prompt, bos=True)


def training_stream(problems: list[Problem], tok: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
  """The examples concatenated into one int32 token stream (for `jaxinf.train.lm.train_lm`)."""
  return np.concatenate([np.asarray(encode_example(p, tok), np.int32) for p in problems])


def decode_completion(tokens, tok: ByteTokenizer = ByteTokenizer()) -> tuple[str, bool]:
  """(text, finished) of generated ids: the text before the first EOS (or all of it), and
  whether an EOS ended it. Padding and other special ids are dropped."""
  ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
  finished = tok.eos_id in ids
  if finished:
    ids = ids[: ids.index(tok.eos_id)]
  return tok.decode(ids), finished
