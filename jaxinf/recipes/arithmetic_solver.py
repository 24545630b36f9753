"""The arithmetic inference-scaling study's recipe: the solver LM and the process scorer's data.

The solver is any SequenceModel trained by next-token prediction (`jaxinf.train.lm.train_lm`) on a
stream of procedurally generated problems with their step-by-step solutions
(`jaxinf.data.arithmetic`).

The process scorer (`jaxinf.train.process_scorer`: a SequenceModel of the same family read as a
binary classifier of partial solutions, Lightman et al. 2023; Puri et al. 2025 Sec. 3) learns from
`scorer_examples`: the solver's own samples on training problems, cut at each step boundary — after
a `;` or at EOS — and labelled by the exact step verifier (`jaxinf.data.arithmetic.step_labels`),
so the scorer learns the solver's actual mistakes. It starts from the solver's weights (a
fine-tune, as PRMs usually start from the policy).
"""

from __future__ import annotations

import os

import numpy as np

from jaxinf.data import arithmetic
from jaxinf.data.tokenizer import ByteTokenizer
from jaxinf.train.lm import LMTrainConfig, train_lm


def train_solver(model, params, problems: list[arithmetic.Problem], *, cfg: LMTrainConfig,
                 out_dir: str | os.PathLike, progress: bool = True):
  """Next-token training on the problems' worked solutions (BOS question answer EOS,
  concatenated)."""
  return train_lm(model, params, arithmetic.training_stream(problems), cfg=cfg, out_dir=out_dir,
                  progress=progress)


def scorer_examples(problems: list[arithmetic.Problem], completions, *,
                    tok: ByteTokenizer = ByteTokenizer()) -> dict[str, np.ndarray]:
  """Process-scorer data from sampled completions.

  `completions[i]` is a list of generated id sequences for `problems[i]`. Every sample is cut after
  each of its steps (after each `;`, and at EOS); each cut is one example, labelled by
  `step_labels`: is every step up to here legal and correct. Returns right-padded `tokens` `[M, L]`
  (BOS, prompt, the cut, as the scorer sees it in the particle filter), `lengths` `[M]`, `labels`
  `[M]` (0/1) and `problem` `[M]` (the problem index, for splits by problem).
  """
  if len(completions) != len(problems):
    raise ValueError(f"completions: expected one list per problem ({len(problems)}), got "
                     f"{len(completions)}")
  seqs, labels, which = [], [], []
  delim = ord(arithmetic.STEP_DELIMITER)
  for i, (problem, samples) in enumerate(zip(problems, completions)):
    prompt = arithmetic.encode_prompt(problem, tok)
    for ids in samples:
      ids = [int(t) for t in ids]
      text, finished = arithmetic.decode_completion(ids, tok)
      step_ok = arithmetic.step_labels(problem, text, finished=finished)
      if finished:
        ids = ids[: ids.index(tok.eos_id) + 1]
      cuts = [j + 1 for j, t in enumerate(ids) if t == delim or t == tok.eos_id]
      for cut, ok in zip(cuts, step_ok):
        seqs.append(prompt + ids[:cut])
        labels.append(int(ok))
        which.append(i)
  if not seqs:
    raise ValueError("completions: no complete step to label")
  lengths = np.array([len(s) for s in seqs], np.int32)
  tokens = np.full((len(seqs), int(lengths.max())), tok.pad_id, np.int32)
  for j, s in enumerate(seqs):
    tokens[j, : len(s)] = s
  return {"tokens": tokens, "lengths": lengths, "labels": np.array(labels, np.int32),
          "problem": np.array(which, np.int32)}
