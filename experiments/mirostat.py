"""Mirostat (Basu et al. 2021) on a trained byte-level code model: does it hold the observed
surprise at tau over long generations, where top-k / top-p drift?

    python -m experiments.mirostat            # ~1-2 minutes on a 2-core CPU (reuses lm_families' training)
    python -m experiments.mirostat --smoke    # tiny models, about a minute

It takes the `--family` model trained by `experiments.lm_families` (reusing its finished checkpoint
in `results/lm_families/train/<family>/`, or training it with the same budget), then generates
`tokens` bytes from held-out prompts with Mirostat v2 at each tau, Mirostat v1, top-k, top-p and
plain sampling, and reports the observed surprise (-log2 p of each drawn token under the model's
untruncated distribution) per quarter, its drift, its distance to tau, and repetition. A byte model's
untruncated surprise is its entropy rate (about 2.3 bits/byte here); Mirostat only truncates, so a
tau above that rate cannot be reached: the default taus sit below it, and one above shows the limit.
Writes `results/mirostat/{results.json, report.md, meta.json, mirostat.png}`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import tyro

from experiments import lm_families
from experiments.reporting import results_dir, write_report
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.train.lm import bits_per_byte, train_lm


@dataclasses.dataclass(frozen=True)
class Config:
  families: lm_families.Config = lm_families.Config()
  family: str = "rwkv7"
  tokens: int = 1024
  batch: int = 8
  taus: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
  v1_tau: float = 1.5
  top_k: int = 5
  top_p: float = 0.9
  out_dir: str = "results/mirostat"
  smoke: bool = False
  progress: bool = True


def smoke_config(cfg: Config) -> Config:
  return dataclasses.replace(cfg, families=lm_families.smoke_config(cfg.families), tokens=32,
                             batch=2, taus=(1.5,),
                             out_dir=str(Path(cfg.out_dir).parent / "mirostat_smoke"))


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  fam = cfg.families
  if cfg.family not in lm_families.FAMILIES:
    raise ValueError(f"family: unknown {cfg.family!r}; known: {list(lm_families.FAMILIES)}")
  out = results_dir(Path(cfg.out_dir).name, Path(cfg.out_dir).parent)
  train, heldout = load_corpus(max_bytes=fam.corpus_bytes)
  impl = fam.mamba_train_impl if cfg.family == "mamba" else "auto"
  model_cfg = lm_families.family_config(cfg.family, fam.smoke,
                                        fam.decode_prompt + cfg.tokens)
  model, params = lm_families.build_model(cfg.family, model_cfg, impl=impl, seed=fam.seed)
  state, _ = train_lm(model, params, train, cfg=fam.train,
                      out_dir=Path(fam.out_dir) / "train" / cfg.family, progress=cfg.progress)
  model, params = lm_families.with_impl(cfg.family, model, "auto"), state["params"]
  bpb = bits_per_byte(model, params, heldout, seq_len=fam.train.seq_len,
                      max_windows=fam.eval_windows)
  study = dataclasses.replace(fam, mirostat_tokens=cfg.tokens, mirostat_batch=cfg.batch,
                              mirostat_taus=cfg.taus, mirostat_v1_tau=cfg.v1_tau,
                              top_k=cfg.top_k, top_p=cfg.top_p, mirostat_family=cfg.family,
                              progress=cfg.progress)
  rows, curves = lm_families.mirostat_study(study, model, params, heldout)
  total = time.perf_counter() - t_start
  notes = (f"{cfg.family} ({lm_families.param_count(params):,} params, held-out {bpb:.3f} "
           f"bits/byte), trained by `experiments.lm_families` ({fam.train.steps} steps of "
           f"{fam.train.batch_size} x {fam.train.seq_len}). {cfg.batch} held-out prompts of "
           f"{fam.decode_prompt} bytes, {cfg.tokens} new bytes each. "
           + lm_families.STUDY_TEXT["mirostat"] + f" Whole run {total:.0f} s on "
           f"{jax.default_backend()}.")
  write_report(out, rows, title="Mirostat: observed surprise over long generations",
               notes=notes, columns=lm_families.STUDY_COLUMNS["mirostat"],
               extra=dict(config=dataclasses.asdict(cfg), heldout_bpb=bpb, total_seconds=total))
  lm_families.plot_mirostat(out / "mirostat.png", study, curves)
  print(f"\n{(out / 'report.md').read_text()}\nwrote {out}/ in {total:.0f} s")
  return rows


def main() -> None:
  run(tyro.cli(Config))


if __name__ == "__main__":
  main()
