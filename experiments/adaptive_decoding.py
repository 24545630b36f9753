"""Lossy two-model decoding on the trained code models: Entropy Adaptive Decoding (Simonds 2025)
and Contrastive Decoding (Li et al. 2023). Neither reproduces the large model's output; this study
measures what each trades.

    flock /tmp/jaxinf_bench.lock .venv/bin/python -m experiments.adaptive_decoding  # ~5 min*
    python -m experiments.adaptive_decoding --smoke                                  # tiny models

(*once `jaxinf.recipes.code_models` has trained or reused its checkpoints; timing is only
meaningful under the bench lock.) The large model is code_models' `target` (transformer-12m), the
small one `--small` (default `transformer-1m`). From `batch` held-out prompts of `prompt` bytes,
`tokens` new bytes each, greedy:

- EAD at each threshold (bits): the share of tokens the large model made, the mean negative
  log-likelihood of the continuation under the large model (nats/byte; the quality proxy), the
  position-wise agreement with the large model's own greedy output and the length of the common
  prefix, distinct 2-/4-gram ratios; the small and large model alone as the two ends.
- wall-clock tokens/s at batch 1 (one prompt; the latency regime EAD is for), every method timed
  side by side, round robin, medians of `repeats`: the large model alone, the small one alone,
  EAD at each threshold, and EAD at one threshold with `eager=True` (both models fed every token)
  against the deferred C-token catch-up (the decoder's default).
- Contrastive decoding with the large model as expert and the small one as amateur (alpha 0.1),
  and with the expert itself as amateur reading only the last `weak_prompt` bytes, against the
  expert's greedy decoding: the same quality proxy and repetition (distinct n-grams), since CD's
  claim is less repetition.

Writes `results/adaptive_decoding/{results.json, report.md, meta.json, ead.png, contrastive.png}`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.decoding.adaptive import EADConfig, ead_generate, large_token_share
from jaxinf.decoding.contrastive import CDConfig, contrastive_generate, last_tokens
from jaxinf.decoding.generate import generate
from jaxinf.recipes import code_models


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/adaptive_decoding"  # where results go
  small: str = "transformer-1m"
  large: str = "target"
  thresholds: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
  window: int = 5
  catch_up: int = 8
  eager_threshold: float = 1.5  # the threshold at which eager=True is timed against catch-up
  alpha: float = 0.1
  weak_prompt: int = 8
  batch: int = 8
  prompt: int = 64
  tokens: int = 128
  repeats: int = 5

  infinite_ok = ("thresholds", "eager_threshold")  # EAD: +-inf bits, one model throughout

  def check(self) -> None:
    super().check()
    common.check_choices(self, "small", "large", choices=code_models.NAMES)
    common.check_ints(self, "weak_prompt", "batch", "prompt", "tokens", "repeats")
    if not self.thresholds:
      common.refuse("thresholds", "expected at least one threshold, got ()")
    # the decoders' own checks, each named by the option that feeds it
    common.check_with("window", lambda: EADConfig(window=self.window))
    common.check_with("catch_up", lambda: EADConfig(window=self.window, catch_up=self.catch_up))
    for name, values in (("thresholds", self.thresholds),
                         ("eager_threshold", (self.eager_threshold,))):
      for t in values:
        common.check_with(name, lambda t=t: EADConfig(window=self.window, threshold=t,
                                                      catch_up=self.catch_up))
    common.check_with("alpha", lambda: CDConfig(alpha=self.alpha))


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, thresholds=(1.0, 7.0), eager_threshold=7.0, batch=2, prompt=8, tokens=12, repeats=1,
      weak_prompt=4, out_dir=common.smoke_dir(cfg.out_dir)))


def continuation_nll(model, params, prompts: np.ndarray, tokens: np.ndarray) -> float:
  """Mean -log p_large(token) over the generated tokens, nats per byte, scored in one parallel
  forward pass over prompt + continuation (all prompts have the same length here)."""
  seq = np.concatenate([prompts, tokens], 1).astype(np.int32)
  logp = jax.nn.log_softmax(model(params, jnp.asarray(seq)).astype(jnp.float32), -1)
  p = prompts.shape[1]
  picked = jnp.take_along_axis(logp[:, p - 1:-1], jnp.asarray(tokens)[..., None], -1)[..., 0]
  return float(-picked.mean())


def agreement(tokens: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """(share of positions equal to the reference, mean length of the common prefix)."""
  same = tokens == reference
  prefix = np.where(same.all(1), same.shape[1], np.argmin(same, 1))
  return float(same.mean()), float(prefix.mean())


def quality(name: str, tokens: np.ndarray, large, large_params, prompts, reference) -> dict:
  agree, prefix = agreement(tokens, reference)
  return dict(method=name, nll_large=continuation_nll(large, large_params, prompts, tokens),
              agree_large=agree, common_prefix=prefix,
              distinct_2=common.distinct_ngrams(tokens, 2),
              distinct_4=common.distinct_ngrams(tokens, 4))


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  small, sp = code_models.code_model(cfg.small, smoke=cfg.smoke, progress=cfg.progress)
  large, lp = code_models.code_model(cfg.large, smoke=cfg.smoke, progress=cfg.progress)
  heldout = code_models.heldout_code(cfg.smoke)
  prompts = common.heldout_prompts(heldout, cfg.batch, cfg.prompt, cfg.seed)
  key, n = jax.random.key(cfg.seed), cfg.tokens
  ead = lambda t, eager=False: EADConfig(window=cfg.window, threshold=t, catch_up=cfg.catch_up,
                                         eager=eager)

  # 1. quality at batch `batch`
  ref_large = np.asarray(generate(large, lp, prompts, key, max_new_tokens=n).tokens)
  ref_small = np.asarray(generate(small, sp, prompts, key, max_new_tokens=n).tokens)
  rows = [dict(quality(f"large alone ({cfg.large})", ref_large, large, lp, prompts, ref_large),
               large_share=1.0),
          dict(quality(f"small alone ({cfg.small})", ref_small, large, lp, prompts, ref_large),
               large_share=0.0)]
  samples = {}
  for t in tqdm(cfg.thresholds, desc="EAD thresholds", disable=not cfg.progress):
    o = ead_generate(small, sp, large, lp, prompts, key, max_new_tokens=n, config=ead(t))
    toks = np.asarray(o.tokens)
    steps = np.asarray(o.model_steps)
    rows.append(dict(quality(f"EAD (lossy) tau={t:g}", toks, large, lp, prompts, ref_large),
                     threshold=t, large_share=large_token_share(o), small_steps=int(steps[0]),
                     large_steps=int(steps[1]),
                     mean_entropy=float(np.asarray(o.entropy).mean())))
    samples[f"EAD tau={t:g}"] = toks[0]
  weak, weak_len = last_tokens(prompts, np.full(cfg.batch, cfg.prompt), cfg.weak_prompt)
  cd_runs = {
      f"CD (lossy) amateur={cfg.small}": dict(amateur=small, amateur_params=sp),
      f"CD (lossy) amateur=expert on last {cfg.weak_prompt} bytes": dict(
          amateur_prompts=weak, amateur_prompt_lengths=weak_len),
  }
  for name, kw in cd_runs.items():
    o = contrastive_generate(large, lp, prompts, key, max_new_tokens=n,
                             config=CDConfig(alpha=cfg.alpha), **kw)
    toks = np.asarray(o.tokens)
    rows.append(dict(quality(name, toks, large, lp, prompts, ref_large), alpha=cfg.alpha))
    samples[name] = toks[0]
  samples["large alone"] = ref_large[0]

  # 2. speed at batch 1, side by side
  p1 = prompts[:1]
  fns = {f"large alone ({cfg.large})": lambda: generate(large, lp, p1, key, max_new_tokens=n),
         f"small alone ({cfg.small})": lambda: generate(small, sp, p1, key, max_new_tokens=n)}
  for t in cfg.thresholds:
    fns[f"EAD (lossy) tau={t:g}"] = (
        lambda t=t: ead_generate(small, sp, large, lp, p1, key, max_new_tokens=n, config=ead(t)))
  eager = f"EAD (lossy) tau={cfg.eager_threshold:g} eager"
  fns[eager] = lambda: ead_generate(small, sp, large, lp, p1, key, max_new_tokens=n,
                                    config=ead(cfg.eager_threshold, True))
  if f"EAD (lossy) tau={cfg.eager_threshold:g}" not in fns:
    fns[f"EAD (lossy) tau={cfg.eager_threshold:g}"] = lambda: ead_generate(
        small, sp, large, lp, p1, key, max_new_tokens=n, config=ead(cfg.eager_threshold))
  for name, kw in cd_runs.items():
    kw1 = {k: (v[:1] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    fns[name] = (lambda kw1=kw1: contrastive_generate(large, lp, p1, key, max_new_tokens=n,
                                                      config=CDConfig(alpha=cfg.alpha), **kw1))
  if cfg.progress:
    print(f"timing {len(fns)} decoders side by side, {cfg.repeats} repeats ...", flush=True)
  secs = common.side_by_side(fns, cfg.repeats)
  large_s = secs[f"large alone ({cfg.large})"]
  by_name = {r["method"]: r for r in rows}
  for name, s in secs.items():
    row = by_name.get(name)
    if row is None:  # the eager-catch-up variant: timed only
      row = by_name[name] = dict(method=name, threshold=cfg.eager_threshold)
      rows.append(row)
    row.update(tok_s_b1=n / s, speedup_vs_large=large_s / s)
    if name.startswith("EAD"):
      t = row["threshold"]
      o = ead_generate(small, sp, large, lp, p1, key, max_new_tokens=n,
                       config=ead(t, name == eager))
      steps = np.asarray(o.model_steps)
      row.update(large_share_b1=large_token_share(o), large_steps_b1=int(steps[1]))
  total = time.perf_counter() - t_start
  notes = _notes(cfg, small, sp, large, lp, total)
  sample_text = "\n\n".join(f"**{k}**: `{bytes(int(x) for x in v if x < 256)!r}`"
                            for k, v in samples.items())
  common.write_report(out, rows,
                      title="Lossy two-model decoding: Entropy Adaptive and Contrastive",
                      notes=notes, columns=COLUMNS,
                      extra=dict(config=dataclasses.asdict(cfg), total_seconds=total,
                                 backend=jax.default_backend(),
                                 samples={k: v.tolist() for k, v in samples.items()}))
  with open(out / "report.md", "a") as f:
    f.write("\nFirst prompt's continuation (bytes >= 256 dropped):\n\n" + sample_text + "\n")
  plot(out, cfg, rows)
  common.print_report(out, total)
  return rows


COLUMNS = ("method", "threshold", "alpha", "large_share", "nll_large", "agree_large",
           "common_prefix", "distinct_2", "distinct_4", "small_steps", "large_steps", "tok_s_b1",
           "speedup_vs_large", "large_share_b1", "large_steps_b1")


def _notes(cfg: Config, small, sp, large, lp, total: float) -> str:
  return (
      "**Both methods are lossy**: neither EAD nor CD reproduces the large model's decoding "
      "(speculative decoding, elsewhere, does). "
      f"Large: `{cfg.large}` ({common.param_count(lp):,} params); small: `{cfg.small}` "
      f"({common.param_count(sp):,} params), both from `jaxinf.recipes.code_models`. "
      f"{cfg.batch} held-out prompts of {cfg.prompt} bytes, {cfg.tokens} new bytes each, greedy. "
      f"EAD: window {cfg.window}, catch-up steps of {cfg.catch_up} tokens; `large_share` is the "
      "share of generated tokens the large model made, `small_steps`/`large_steps` the `step` "
      "calls of each model in the loop (a model steps for the whole batch when any row needs it; "
      "a model catches up on the tokens it missed when it is next needed, "
      f"{cfg.catch_up} per step; `eager`: both models step every token instead). "
      "`nll_large`: mean -ln p_large of the "
      "continuation (nats/byte; lower is closer to what the large model finds likely); "
      "`agree_large`: position-wise agreement with the large model's greedy output, "
      "`common_prefix`: mean tokens before the first difference; `distinct_n`: distinct n-gram "
      f"share per row (1: no repetition). CD: alpha {cfg.alpha}, greedy, the large model as "
      "expert. "
      f"`tok_s_b1`: tokens/s at batch 1 (first prompt), all decoders timed side by side, round "
      f"robin, median of {cfg.repeats}, prefill included; `large_share_b1`: the share on that "
      f"prompt. Whole run {total:.0f} s on {jax.default_backend()}.")


def plot(out: Path, cfg: Config, rows: list[dict]) -> None:
  plt = common.pyplot()

  ead = [r for r in rows if r["method"].startswith("EAD") and "large_share" in r]
  ends = [r for r in rows if "alone" in r["method"]]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ax = axes[0]
  th = [r["threshold"] for r in ead]
  ax.plot(th, [r["large_share"] for r in ead], "o-", label="large-model share (batch)")
  if all("large_share_b1" in r for r in ead):
    ax.plot(th, [r["large_share_b1"] for r in ead], "s--", label="large-model share (timed prompt)")
  ax.set_xlabel("EAD threshold (bits)")
  ax.set_ylabel("share of tokens")
  ax2 = ax.twinx()
  if all("speedup_vs_large" in r for r in ead):
    ax2.plot(th, [r["speedup_vs_large"] for r in ead], "^-", color="C3", label="speed-up vs large")
    ax2.set_ylabel("tokens/s relative to the large model (batch 1)")
  ax.legend(loc="upper left", fontsize=8)
  ax2.legend(loc="upper right", fontsize=8)
  ax.set_title("EAD (lossy): who generates, and how fast")
  ax = axes[1]
  ax.plot([r["large_share"] for r in ead], [r["nll_large"] for r in ead], "o-", label="EAD")
  for r in ends:
    ax.plot([r["large_share"]], [r["nll_large"]], "k*", ms=10)
    ax.annotate(r["method"].split(" (")[0], (r["large_share"], r["nll_large"]), fontsize=8)
  ax.set_xlabel("share of tokens from the large model")
  ax.set_ylabel("NLL of the continuation under the large model (nats/byte)")
  ax.set_title("quality proxy against large-model share")
  common.save_figure(fig, out / "ead.png")

  cd = [r for r in rows if r["method"].startswith("CD") or r["method"].startswith("large alone")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  names = [r["method"].replace(" (lossy)", "\n(lossy)").replace(" on last", "\non last")
           for r in cd]
  x = np.arange(len(cd))
  for i, key in enumerate(("distinct_2", "distinct_4")):
    axes[0].bar(x + 0.4 * i - 0.2, [r[key] for r in cd], 0.4, label=key)
  axes[0].set_xticks(x, names, fontsize=7)
  axes[0].set_ylabel("distinct n-gram share (1: no repetition)")
  axes[0].legend(fontsize=8)
  axes[0].set_title("repetition: CD against the expert's greedy decoding")
  axes[1].bar(x, [r["nll_large"] for r in cd], 0.6)
  axes[1].set_xticks(x, names, fontsize=7)
  axes[1].set_ylabel("NLL under the large model (nats/byte)")
  axes[1].set_title("quality proxy")
  common.save_figure(fig, out / "contrastive.png")


if __name__ == "__main__":
  common.cli(run, Config)
