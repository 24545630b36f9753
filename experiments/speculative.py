"""Lossless decoding accelerators on trained code models: wall-clock speedup over `generate` at the
same output distribution, and acceptance beside its theory.

    python -m experiments.speculative            # trains/reuses the code models; see README
    python -m experiments.speculative --smoke    # tiny models, about a minute

Target: `transformer-12m` (`jaxinf.recipes.code_models`, trained on the stdlib's source). Methods,
each timed side by side with plain `generate` in one process (medians of `repeats`, batch 1,
held-out prompts, compilation excluded):

- draft-model speculative sampling (`jaxinf.decoding.speculative`) against γ and draft size, with
  drafts of every family (~1M parameters: transformer, Mamba, RWKV-7, TransNormerLLM), a ~100K
  transformer, and a FastDraft draft (the 1M transformer fine-tuned on the target's own text,
  `jaxinf.train.draft`); the adaptive-γ schedule;
- prompt lookup and Alipay's trie Lookahead (`jaxinf.decoding.lookup`), Jacobi and lookahead
  decoding (`jaxinf.decoding.jacobi`), Speculative Jacobi Decoding (sampling);
- Medusa heads trained on the frozen target (`jaxinf.decoding.medusa`), exact acceptance;
- self-drafting: the target itself with int8 or int4 weights as the draft (`jaxinf.quant`, the
  hand-written CPU kernel on CPU; by default with int8 activations too, W8A8 / W4A8, whose decode
  step is the cheaper one), which agrees with the target far more often than a small model. It
  steps in the target's own KV cache (`share_cache=True`: no draft prefill, no catch-up step). One
  more row times it against the target with its fp32 weights in the kernel's layout
  (`ptq.kernel_params`), whose own `generate` is the faster baseline on CPU.

Measured acceptance α̂ = accepted / drafted and tokens per target call sit beside the theoretical
E = (1 − α^{γ+1}) / (1 − α) (Leviathan et al. 2023, eq. 1) at the measured α̂. For greedy runs the
output is compared with `generate`'s token for token; exactness under sampling is what the tests
check (chi-square against the target's own law). Writes `results/speculative/{results.json,
report.md, meta.json, speedup_gamma.png, acceptance.png}`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from jaxinf.data.tokenizer import ByteTokenizer
from jaxinf.decoding import jacobi, lookup
from jaxinf.decoding.generate import generate
from jaxinf.decoding.medusa import medusa_generate
from jaxinf.decoding.sampling import SamplerConfig
from jaxinf.decoding.speculative import expected_tokens_per_call, speculative_generate
from jaxinf.quant import cpu_kernel
from jaxinf.quant.ptq import QuantConfig, kernel_params, quantize_params
from jaxinf.recipes import code_models
from jaxinf.train.draft import target_text
from jaxinf.train.lm import LMTrainConfig, bits_per_byte, train_lm
from jaxinf.train.medusa import MedusaTrainConfig, train_medusa_self_distilled
from jaxinf.train.step import OptimizerConfig

EOS = ByteTokenizer.eos_id
# weight-only, or with int8 activations ("-a8": W8A8 / W4A8, the kernel's integer dot)
SELF_DRAFT_FORMATS = ("int8", "int4", "int8-a8", "int4-a8")
SAMPLERS = {"greedy": SamplerConfig(temperature=0.0), "t0.7": SamplerConfig(temperature=0.7)}


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/speculative"  # where results go
  prompt_len: int = 256
  new_tokens: int = 128
  n_prompts: int = 4             # timed one after another at batch 1
  repeats: int = 5
  samplers: tuple[str, ...] = ("greedy", "t0.7")
  sweep_drafts: tuple[str, ...] = ("draft-tiny", "fastdraft-1m")
  gammas: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
  family_drafts: tuple[str, ...] = ("transformer-1m", "mamba-1m", "rwkv7-1m", "transnormer-1m")
  family_gamma: int = 4
  adaptive_gamma: int = 8
  # self-drafts: the target itself with low-bit weights (`jaxinf.quant`; on CPU the hand-written
  # kernel, `QuantConfig(kernel="cpu_ffi")`), its tied table at int8
  self_drafts: tuple[str, ...] = ("int8-a8", "int4-a8")  # of SELF_DRAFT_FORMATS
  self_draft_gammas: tuple[int, ...] = (4, 6, 8)
  self_draft_group_size: int | None = 32  # int4's scale group (None: one scale per channel)
  # the first self-draft at this gamma against the fp32-ffi target (None: no such row)
  kernel_target_gamma: int | None = 6
  recurrent_target: str = "rwkv7-1m"   # "any family can be the target": one row with it
  lookup_ngram: int = 3
  lookup_draft_len: int = 7
  trie_branches: int = 4
  jacobi_window: int = 7
  lookahead_window: int = 4
  lookahead_ngram: int = 4
  lookahead_candidates: int = 4
  # Medusa-1 heads on the frozen target, trained on its own text (self-distillation)
  medusa: bool = True
  medusa_train: MedusaTrainConfig = MedusaTrainConfig(steps=800, batch_size=8, seq_len=128)
  medusa_prompts: int = 256
  medusa_prompt_len: int = 64
  medusa_new_tokens: int = 192
  # FastDraft: target text from training-corpus prompts, then fine-tuning of transformer-1m
  fastdraft_sequences: int = 512
  fastdraft_prompt: int = 32
  fastdraft_new_tokens: int = 224
  fastdraft_train: LMTrainConfig = LMTrainConfig(
      steps=300, batch_size=8, seq_len=128, checkpoint_every=100,
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=30, weight_decay=0.1))
  eval_windows: int = 32

  def check(self) -> None:
    super().check()
    drafts = code_models.NAMES + ("fastdraft-1m",)
    if not self.samplers:
      common.refuse("samplers", f"expected some of {sorted(SAMPLERS)}, got ()")
    common.check_choices(self, "samplers", choices=tuple(SAMPLERS))
    if not self.sweep_drafts:  # the last one is the adaptive-gamma row's draft
      common.refuse("sweep_drafts", f"expected some of {list(drafts)}, got ()")
    common.check_choices(self, "sweep_drafts", "family_drafts", choices=drafts)
    common.check_choices(self, "recurrent_target",
                         choices=tuple(n for n in code_models.NAMES if n != "target"))
    common.check_ints(self, "prompt_len", "new_tokens", "n_prompts", "repeats", "gammas",
                      "family_gamma", "adaptive_gamma", "lookup_ngram", "lookup_draft_len",
                      "trie_branches", "jacobi_window", "lookahead_window",
                      "lookahead_candidates", "medusa_prompts", "medusa_prompt_len",
                      "medusa_new_tokens", "fastdraft_sequences", "fastdraft_prompt",
                      "fastdraft_new_tokens", "eval_windows")
    common.check_ints(self, "lookahead_ngram", low=2)  # it drafts ngram - 1 tokens
    common.check_choices(self, "self_drafts", choices=SELF_DRAFT_FORMATS)
    common.check_ints(self, "self_draft_gammas")
    if self.self_draft_group_size is not None:
      common.check_ints(self, "self_draft_group_size")
    if self.kernel_target_gamma is not None:
      common.check_ints(self, "kernel_target_gamma")


def smoke_config(cfg: Config) -> Config:
  # every code path once (greedy: each method family; the sampled path through one method);
  # options given beside --smoke are kept (`common.smoke_sized`)
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, prompt_len=24, new_tokens=8, n_prompts=1, repeats=1, samplers=("greedy",),
      gammas=(2,), sweep_drafts=("fastdraft-1m",), family_drafts=(), self_drafts=("int4-a8",),
      self_draft_gammas=(2,), self_draft_group_size=None, kernel_target_gamma=2,
      adaptive_gamma=3, lookup_draft_len=3, jacobi_window=3, lookahead_window=2,
      lookahead_ngram=2, lookahead_candidates=2, trie_branches=2, fastdraft_sequences=4,
      fastdraft_prompt=8, fastdraft_new_tokens=24,
      fastdraft_train=LMTrainConfig(steps=2, batch_size=2, seq_len=16, checkpoint_every=1,
                                    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1,
                                                              weight_decay=0.1)),
      medusa_train=MedusaTrainConfig(steps=2, batch_size=2, seq_len=16,
                                     checkpoint_every=1),
      medusa_prompts=2, medusa_prompt_len=8, medusa_new_tokens=16,
      eval_windows=2, out_dir=common.smoke_dir(cfg.out_dir)))


def fastdraft(cfg: Config, target, t_params, train_stream, root: Path):
  """(model, params) of transformer-1m fine-tuned on the target's text (FastDraft)."""
  base, base_params = code_models.code_model("transformer-1m", smoke=cfg.smoke,
                                             progress=cfg.progress)
  folder = root / "train" / "fastdraft-1m"
  stream_file = folder / "target_text.npy"
  if stream_file.exists():
    stream = np.load(stream_file)
  else:
    stream = target_text(target, t_params, train_stream, jax.random.key(cfg.seed + 17),
                         num_prompts=cfg.fastdraft_sequences, prompt_len=cfg.fastdraft_prompt,
                         new_tokens=cfg.fastdraft_new_tokens,
                         samplers=(SamplerConfig(temperature=1.0),), eos_id=EOS)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(stream_file, stream)
  state, _ = train_lm(base, base_params, stream, cfg=cfg.fastdraft_train, out_dir=folder,
                      progress=cfg.progress)
  return base, state["params"]


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  root = code_models.models_dir(cfg.smoke)
  train_stream, heldout = code_models.corpus(cfg.smoke)

  target, t_params = code_models.code_model("target", smoke=cfg.smoke, progress=cfg.progress)
  names = sorted(set(cfg.sweep_drafts + cfg.family_drafts + ("draft-tiny",)
                     + (cfg.recurrent_target,)) - {"fastdraft-1m"})
  models = {n: code_models.code_model(n, smoke=cfg.smoke, progress=cfg.progress) for n in names}
  if "fastdraft-1m" in cfg.sweep_drafts + cfg.family_drafts:
    models["fastdraft-1m"] = fastdraft(cfg, target, t_params, train_stream, root)
  quality = [dict(study="models", model=n, params=common.param_count(p),
                  heldout_bpb=bits_per_byte(m, p, heldout, seq_len=128,
                                            max_windows=cfg.eval_windows))
             for n, (m, p) in [("target", (target, t_params))] + sorted(models.items())]
  for row in quality:
    print(f"{row['model']}: {row['params']:,} params, held-out {row['heldout_bpb']:.3f} bits/byte",
          flush=True)

  medusa = None
  if cfg.medusa:
    heads, head_params, _ = train_medusa_self_distilled(
        target, t_params, train_stream, cfg.medusa_train, root / "train" / "medusa", eos_id=EOS,
        num_prompts=cfg.medusa_prompts, prompt_len=cfg.medusa_prompt_len,
        new_tokens=cfg.medusa_new_tokens, seed=cfg.seed, progress=cfg.progress)
    medusa = (heads, head_params)

  for fmt in cfg.self_drafts:
    models[f"self-{fmt}"] = (target, self_draft(cfg, t_params, fmt))
    quality.append(dict(study="models", model=f"self-{fmt}",
                        params=common.param_count(t_params),
                        heldout_bpb=bits_per_byte(target, models[f"self-{fmt}"][1], heldout,
                                                  seq_len=128, max_windows=cfg.eval_windows)))
    print(f"self-{fmt}: held-out {quality[-1]['heldout_bpb']:.3f} bits/byte", flush=True)
  kernel_target = (cfg.kernel_target_gamma is not None and cfg.self_drafts
                   and _kernel_unavailable() is None)
  if kernel_target:  # the same fp32 weights in the kernel's layout: a faster target on CPU
    models["target-fp32-ffi"] = (target, kernel_params(
        t_params, embeddings=(r"embed_tokens/embedding",))[0])
  prompts = common.heldout_prompts(heldout, cfg.n_prompts, cfg.prompt_len, cfg.seed)
  kw = dict(max_new_tokens=cfg.new_tokens)

  def methods(sampler: SamplerConfig, sampler_name: str):
    """(label, fields, fn(prompt [1, T], key) -> output) of every method for this sampler."""
    out = []
    for d in cfg.sweep_drafts:
      for g in cfg.gammas:
        out.append((f"speculative {d} γ={g}", dict(method="speculative", draft=d, gamma=g),
                    _spec(target, t_params, *models[d], g, sampler, kw)))
    for fmt in cfg.self_drafts:
      for g in cfg.self_draft_gammas:
        out.append((f"speculative self-{fmt} γ={g}",
                    dict(method="speculative", draft=f"self-{fmt}", gamma=g),
                    _spec(target, t_params, *models[f"self-{fmt}"], g, sampler, kw,
                          share_cache=True)))
    if kernel_target:
      fmt, g = cfg.self_drafts[0], cfg.kernel_target_gamma
      out.append((f"speculative self-{fmt} γ={g}, fp32-ffi target",
                  dict(method="speculative", target="target-fp32-ffi", draft=f"self-{fmt}",
                       gamma=g),
                  _spec(target, models["target-fp32-ffi"][1], *models[f"self-{fmt}"], g,
                        sampler, kw, share_cache=True)))
    for d in cfg.family_drafts:
      out.append((f"speculative {d} γ={cfg.family_gamma}",
                  dict(method="speculative", draft=d, gamma=cfg.family_gamma),
                  _spec(target, t_params, *models[d], cfg.family_gamma, sampler, kw)))
    best = cfg.sweep_drafts[-1]
    out.append((f"speculative {best} adaptive γ≤{cfg.adaptive_gamma}",
                dict(method="speculative-adaptive", draft=best, gamma=cfg.adaptive_gamma),
                _spec(target, t_params, *models[best], cfg.adaptive_gamma, sampler, kw,
                      gamma_schedule="heuristic")))
    out.append(("prompt lookup", dict(method="prompt-lookup", gamma=cfg.lookup_draft_len),
                lambda p, k: lookup.prompt_lookup_generate(
                    target, t_params, p, k, ngram=cfg.lookup_ngram,
                    draft_len=cfg.lookup_draft_len, sampler=sampler, **kw)))
    out.append(("trie lookahead", dict(method="trie-lookahead", gamma=cfg.lookup_draft_len),
                lambda p, k: lookup.trie_lookahead_generate(
                    target, t_params, p, k, ngram=cfg.lookup_ngram,
                    draft_len=cfg.lookup_draft_len, branches=cfg.trie_branches, sampler=sampler,
                    **kw)))
    if sampler.greedy:
      out.append(("jacobi", dict(method="jacobi", gamma=cfg.jacobi_window),
                  lambda p, k: jacobi.jacobi_generate(target, t_params, p, k,
                                                      window=cfg.jacobi_window, sampler=sampler,
                                                      **kw)))
      out.append(("lookahead", dict(method="lookahead", gamma=cfg.lookahead_ngram - 1),
                  lambda p, k: jacobi.lookahead_generate(
                      target, t_params, p, k, window=cfg.lookahead_window,
                      ngram=cfg.lookahead_ngram, candidates=cfg.lookahead_candidates,
                      sampler=sampler, **kw)))
    else:
      out.append(("SJD", dict(method="sjd", gamma=cfg.jacobi_window),
                  lambda p, k: jacobi.sjd_generate(target, t_params, p, k,
                                                   window=cfg.jacobi_window, sampler=sampler,
                                                   **kw)))
    if medusa is not None:
      heads, head_params = medusa
      for acceptance, method in (("exact", "medusa"), ("typical", "medusa-typical (LOSSY)")):
        out.append((f"medusa {acceptance}" + (" (LOSSY)" if acceptance == "typical" else ""),
                    dict(method=method, gamma=None, lossless=acceptance == "exact"),
                    lambda p, k, a=acceptance: medusa_generate(
                        target, t_params, heads, head_params, p, k, sampler=sampler,
                        acceptance=a, **kw)))
    return out

  rows: list[dict] = list(quality)
  for sampler_name in cfg.samplers:
    sampler = SAMPLERS[sampler_name]
    key = jax.random.key(cfg.seed)
    base = lambda p, k: generate(target, t_params, p, k, sampler=sampler, **kw)
    todo = methods(sampler, sampler_name)
    if sampler_name == cfg.samplers[0]:
      todo.append(_recurrent_row(cfg, models, sampler, kw))
    for label, fields, fn in tqdm(todo, desc=f"methods ({sampler_name})",
                                  disable=not cfg.progress):
      reference = base
      if fields.get("target") is not None:
        m, p = models[fields["target"]]
        reference = lambda pr, k, m=m, p=p: generate(m, p, pr, k, sampler=sampler, **kw)
      all_prompts = lambda f: [f(prompts[i:i + 1], key) for i in range(cfg.n_prompts)]
      secs = common.side_by_side({"generate": lambda: all_prompts(reference),
                                  "method": lambda: all_prompts(fn)}, cfg.repeats)
      outs = all_prompts(fn)
      calls = sum(int(o.target_calls.sum()) for o in outs)
      drafted = sum(int(o.drafted.sum()) for o in outs)
      accepted = sum(int(o.accepted.sum()) for o in outs)
      emitted = sum(int(o.lengths.sum()) for o in outs)
      accept_rate = accepted / drafted if drafted else float("nan")
      # per-draft acceptance α: judged drafts are the accepted ones plus one rejection a round
      rejected = (sum(int(o.rejected.sum()) for o in outs) if outs[0].rejected is not None
                  else None)
      alpha = (accepted / (accepted + rejected) if rejected is not None and accepted + rejected
               else float("nan"))
      gamma = fields.get("gamma")
      row = {"study": "speed", "sampler": sampler_name, "label": label, "target": "target",
             "draft": None, "lossless": True, **fields}
      row.update(generate_s=secs["generate"], method_s=secs["method"],
                 speedup=secs["generate"] / secs["method"], accept_rate=accept_rate,
                 alpha=alpha,
                 # the prefill draws the first token; every later token comes from a target call
                 tokens_per_call=(emitted - cfg.n_prompts) / max(calls, 1),
                 expected_tokens_per_call=(float(expected_tokens_per_call(alpha, gamma))
                                           if gamma and fields["method"] == "speculative"
                                           and np.isfinite(alpha) else float("nan")),
                 target_calls=calls, new_tokens=emitted)
      if sampler.greedy:
        want = all_prompts(reference)
        row["identical_to_generate"] = all(np.array_equal(np.asarray(o.tokens),
                                                          np.asarray(w.tokens))
                                           for o, w in zip(outs, want))
      rows.append(row)
      print(f"{sampler_name:6s} {label:42s} speedup {row['speedup']:.2f}x  "
            f"tokens/call {row['tokens_per_call']:.2f}  accepted/drafted {accept_rate:.2f}",
            flush=True)

  if cfg.self_drafts and cfg.kernel_target_gamma is not None:
    fmt = cfg.self_drafts[0]
    rows.append(dict(study="anatomy", draft=f"self-{fmt}", gamma=cfg.kernel_target_gamma,
                     **round_anatomy(target, t_params, models[f"self-{fmt}"][1], prompts[:1],
                                     cfg.kernel_target_gamma, cfg.new_tokens, cfg.repeats)))
    print("self-draft round (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                if isinstance(v, float)), flush=True)

  total = time.perf_counter() - t_start
  meta = dict(config=dataclasses.asdict(cfg), total_seconds=total, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
              jax_version=jax.__version__)
  common.write_report(out, rows, title="Lossless decoding accelerators", extra=meta,
               notes=_notes(cfg, total))
  (out / "report.md").write_text(_report(cfg, rows, total))
  _plots(out, cfg, rows)
  common.print_report(out, total)
  return rows


def _kernel_unavailable() -> str | None:
  """Why the hand-written CPU kernel cannot run here, or None when it can."""
  if jax.default_backend() != "cpu":
    return f"the backend is {jax.default_backend()}"
  try:
    cpu_kernel.load()
  except cpu_kernel.KernelUnavailableError as e:
    return str(e)
  return None


def self_draft(cfg: Config, t_params, fmt: str):
  """The target's parameters with every matmul weight in `fmt` ("int8" / "int4", "-a8": int8
  activations at the matmul inputs too) and its tied embedding table at int8, stored for the CPU
  kernel when it runs here (else the XLA path)."""
  bits, act = fmt.removesuffix("-a8"), "int8" if fmt.endswith("-a8") else None
  why = _kernel_unavailable()
  kernel = "cpu_ffi" if why is None else None
  if why is not None and jax.default_backend() == "cpu":
    print(f"self-draft {fmt}: the CPU kernel is unavailable ({why}); the XLA path", flush=True)
  config = QuantConfig(format=bits, act_format=act, kernel=kernel,
                       embeddings=(r"embed_tokens/embedding",), embedding_format="int8",
                       group_size=cfg.self_draft_group_size if bits == "int4" else None)
  params, report = quantize_params(t_params, config)
  print(f"self-draft {fmt}: {report.bytes_after:,} bytes of {report.bytes_before:,} "
        f"(kernel {kernel})", flush=True)
  return params


def round_anatomy(model, t_params, d_params, prompt, gamma: int, new_tokens: int,
                  repeats: int) -> dict:
  """Where a shared-cache self-draft round's time goes (greedy, one prompt): the measured round,
  (speculative_generate(new_tokens) - its prefill-only run) / rounds, beside its pieces timed
  alone in compiled loops from the same prefilled cache (10 rounds a call): `draft_step_ms` (one
  one-token draft step), `verify_ms` (the target's step over gamma + 1 tokens) and
  `pieces_round_ms` (gamma draft steps then the verify step, in one loop: what a round costs
  without sampling, acceptance and bookkeeping). `overhead_ms` = round - pieces_round;
  `generate_token_ms` the plain decode step it competes with."""
  key, reps = jax.random.key(0), 10
  spec = lambda n: speculative_generate(model, t_params, model, d_params, prompt, key,
                                        max_new_tokens=n, gamma=gamma, share_cache=True)
  gen = lambda n: generate(model, t_params, prompt, key, max_new_tokens=n)
  secs = common.side_by_side({"spec": lambda: spec(new_tokens).tokens,
                              "spec_prefill": lambda: spec(1).tokens,
                              "gen": lambda: gen(new_tokens).tokens,
                              "gen_prefill": lambda: gen(1).tokens}, repeats)
  rounds = int(spec(new_tokens).target_calls.sum())
  cap = prompt.shape[1] + new_tokens + gamma + 1
  cache0 = model.prefill(t_params, jnp.asarray(prompt), model.init_cache(1, cap),
                         jnp.array([prompt.shape[1]], "int32"))[1]

  def loop(draft: bool, verify: bool):
    def one(c, _):
      mark = model.mark(c)
      tok = jnp.ones((1, 1), "int32")
      if draft:
        for _ in range(gamma):
          logits, c = model.step(d_params, tok, c)
          tok = jnp.argmax(logits[:, -1], -1)[:, None].astype("int32")
      c = model.restore(c, mark)
      if verify:
        logits, c = model.step(t_params, jnp.tile(tok, (1, gamma + 1)), c)
        # keep nothing, but by a value of the logits (so the head is computed)
        c = model.rollback(c, jnp.minimum(jnp.argmax(logits[:, -1], -1), 0))
      return c, None
    run = jax.jit(lambda c: jax.lax.scan(one, c, None, length=reps)[0])
    cache = jax.tree.map(jnp.copy, cache0)
    return common.side_by_side({"x": lambda: run(cache)}, repeats)["x"] / reps * 1e3

  draft_ms, verify_ms, both_ms = loop(True, False), loop(False, True), loop(True, True)
  round_ms = (secs["spec"] - secs["spec_prefill"]) / max(rounds, 1) * 1e3
  return dict(rounds=rounds, round_ms=round_ms, draft_step_ms=draft_ms / gamma,
              verify_ms=verify_ms, pieces_round_ms=both_ms, overhead_ms=round_ms - both_ms,
              generate_token_ms=(secs["gen"] - secs["gen_prefill"]) / max(new_tokens - 1, 1)
              * 1e3,
              speculative_s=secs["spec"], generate_s=secs["gen"],
              prefill_s=secs["gen_prefill"])


def _spec(target, t_params, draft, d_params, gamma, sampler, kw, **opts):
  return lambda p, k: speculative_generate(target, t_params, draft, d_params, p, k, gamma=gamma,
                                           sampler=sampler, **kw, **opts)


def _recurrent_row(cfg: Config, models, sampler, kw):
  """A recurrent target (RWKV-7 by default) verifying the tiny transformer draft."""
  tm, tp = models[cfg.recurrent_target]
  dm, dp = models["draft-tiny"]
  return (f"speculative {cfg.recurrent_target} target ← draft-tiny γ={cfg.family_gamma}",
          dict(method="speculative", target=cfg.recurrent_target, draft="draft-tiny",
               gamma=cfg.family_gamma),
          _spec(tm, tp, dm, dp, cfg.family_gamma, sampler, kw))


def _notes(cfg: Config, total: float) -> str:
  return (f"Batch 1, {cfg.n_prompts} held-out prompts of {cfg.prompt_len} bytes, "
          f"{cfg.new_tokens} new tokens each; seconds are medians of {cfg.repeats} timed repeats "
          "(after a warm-up), method and `generate` interleaved in one process. "
          f"Whole run {total:.0f} s on {jax.default_backend()} ({os.cpu_count()} CPU cores).")


def _report(cfg: Config, rows: list[dict], total: float) -> str:
  parts = ["# Lossless decoding accelerators", "", _notes(cfg, total), "",
           "## Models (held-out bits per byte)", "",
           common.markdown_table([r for r in rows if r["study"] == "models"],
                                 ["model", "params", "heldout_bpb"])]
  cols = ["label", "lossless", "speedup", "generate_s", "method_s", "accept_rate", "alpha",
          "tokens_per_call", "expected_tokens_per_call", "target_calls", "identical_to_generate"]
  for s in cfg.samplers:
    speed = [r for r in rows if r["study"] == "speed" and r["sampler"] == s]
    parts += ["", f"## {s}: speedup over `generate` (same output distribution)", "",
              common.markdown_table(sorted(speed, key=lambda r: -r["speedup"]), cols)]
    best = max((r for r in speed if r["lossless"]), key=lambda r: r["speedup"], default=None)
    if best is not None:
      parts += ["", f"Best lossless method: {best['label']} at {best['speedup']:.2f}x "
                f"({best['tokens_per_call']:.2f} tokens per target call)."]
  anatomy = [r for r in rows if r["study"] == "anatomy"]
  if anatomy:
    parts += ["", "## Where a self-draft round goes (greedy, first prompt, ms)", "",
              common.markdown_table(anatomy, ["draft", "gamma", "rounds", "round_ms",
                                              "draft_step_ms", "verify_ms", "pieces_round_ms",
                                              "overhead_ms", "generate_token_ms", "prefill_s",
                                              "speculative_s", "generate_s"]),
              "", "round_ms: (speculative - its prefill-only run) / rounds; draft_step_ms, "
              "verify_ms (the target's step over gamma + 1 tokens), pieces_round_ms (gamma "
              "draft steps and the verify step in one compiled loop) timed alone; overhead_ms = "
              "round_ms - pieces_round_ms (sampling, acceptance, bookkeeping); prefill_s: the "
              "target's prefill, which `generate` pays too."]
  parts += ["", "accept_rate = accepted / drafted (multi-branch methods count every branch's "
            "drafts); alpha = accepted / (accepted + rejected), the per-draft acceptance rate "
            "(draft-model rows: each round's drafts after a rejection are never judged); "
            "tokens_per_call = tokens after the first (which the prefill draws) per target call; "
            "expected_tokens_per_call = (1 - alpha^(γ+1)) / (1 - alpha) at the measured alpha "
            "(fixed-γ draft-model rows; the formula assumes i.i.d. acceptances)."]
  return "\n".join(parts) + "\n"


def _plots(out: Path, cfg: Config, rows: list[dict]) -> None:
  plt = common.pyplot()

  speed = [r for r in rows if r["study"] == "speed" and r["method"] == "speculative"
           and r.get("target") in (None, "target")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for s in cfg.samplers:
    for d in cfg.sweep_drafts + tuple(f"self-{f}" for f in cfg.self_drafts):
      pts = sorted((r["gamma"], r["speedup"], r["tokens_per_call"], r["expected_tokens_per_call"])
                   for r in speed if r["sampler"] == s and r["draft"] == d)
      if not pts:
        continue
      g, sp, tpc, exp = map(np.array, zip(*pts))
      axes[0].plot(g, sp, "o-", label=f"{d} ({s})")
      line, = axes[1].plot(g, tpc, "o-", label=f"{d} ({s}) measured")
      axes[1].plot(g, exp, "--", color=line.get_color(), label=f"{d} ({s}) theory")
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set(xlabel="γ (drafts per round)", ylabel="speedup over generate",
              title="speculative sampling, transformer-12m target")
  axes[1].set(xlabel="γ", ylabel="tokens per target call",
              title="measured vs (1 − α^{γ+1}) / (1 − α)")
  for ax in axes:
    ax.legend(fontsize=7)
  common.save_figure(fig, out / "speedup_gamma.png")

  fig, ax = plt.subplots(figsize=(7, 4))
  for s in cfg.samplers:
    pts = [r for r in rows if r["study"] == "speed" and r["sampler"] == s]
    ax.scatter([r["tokens_per_call"] for r in pts], [r["speedup"] for r in pts], label=s)
    for r in pts:
      ax.annotate(r["label"].replace("speculative ", ""), (r["tokens_per_call"], r["speedup"]),
                  fontsize=5)
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set(xlabel="tokens per target call", ylabel="speedup over generate",
         title="every method: acceptance vs wall clock")
  ax.legend()
  common.save_figure(fig, out / "acceptance.png")


if __name__ == "__main__":
  common.cli(run, Config)
