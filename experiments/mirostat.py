"""Mirostat (Basu et al. 2021) on a trained byte-level code model: does it hold the observed
surprise at tau over long generations, where top-k / top-p drift?

    python -m experiments.mirostat            # ~1-2 min on 2 cores (reuses lm_families' model)
    python -m experiments.mirostat --smoke    # tiny models, about a minute

It takes the `--family` model of `jaxinf.recipes.code_models` (the checkpoint
`experiments.lm_families` trains in `results/lm_families/train/<family>/`, reused when finished,
else trained with the same budget), then generates `tokens` bytes from held-out prompts with
Mirostat v2 at each tau, Mirostat v1, top-k, top-p and plain sampling, and reports the observed
surprise (-log2 p of each drawn token under the model's untruncated distribution) per quarter, its
drift, its distance to tau, and repetition. A byte model's untruncated surprise is its entropy rate
(about 2.3 bits/byte here); Mirostat only truncates, so a tau above that rate cannot be reached:
the default taus sit below it, and one above shows the limit.
Writes `results/mirostat/{results.json, report.md, meta.json, mirostat.png}`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.decoding.generate import generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.recipes import code_models
from jaxinf.train.lm import bits_per_byte


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/mirostat"  # where results go
  # the family models' training: the same value as lm_families' reuses its checkpoints
  families: code_models.FamilyTraining = code_models.FamilyTraining()
  family: str = "rwkv7"            # one of code_models.FAMILIES
  tokens: int = 1024               # new bytes per prompt
  batch: int = 8                   # held-out prompts, generated together
  prompt: int = 64                 # held-out prompt bytes
  taus: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)   # Mirostat v2's target surprises, bits
  v1_tau: float = 1.5              # Mirostat v1's
  top_k: int = 5
  top_p: float = 0.9
  window: int = 64                 # moving-average window of the surprise plot and its spread
  eval_windows: int = 128          # held-out windows of the training seq_len for bits per byte

  def check(self) -> None:
    super().check()
    common.check_choices(self, "family", choices=code_models.FAMILIES)
    common.check_ints(self, "tokens", "batch", "prompt", "eval_windows", "top_k")
    common.check_ints(self, "window", high=self.tokens)  # a moving average over the generation
    for tau in self.taus:  # the library's own checks of each sampler's options
      common.check_with("taus", lambda t=tau: SamplerConfig(mirostat=2, mirostat_tau=t))
    common.check_with("v1_tau", lambda: SamplerConfig(mirostat=1, mirostat_tau=self.v1_tau))
    common.check_with("top_k", lambda: SamplerConfig(top_k=self.top_k))
    common.check_with("top_p", lambda: SamplerConfig(top_p=self.top_p))


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  families = code_models.smoke_training(cfg.families, common.smoke_dir(cfg.families.out_dir))
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, families=families, tokens=32, batch=2, prompt=8, taus=(1.5,), window=8,
      eval_windows=4, out_dir=common.smoke_dir(cfg.out_dir)),
      derived=("out_dir", "families.out_dir"))


COLUMNS = ["sampler", "tau", "surprise_mean", "first_quarter", "last_quarter", "drift",
           "abs_err_to_tau", "window_sd", "distinct_8grams"]
COLUMN_TEXT = ("Observed surprise = -log2 p(token) under the model's untruncated distribution, "
               "averaged over rows; `first_quarter`/`last_quarter` of the generation; `drift` = "
               "last - first; `abs_err_to_tau` over the second half; `window_sd`: spread of the "
               "moving average; `distinct_8grams` near 1 means no loops.")


def moving_average(x: np.ndarray, w: int) -> np.ndarray:
  c = np.cumsum(np.insert(x, 0, 0.0))
  return (c[w:] - c[:-w]) / w


def mirostat_study(cfg: Config, model, params, heldout: np.ndarray):
  """(rows, {sampler label: (tau or None, mean surprise per position)}) of every sampler."""
  samplers = [(f"mirostat v2 tau={t:g}", t, SamplerConfig(mirostat=2, mirostat_tau=t))
              for t in cfg.taus]
  samplers.append((f"mirostat v1 tau={cfg.v1_tau:g}", cfg.v1_tau,
                   SamplerConfig(mirostat=1, mirostat_tau=cfg.v1_tau)))
  samplers += [(f"top-k k={cfg.top_k}", None, SamplerConfig(top_k=cfg.top_k)),
               (f"top-p p={cfg.top_p:g}", None, SamplerConfig(top_p=cfg.top_p)),
               ("pure sampling (T=1)", None, SamplerConfig())]
  prompts = common.heldout_prompts(heldout, cfg.batch, cfg.prompt, cfg.seed + 7)
  rows, curves = [], {}
  n, q = cfg.tokens, max(cfg.tokens // 4, 1)
  for label, tau, sampler in tqdm(samplers, desc="mirostat", disable=not cfg.progress):
    out = generate(model, params, prompts, jax.random.key(cfg.seed), max_new_tokens=n,
                   sampler=sampler)
    s = np.asarray(out.surprise, np.float64)           # [B, n] bits
    curves[label] = (tau, s.mean(0))
    windowed = np.stack([moving_average(r, cfg.window) for r in s])   # [B, n - w + 1]
    rows.append(dict(
        study="mirostat", sampler=label, tau=float("nan") if tau is None else tau,
        surprise_mean=float(s.mean()), first_quarter=float(s[:, :q].mean()),
        last_quarter=float(s[:, -q:].mean()),
        drift=float(s[:, -q:].mean() - s[:, :q].mean()),
        abs_err_to_tau=float("nan") if tau is None else float(abs(s[:, n // 2:].mean() - tau)),
        window_sd=float(windowed.std()),
        distinct_8grams=common.distinct_ngrams(np.asarray(out.tokens), 8)))
  return rows, curves


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  fam = cfg.families
  out = common.study_dir(cfg.out_dir)
  train, heldout = load_corpus(max_bytes=fam.corpus_bytes)
  model, params, _ = code_models.family_model(cfg.family, fam, train,
                                              max_len=cfg.prompt + cfg.tokens,
                                              progress=cfg.progress)
  bpb = bits_per_byte(model, params, heldout, seq_len=fam.train.seq_len,
                      max_windows=cfg.eval_windows)
  rows, curves = mirostat_study(cfg, model, params, heldout)
  total = time.perf_counter() - t_start
  notes = (f"{cfg.family} ({common.param_count(params):,} params, held-out {bpb:.3f} "
           f"bits/byte), the family model of `jaxinf.recipes.code_models` ({fam.train.steps} steps "
           f"of {fam.train.batch_size} x {fam.train.seq_len}, shared with `experiments."
           f"lm_families`). {cfg.batch} held-out prompts of {cfg.prompt} bytes, {cfg.tokens} new "
           f"bytes each. " + COLUMN_TEXT + f" Whole run {total:.0f} s on "
           f"{jax.default_backend()}.")
  common.write_report(out, rows, title="Mirostat: observed surprise over long generations",
                      notes=notes, columns=COLUMNS,
                      extra=dict(config=dataclasses.asdict(cfg), heldout_bpb=bpb,
                                 total_seconds=total))
  plot(out / "mirostat.png", cfg, curves)
  common.print_report(out, total)
  return rows


def plot(path: Path, cfg: Config, curves: dict) -> None:
  """Moving average of the observed surprise per sampler, tau dotted in the same colour."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for (label, (tau, curve)), color in zip(curves.items(), plt.cm.tab10.colors):
    w = min(cfg.window, len(curve))
    ax.plot(np.arange(w, len(curve) + 1), moving_average(curve, w), color=color, label=label,
            lw=1)
    if tau is not None:
      ax.axhline(tau, color=color, ls=":", lw=0.8)
  ax.set(xlabel="generated token", ylabel=f"observed surprise, bits ({cfg.window}-token mean)",
         title=f"Mirostat vs top-k/top-p ({cfg.family}, dotted: tau)")
  ax.legend(fontsize=7)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
