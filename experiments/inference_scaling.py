"""Inference-time scaling on procedurally generated arithmetic, with an exact verifier.

    python -m experiments.inference_scaling            # ~15 min on 2 CPU cores, training included
    python -m experiments.inference_scaling --smoke    # tiny models, about a minute

It trains a small byte-level transformer on worked arithmetic solutions (`jaxinf.data.arithmetic`)
and a process scorer (`jaxinf.train.process_scorer`) on the solver's own samples, labelled by the
exact step verifier (`jaxinf.recipes.arithmetic_solver`), or reuses their finished checkpoints in
`results/inference_scaling/{solver,scorer}/`. Then, on held-out problems (none of which appears in
the training set), it draws `max(ns)` samples of every problem (all samples of a batch of problems
in one compiled `generate` call) and reports, against samples per problem N:

- accuracy of best-of-N by the scorer's final score, self-consistency (majority vote), and
  perplexity-weighted consistency, each averaged over the max(ns) / N disjoint groups of N samples;
- accuracy of particle filtering (Puri et al. 2025) with N particles and the process scorer,
  answering with the best-scoring particle or with a majority vote of the particles;
- coverage pass@N (Chen et al. 2021's unbiased estimator over all max(ns) samples) with the fitted
  exponentiated power law exp(a N^b) of Large Language Monkeys (Brown et al. 2024).

Writes `results/inference_scaling/{results.json, report.md, meta.json, accuracy.png,
coverage.png}`. No timing is reported.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.data import arithmetic
from jaxinf.data.tokenizer import ByteTokenizer
from jaxinf.decoding import scaling
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.models import families
from jaxinf.recipes import arithmetic_solver
from jaxinf.train import process_scorer
from jaxinf.train.lm import LMTrainConfig
from jaxinf.train.step import OptimizerConfig

TOK = ByteTokenizer()


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/inference_scaling"  # where results go
  task: arithmetic.ArithmeticConfig = arithmetic.ArithmeticConfig(max_operand=9)
  hidden_size: int = 64
  num_layers: int = 3
  mlp_hidden: int = 192
  # 600 steps at seq 96 left the solver at 22% sampled accuracy; 800 at seq 128 reached ~65% in a
  # calibration run: a solver that is right sometimes, not always, is what makes scaling visible
  train: LMTrainConfig = LMTrainConfig(
      steps=800, batch_size=32, seq_len=128, checkpoint_every=100,
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1))
  train_problems: int = 100_000
  scorer_train: process_scorer.ScorerTrainConfig = process_scorer.ScorerTrainConfig(steps=300)
  scorer_problems: int = 600       # training problems the scorer's labelled samples come from
  scorer_samples: int = 8          # samples per scorer problem
  test_problems: int = 300
  ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  pf_ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  pf_temperature: float = 1.0
  pf_resampling: str = "multinomial"
  temperature: float = 1.0         # sampling temperature of every method
  max_new_tokens: int = 48
  max_step_tokens: int = 16
  chunk_rows: int = 2048           # rows per compiled call (whole problems)

  def check(self) -> None:
    super().check()
    common.check_ints(self, "hidden_size", "num_layers", "mlp_hidden", "train_problems",
                      "scorer_problems", "scorer_samples", "test_problems", "ns", "pf_ns",
                      "max_new_tokens", "max_step_tokens", "chunk_rows")
    if self.hidden_size % 4:  # `build_model`: 4 query heads (2 key-value heads)
      common.refuse("hidden_size", f"expected a multiple of the 4 heads, got {self.hidden_size}")
    if any(max(self.ns) % n for n in self.ns):
      common.refuse("ns", f"every N must divide max(ns) = {max(self.ns)} (disjoint groups), got "
                          f"{self.ns}")
    common.check_numbers(self, "pf_temperature", low=0.0, low_open=True)
    common.check_choices(self, "pf_resampling", choices=scaling.RESAMPLING)
    common.check_with("temperature", lambda: SamplerConfig(temperature=self.temperature))


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, hidden_size=32, num_layers=1, mlp_hidden=64,
      train=dataclasses.replace(cfg.train, steps=4, batch_size=4, seq_len=48, checkpoint_every=2,
                                optimizer=dataclasses.replace(cfg.train.optimizer,
                                                              warmup_steps=2)),
      train_problems=500, scorer_train=dataclasses.replace(cfg.scorer_train, steps=3,
                                                           batch_size=8, checkpoint_every=2),
      scorer_problems=6, scorer_samples=2, test_problems=6, ns=(1, 2, 4), pf_ns=(1, 2),
      max_new_tokens=24, max_step_tokens=8, chunk_rows=16,
      out_dir=common.smoke_dir(cfg.out_dir)))


def build_model(cfg: Config):
  """(solver model, random params): transformer-1m narrowed to the config's width and depth."""
  return families.build(families.named_config(
      "transformer-1m", hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4,
      num_kv_heads=2, mlp_hidden=cfg.mlp_hidden, max_len=128), seed=cfg.seed)


def split_problems(cfg: Config):
  """Training problems exclude every held-out expression."""
  test = arithmetic.sample_problems(cfg.task, cfg.test_problems, cfg.seed + 2)
  held = {p.expression for p in test}
  train = [p for p in arithmetic.sample_problems(cfg.task, cfg.train_problems, cfg.seed + 1)
           if p.expression not in held]
  scorer = [p for p in arithmetic.sample_problems(cfg.task, cfg.scorer_problems, cfg.seed + 3)
            if p.expression not in held]
  return train, scorer, test


def prompt_chunks(cfg, problems, n, desc, progress):
  """(start, prompt ids [per, W], prompt lengths [per]) of whole problems, `per` = chunk_rows // n
  of them a call; the last chunk repeats its first prompt so every call has the same shape (one
  compilation)."""
  per = max(1, cfg.chunk_rows // n)
  prompts = [arithmetic.encode_prompt(p) for p in problems]
  width = max(len(p) for p in prompts)
  for start in tqdm(range(0, len(problems), per), disable=not progress, desc=desc):
    chunk = prompts[start:start + per]
    chunk = chunk + [chunk[0]] * (per - len(chunk))
    ids = np.full((per, width), TOK.pad_id, np.int32)
    for i, p in enumerate(chunk):
      ids[i, :len(p)] = p
    yield start, ids, np.array([len(p) for p in chunk], np.int32)


def draw_samples(cfg, model, params, problems, n, key, progress):
  """`n` samples per problem; whole problems per compiled call, every call the same shape."""
  out = []
  for start, ids, lengths in prompt_chunks(cfg, problems, n, f"sample n={n}", progress):
    s = scaling.sample_n(model, params, ids, jax.random.fold_in(key, start), n=n,
                         max_new_tokens=cfg.max_new_tokens,
                         sampler=SamplerConfig(temperature=cfg.temperature), eos_id=TOK.eos_id,
                         prompt_lengths=lengths, pad_id=TOK.pad_id)
    out.append(s)
  cat = [np.concatenate(x)[: len(problems)] for x in zip(*out)]
  return scaling.Samples(*cat)


def parse(problems, tokens):
  """answers [B, N], valid [B, N], correct [B, N] of generated ids [B, N, T]."""
  b, n = tokens.shape[:2]
  answers, valid, correct = np.zeros((b, n), np.int64), np.zeros((b, n), bool), np.zeros((b, n),
                                                                                          bool)
  for i, p in enumerate(problems):
    for j in range(n):
      text, fin = arithmetic.decode_completion(tokens[i, j])
      a = arithmetic.parse_answer(text, finished=fin)
      valid[i, j] = a is not None
      answers[i, j] = a if a is not None else 0
      correct[i, j] = a == p.answer
  return answers, valid, correct


def score_samples(model, params, problems, tokens, lengths, batch=1024):
  """The scorer's log p(correct) of every complete sample (prompt + completion)."""
  b, n, t = tokens.shape
  seqs, lens = [], []
  for i, p in enumerate(problems):
    prompt = arithmetic.encode_prompt(p)
    for j in range(n):
      seqs.append(prompt + [int(x) for x in tokens[i, j, :lengths[i, j]]])
  width = max(len(s) for s in seqs)
  ids = np.full((len(seqs), width), TOK.pad_id, np.int32)
  for k, s in enumerate(seqs):
    ids[k, :len(s)] = s
    lens.append(len(s))
  lens = np.array(lens, np.int32)
  fn = jax.jit(process_scorer.process_score(model))
  out = []
  for k in range(0, len(seqs), batch):
    tk, ln = ids[k:k + batch], lens[k:k + batch]
    pad = batch - len(tk)
    tk = np.concatenate([tk, np.repeat(tk[:1], pad, 0)]) if pad else tk
    ln = np.concatenate([ln, np.repeat(ln[:1], pad)]) if pad else ln
    out.append(np.asarray(fn(params, jnp.asarray(tk), jnp.asarray(ln)))[:batch - pad])
  return np.concatenate(out).reshape(b, n)


def group_accuracy(method, n, answers, valid, correct_answer, scores, logprob, lengths):
  """Accuracy of `method` with N = n, averaged over the disjoint groups of n samples."""
  total = answers.shape[1]
  accs = []
  for g in range(total // n):
    sl = slice(g * n, (g + 1) * n)
    ans, has = scaling.select_answers(method, answers[:, sl], valid[:, sl], scores=scores[:, sl],
                                      logprob=logprob[:, sl], lengths=lengths[:, sl])
    accs.append(np.mean(has & (ans == correct_answer)))
  return float(np.mean(accs))


def run_particle_filter(cfg, model, params, scorer_params, problems, n, key, progress):
  score_fn = _SCORE_FN.setdefault(model, process_scorer.process_score(model))
  outs = []
  for start, ids, lengths in prompt_chunks(cfg, problems, n, f"particles n={n}", progress):
    o = scaling.particle_filter(
        model, params, ids, jax.random.fold_in(key, start), n=n, scorer=score_fn,
        scorer_params=scorer_params, delimiter_id=ord(arithmetic.STEP_DELIMITER),
        eos_id=TOK.eos_id, max_new_tokens=cfg.max_new_tokens,
        max_step_tokens=cfg.max_step_tokens, temperature=cfg.pf_temperature,
        resampling=cfg.pf_resampling, sampler=SamplerConfig(temperature=cfg.temperature),
        prompt_lengths=lengths, pad_id=TOK.pad_id)
    outs.append(jax.tree.map(np.asarray, o))
  tokens = np.concatenate([o.tokens for o in outs])[: len(problems)]
  scores = np.concatenate([o.scores for o in outs])[: len(problems)]
  return tokens, scores


_SCORE_FN: dict = {}


def plot(out, rows, coverage, fit, ns):
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  methods = [m for m in rows[0] if m not in ("N",)]
  for m in methods:
    pts = [(r["N"], r[m]) for r in rows if isinstance(r.get(m), float)]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == "coverage" else "-")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("samples (particles) per problem N")
  ax.set_ylabel("accuracy on held-out problems")
  ax.set_title("Inference-time scaling on arithmetic")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, out / "accuracy.png")

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ks = np.arange(1, max(ns) + 1)
  ax.plot(ks, coverage, "o", ms=3, label="pass@k (unbiased, Chen et al.)")
  ax.plot(ks, fit(ks), "-", label=f"exp({fit.a:.3f} k^{fit.b:.3f})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k samples per problem")
  ax.set_ylabel("coverage")
  ax.set_title("Repeated-sampling coverage and its power-law fit")
  ax.grid(alpha=0.3)
  ax.legend()
  common.save_figure(fig, out / "coverage.png")


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  key = jax.random.key(cfg.seed)
  train, scorer_probs, test = split_problems(cfg)
  model, init_params = build_model(cfg)

  # 1. the solver
  state, _ = arithmetic_solver.train_solver(model, init_params, train, cfg=cfg.train,
                                            out_dir=out / "solver", progress=cfg.progress)
  params = state["params"]

  # 2. the process scorer, on the solver's own samples of training problems
  s = draw_samples(cfg, model, params, scorer_probs, cfg.scorer_samples,
                   jax.random.fold_in(key, 1), cfg.progress)
  data = arithmetic_solver.scorer_examples(
      scorer_probs, [[list(s.tokens[i, j, :s.lengths[i, j]]) for j in range(cfg.scorer_samples)]
                     for i in range(len(scorer_probs))])
  held = data["problem"] % 5 == 0          # a fifth of the problems held out for scorer accuracy
  if held.all():                           # (smoke: too few examples to hold any out)
    held[:] = False
  fit_data = {k: v[~held] for k, v in data.items()}
  eval_data = {k: v[held] for k, v in data.items()}
  sstate, _ = process_scorer.train_scorer(model, params, fit_data, cfg=cfg.scorer_train,
                                          out_dir=out / "scorer", progress=cfg.progress)
  scorer_params = sstate["params"]
  scorer_eval = (process_scorer.scorer_accuracy(model, scorer_params, eval_data)
                 if held.any() else {"accuracy": float("nan"), "positive_rate": float("nan")})

  # 3. repeated sampling on held-out problems
  n_max = max(cfg.ns)
  samples = draw_samples(cfg, model, params, test, n_max, jax.random.fold_in(key, 2),
                         cfg.progress)
  answers, valid, correct = parse(test, samples.tokens)
  truth = np.array([p.answer for p in test])[:, None]
  scores = score_samples(model, scorer_params, test, samples.tokens, samples.lengths)
  n_correct = correct.sum(1)
  ks = np.arange(1, n_max + 1)
  coverage = np.array([scaling.pass_at_k(np.full(len(test), n_max), n_correct, k).mean()
                       for k in ks])
  try:
    fit = scaling.fit_power_law(ks, coverage)
  except ValueError:                        # coverage all 0 or all 1 (smoke): nothing to fit
    fit = scaling.PowerLaw(float("nan"), float("nan"))

  # 4. particle filtering
  pf = {}
  for n in cfg.pf_ns:
    toks, pscores = run_particle_filter(cfg, model, params, scorer_params, test, n,
                                        jax.random.fold_in(key, 100 + n), cfg.progress)
    pans, pvalid, _ = parse(test, toks)
    best, has = scaling.select_answers("best_of_n", pans, pvalid, scores=pscores)
    vote, vhas = scaling.self_consistency(pans, pvalid)
    pf[n] = (float(np.mean(has & (best == truth[:, 0]))),
             float(np.mean(vhas & (vote == truth[:, 0]))))

  rows = []
  for n in sorted(set(cfg.ns) | set(cfg.pf_ns)):
    row = {"N": n}
    if n in cfg.ns:
      for m in scaling.METHODS:
        row[m] = group_accuracy(m, n, answers, valid, truth[:, 0], scores, samples.logprob,
                                np.maximum(samples.lengths, 1))
    if n in pf:
      row["particle_filter (best)"], row["particle_filter (vote)"] = pf[n]
    if n <= n_max:
      row["coverage"] = float(coverage[n - 1])
      row["coverage fit"] = float(fit(n))
    rows.append(row)
  columns = ["N", *scaling.METHODS, "particle_filter (best)", "particle_filter (vote)",
             "coverage", "coverage fit"]
  total = time.perf_counter() - t_start
  n_params = common.param_count(params)
  notes = (
      f"Solver: a {n_params:,}-parameter byte-level transformer ({cfg.num_layers} layers, width "
      f"{cfg.hidden_size}) trained {cfg.train.steps} steps of {cfg.train.batch_size} x "
      f"{cfg.train.seq_len} bytes on worked solutions of {len(train):,} problems "
      f"({cfg.task.min_operands}-{cfg.task.max_operands} operands in [0, {cfg.task.max_operand}], "
      f"ops {''.join(cfg.task.ops)}). Process scorer: the same architecture fine-tuned from the "
      f"solver for {cfg.scorer_train.steps} steps on {len(fit_data['labels']):,} step prefixes "
      f"of its own samples labelled by the exact step verifier; held-out prefix accuracy "
      f"{scorer_eval['accuracy']:.3f} (positive rate {scorer_eval['positive_rate']:.3f}). "
      f"{len(test)} held-out problems, sampling temperature {cfg.temperature}. Columns "
      f"best_of_n .. weighted_consistency: accuracy with N of {n_max} samples per problem, "
      f"averaged over the {n_max}/N disjoint groups. particle_filter: N particles, "
      f"{cfg.pf_resampling} resampling of softmax(log p(correct) / {cfg.pf_temperature}) after "
      f"every step, answered by the best-scoring particle or a majority vote. coverage: "
      f"unbiased pass@N over all {n_max} samples; fit: exp(a N^b) with a = {fit.a:.4f}, "
      f"b = {fit.b:.4f} (least squares on log(-log coverage), all k = 1..{n_max}). "
      f"Whole run {total:.0f} s (not a benchmark).")
  common.write_report(out, rows, title="Inference-time scaling on arithmetic", notes=notes,
                      columns=columns,
                      extra=dict(config=dataclasses.asdict(cfg), scorer=scorer_eval,
                                 power_law={"a": fit.a, "b": fit.b},
                                 coverage=coverage.tolist(), total_seconds=total))
  plot(out, rows, coverage, fit, cfg.ns)
  common.print_report(out, total)
  return rows


if __name__ == "__main__":
  common.cli(run, Config)
