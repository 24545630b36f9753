"""Low-bit weights (and W8A8 activations) on the digits DiT and a byte-level code LM: quality,
weight bytes and time per step for each format of `jaxinf.quant`.

    python -m experiments.quantization            # a few minutes on 2 cores once the checkpoints
                                                  # exist (~35 min if the code LM must train)
    python -m experiments.quantization --smoke    # tiny models, a few training steps, ~20 s

Two studies, every quantized tree built by `jaxinf.quant` (real low-bit storage: int8 / packed
int4 codes, `float8_*` arrays, packed fp4 codes, SqueezeLLM index + LUT + sparse outliers) and run
unchanged through the models' own code (`x @ w` reaches the quantized leaf):

* DiT on digits: the quickstart's DiT (`jaxinf.recipes.quickstart_dit`; the finished checkpoint in
  `results/quickstart/dit/` is reused, else trained there), EMA weights quantized with
  `quantize_params` (its default selection: every `kernel` except the embedders and the final
  layer), sampled with DDIM + CFG as the quickstart does; FD-digits and conditional accuracy
  (`jaxinf.metrics.digits_classifier`), weight bytes of the whole tree (`param_bytes`, from the
  arrays) and seconds per sampling step (median of `repeats` compiled runs / steps). Formats:
  fp32, int8 (per channel), int4 (per channel and per group), fp8 E4M3 / E5M2, fp4 E2M1, fp4 with
  the per-tensor searched (exponent, mantissa, bias) split ("fp4"), W8A8 int8 and fp8 (weights
  and per-token dynamic activation quantization), and AdaRound int4 (learned rounding on matmul
  inputs recorded from one denoiser call on noised digits).
* Code LM: the ~0.8M-parameter byte transformer of `experiments.kv_compression` (its recipe, and
  by default its folder: whichever study runs first trains it into `<lm_dir>/train/`, ~31 min on
  2 cores, and the other reuses it);
  held-out bits per byte (one full-sequence forward pass) at fp32, int8, int4, fp8 (searched),
  fp4 (searched), uniform 3-bit int (per channel) and SqueezeLLM 3- and 4-bit (Fisher diagonal
  from `fisher_batches` calibration sequences, 0.5 % sparse outliers).

Writes `results/quantization/{results.json, report.md, meta.json, quantization.png}`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxinf.data import digits
from jaxinf.data.stdlib_code import load_corpus
from jaxinf.diffusion import solvers
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import compile_sample
from jaxinf.metrics.digits_classifier import DigitsEvaluator
from jaxinf.quant import (
  AdaRoundConfig,
  IntFormat,
  QuantConfig,
  fisher_diagonal,
  param_bytes,
  quantize_params,
  record_matmul_inputs,
  squeeze_params,
)
from jaxinf.quant.ptq import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from jaxinf.recipes import code_models, quickstart_dit

# DiT rows: name -> QuantConfig options (None: the fp32 tree); "group" is replaced by the config's
# group size. AdaRound is added apart (it needs calibration inputs).
DIT_FORMATS = {
    "fp32": None,
    "int8": {"format": "int8"},
    "int4": {"format": "int4"},
    "int4_g": {"format": "int4", "group_size": "group"},
    "fp8_e4m3": {"format": "fp8_e4m3"},
    "fp8_e5m2": {"format": "fp8_e5m2"},
    "fp4_e2m1": {"format": "fp4_e2m1"},
    "fp4_search": {"format": "fp4"},
    "w8a8_int8": {"format": "int8", "act_format": "int8"},
    "w8a8_fp8": {"format": "fp8_e4m3", "act_format": "fp8_e4m3"},
    "adaround_int4": {"format": "int4", "rounding": "adaround"},
}
LM_FORMATS = ("fp32", "int8", "int4", "fp8_search", "fp4_search", "int3", "squeeze4", "squeeze3")


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/quantization"   # where results go
  dit: quickstart_dit.QuickstartDiT = quickstart_dit.QuickstartDiT()  # noqa: RUF009 (frozen)
  dit_dir: str = quickstart_dit.QUICKSTART_RESULTS   # the quickstart's results (DiT reused there)
  dit_formats: tuple[str, ...] = tuple(DIT_FORMATS)
  steps: int = 20                  # DDIM steps
  guidance_scale: float = 1.5      # CFG
  samples_per_class: int = 20
  group_size: int = 32             # int4_g's input rows per scale
  adaround_iterations: int = 200   # Adam steps per weight
  calibration_rows: int = 512      # recorded matmul inputs per weight (AdaRound)
  repeats: int = 3                 # timed sampling runs (median)
  lm_formats: tuple[str, ...] = LM_FORMATS
  lm_dir: str = "results/kv_compression"   # the code LM's folder (checkpoint in train/)
  eval_rows: int = 32              # held-out windows for bits per byte
  eval_len: int = 512              # bytes per window
  fisher_batches: int = 16         # calibration sequences for SqueezeLLM's Fisher diagonal

  def check(self) -> None:
    super().check()
    common.check_ints(self, "steps", "samples_per_class", "group_size", "adaround_iterations",
                      "calibration_rows", "repeats", "eval_rows", "eval_len", "fisher_batches")
    common.check_ints(self, "samples_per_class", high=179)   # 1,797 digits / 10 classes
    for name, values, known in (("dit_formats", self.dit_formats, tuple(DIT_FORMATS)),
                                ("lm_formats", self.lm_formats, LM_FORMATS)):
      bad = [v for v in values if v not in known]
      if bad:
        common.refuse(name, f"unknown {bad}; known: {list(known)}")
    common.check_solver_steps("steps", (("ddim", self.steps),), self.dit.schedule(),
                              spacing="trailing")
    common.check_with("guidance_scale", lambda: CFG(self.guidance_scale))
    common.check_with("adaround_iterations",
                      lambda: AdaRoundConfig(iterations=self.adaround_iterations))
    if self.eval_len < 2:
      common.refuse("eval_len", f"expected >= 2 bytes, got {self.eval_len}")

  def lm_recipe(self) -> code_models.WindowLM:
    """The code LM: `code_models.copy_trained_lm`, the recipe of `experiments.kv_compression` (so
    the two studies share one training), or a tiny one for `--smoke`."""
    if self.smoke:
      return code_models.WindowLM(hidden_size=32, num_layers=2, max_len=64, train_steps=3,
                                  batch_size=2, seq_len=64, seed=self.seed)
    return code_models.copy_trained_lm(seed=self.seed)


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  out = common.smoke_dir(cfg.out_dir)
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, dit=quickstart_dit.smoke_dit(cfg.dit), dit_dir=out, steps=4, samples_per_class=3,
      group_size=16, adaround_iterations=10, calibration_rows=64, repeats=1,
      dit_formats=("fp32", "int4_g", "w8a8_fp8"), lm_formats=("fp32", "int3", "squeeze3"), lm_dir=str(Path(out) / "lm"), eval_rows=2, eval_len=32,
      fisher_batches=2, out_dir=out), derived=("out_dir", "dit_dir", "lm_dir"))


# --------------------------------------------------------------------------- DiT


def dit_rows(cfg: Config) -> tuple[list[dict], dict]:
  evaluator = DigitsEvaluator.load()
  folder = quickstart_dit.dit_folder(cfg.dit_dir)
  reused = cfg.dit.finished(folder)
  model_cfg, apply, state, _ = cfg.dit.trained(folder, progress=cfg.progress)
  ema = state["ema"]
  schedule = cfg.dit.schedule()
  labels = quickstart_dit.balanced_labels(cfg.samples_per_class)
  shape = (len(labels), *model_cfg.sample_shape)
  solver = solvers.make_solver("ddim", spacing="trailing")
  key = jax.random.key(cfg.seed)

  calibration = None
  if "adaround_int4" in cfg.dit_formats:   # the matmul inputs of one denoiser call on x_t
    images, ys = digits.load_digits_images()
    rng = np.random.default_rng(cfg.seed + 1)
    pick = rng.choice(len(images), min(256, len(images)), replace=False)
    x0 = jnp.asarray(images[pick])
    t = jnp.asarray(rng.integers(0, schedule.num_train_timesteps, len(pick)), jnp.int32)
    noise = jax.random.normal(jax.random.key(cfg.seed + 2), x0.shape)
    abar = jnp.asarray(schedule.alphas_cumprod)[t][:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise
    calibration = record_matmul_inputs(lambda p: apply(p, x_t, t, jnp.asarray(ys[pick])), ema,
                                       include=DEFAULT_INCLUDE, exclude=DEFAULT_EXCLUDE,
                                       max_rows=cfg.calibration_rows)

  rows = []
  for name in cfg.dit_formats:
    options = DIT_FORMATS[name]
    t0 = time.perf_counter()
    if options is None:
      params, fmt = ema, "fp32"
    else:
      options = dict(options)
      if options.get("group_size") == "group":
        options["group_size"] = cfg.group_size
      calib = None
      if options.get("rounding") == "adaround":
        options["adaround"] = AdaRoundConfig(iterations=cfg.adaround_iterations)
        calib = calibration
      qcfg = QuantConfig(**options)
      params, report = quantize_params(ema, qcfg, calibration=calib)
      fmt = ",".join(sorted({lf.format for lf in report.leaves}))
    quant_seconds = time.perf_counter() - t0
    denoiser = cfg.dit.denoiser(model_cfg, apply, {"ema": params})
    run_fn = compile_sample(denoiser, schedule, solver, shape, steps=cfg.steps, cond=labels,
                            guidance=CFG(cfg.guidance_scale))
    x = np.asarray(jax.block_until_ready(run_fn(key)))
    step_s = common.median_seconds(lambda f=run_fn: f(key), cfg.repeats) / cfg.steps
    if name == "fp32":   # FD's sampling noise: the fp32 tree again with another sampling key
      noise_fd = quickstart_dit.digits_scores(evaluator, np.asarray(run_fn(jax.random.key(
          cfg.seed + 1000))), labels)["fd"]
    rows.append(dict(study="dit", format=name, stored_as=fmt, weight_bytes=param_bytes(params),
                     ms_per_step=1e3 * step_s, quant_seconds=quant_seconds,
                     **quickstart_dit.digits_scores(evaluator, x, labels)))
    r = rows[-1]
    print(f"dit {name:14s} FD {r['fd']:8.3f}  acc {r['cond_accuracy']:.3f}  "
          f"{r['weight_bytes']:>9,} B  {r['ms_per_step']:.2f} ms/step", flush=True)
  return rows, {"dit_fd_other_key": noise_fd if "fp32" in cfg.dit_formats else None,
                "dit_model": cfg.dit.model, "dit_reused_checkpoint": reused,
                    "dit_params": common.param_count(ema), "num_samples": len(labels)}


# --------------------------------------------------------------------------- code LM


@functools.partial(jax.jit, static_argnums=0)
def mean_bits(model, params, tokens):
  """Mean bits per next byte of each row of `tokens` [B, T] under one forward pass: [B]."""
  logits = model(params, tokens[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(nll, axis=1) / jnp.log(2.0)


def lm_rows(cfg: Config) -> tuple[list[dict], dict]:
  recipe = cfg.lm_recipe()
  train, heldout = load_corpus(max_bytes=code_models.SMOKE_BYTES if cfg.smoke else None)
  model, params, records = code_models.window_lm(recipe, train, Path(cfg.lm_dir) / "train",
                                                 progress=cfg.progress)
  n_len = min(cfg.eval_len, model.config.max_len)
  tokens = jnp.asarray(common.heldout_prompts(heldout, cfg.eval_rows, n_len, cfg.seed + 21))
  calib = jnp.asarray(common.heldout_prompts(train, cfg.fisher_batches, n_len, cfg.seed + 22))

  fisher = base_rows = None
  rows = []
  for name in cfg.lm_formats:
    t0 = time.perf_counter()
    if name == "fp32":
      q, fmt = params, "fp32"
    elif name.startswith("squeeze"):
      if fisher is None:   # per-sequence gradients: the paper's per-sample Fisher
        loss = lambda p, b: mean_bits(model, p, b[None])[0]
        fisher = fisher_diagonal(loss, params, calib)
      q, _ = squeeze_params(params, fisher, bits=int(name[-1]), outlier_fraction=0.005)
      fmt = f"squeezellm{name[-1]}"
    else:
      fmt_name = {"fp8_search": "fp8", "fp4_search": "fp4", "int3": IntFormat(3)}.get(name, name)
      q, report = quantize_params(params, QuantConfig(format=fmt_name))
      fmt = ",".join(sorted({lf.format for lf in report.leaves}))
    quant_seconds = time.perf_counter() - t0
    per_row = np.asarray(mean_bits(model, q, tokens))
    if name == "fp32" or base_rows is None:
      base_rows = per_row
    diff = per_row - base_rows   # paired with the fp32 tree on the same windows
    bpb = float(per_row.mean())
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    rows.append({"study": "code_lm", "format": name, "stored_as": fmt, "weight_bytes": param_bytes(q),
                     "bpb": bpb, "bpb_vs_fp32": float(diff.mean()), "bpb_vs_fp32_se": se,
                 "quant_seconds": quant_seconds})
    print(f"lm  {name:14s} {bpb:.4f} bits/byte  {rows[-1]['weight_bytes']:>9,} B", flush=True)
  return rows, {"lm_params": common.param_count(params), "lm_eval_bytes": int(tokens.size),
                    "lm_final_train_loss": records[-1]["loss"] if records else None,
                    "lm_config": dataclasses.asdict(recipe)}


# --------------------------------------------------------------------------- claims


def _get(rows, study, fmt):
  return next((r for r in rows if r["study"] == study and r["format"] == fmt), None)


def _noise(diff: float, noise: float) -> str:
  return (f"within noise (|diff| {abs(diff):.3g} <= {noise:.3g})" if abs(diff) <= noise
          else f"beyond noise ({noise:.3g})")


def _fd_noise(rows: list[dict], meta: dict) -> float | None:
  base = _get(rows, "dit", "fp32")
  other = meta.get("dit_fd_other_key")
  return None if base is None or other is None else abs(other - base["fd"])


def claims(rows: list[dict], fd_noise: float | None = None, fd_tol: float = 0.10,
           acc_tol: float = 0.02, bpb_tol: float = 0.01) -> list[str]:
  """The seed's three quantization claims, each "agrees / disagrees, by how much". `fd_noise`:
  the FD change of the fp32 DiT between two sampling keys (its sampling noise, one pair); the code
  LM's noise is 2 standard errors of the per-window differences, paired with fp32."""
  out = []
  fd_noise = float("nan") if fd_noise is None else fd_noise
  base, w8 = _get(rows, "dit", "fp32"), _get(rows, "dit", "w8a8_fp8")
  if base and w8:
    dfd = w8["fd"] / base["fd"] - 1
    dacc = w8["cond_accuracy"] - base["cond_accuracy"]
    ok = dfd <= fd_tol and dacc >= -acc_tol
    out.append(f"- FP8 W8A8 no noticeable degradation (DiT, 'noticeable' = FD up > "
               f"{fd_tol:.0%} or accuracy down > {acc_tol}): {'agrees' if ok else 'disagrees'}; "
               f"FD {base['fd']:.3f} -> {w8['fd']:.3f} ({dfd:+.1%}, "
               f"{_noise(w8['fd'] - base['fd'], fd_noise)}), accuracy "
               f"{base['cond_accuracy']:.3f} -> {w8['cond_accuracy']:.3f} ({dacc:+.3f}).")
  lb, l8 = _get(rows, "code_lm", "fp32"), _get(rows, "code_lm", "fp8_search")
  if lb and l8:
    d = l8["bpb_vs_fp32"]
    out.append(f"  Code LM, fp8 weights only (no W8A8 path measured there; 'noticeable' = "
               f"> {bpb_tol} bits/byte): {'agrees' if d <= bpb_tol else 'disagrees'}; "
               f"{lb['bpb']:.4f} -> {l8['bpb']:.4f} ({d:+.4f} ± {l8['bpb_vs_fp32_se']:.4f} "
               "bits/byte, paired SE).")
  for fp4 in ("fp4_search", "fp4_e2m1"):
    a, b = _get(rows, "dit", fp4), _get(rows, "dit", "int4")
    if a and b:
      d = b["fd"] - a["fd"]
      out.append(f"- FP4 weights better than INT4 at the same width (DiT, {fp4} vs int4, both "
                 f"per channel, same bytes): {'agrees' if d > 0 else 'disagrees'} by {abs(d):.3f} "
                 f"FD ({a['fd']:.3f} vs {b['fd']:.3f}; {_noise(d, fd_noise)}); accuracy "
                 f"{a['cond_accuracy']:.3f} vs {b['cond_accuracy']:.3f}.")
  a, b = _get(rows, "code_lm", "fp4_search"), _get(rows, "code_lm", "int4")
  if a and b:
    d = b["bpb"] - a["bpb"]
    noise = 2 * float(np.hypot(a["bpb_vs_fp32_se"], b["bpb_vs_fp32_se"]))
    out.append(f"  Code LM, fp4 (searched) vs int4 per channel: "
               f"{'agrees' if d > 0 else 'disagrees'} by {abs(d):.4f} bits/byte ({a['bpb']:.4f} "
               f"vs {b['bpb']:.4f}; {_noise(d, noise)}).")
  u3, s3 = _get(rows, "code_lm", "int3"), _get(rows, "code_lm", "squeeze3")
  if lb and u3 and s3:
    gap, noise = u3["bpb_vs_fp32"], 2 * u3["bpb_vs_fp32_se"]
    head = ("- SqueezeLLM 3-bit closes most of the gap to full precision that uniform 3-bit "
            "leaves (fp32 here, not fp16; 'most' = more than 50 %): ")
    detail = (f"fp32 {lb['bpb']:.4f}, uniform int3 {u3['bpb']:.4f} "
              f"({gap:+.4f} ± {u3['bpb_vs_fp32_se']:.4f}), SqueezeLLM-3 {s3['bpb']:.4f} "
              f"({s3['bpb_vs_fp32']:+.4f} ± {s3['bpb_vs_fp32_se']:.4f}) bits/byte")
    if gap <= noise:
      out.append(head + "not testable on this model: uniform 3-bit leaves no gap beyond noise "
                 f"(2 SE = {noise:.4f}) to close; " + detail + ".")
    else:
      closed = (u3["bpb"] - s3["bpb"]) / gap
      out.append(head + f"{'agrees' if closed > 0.5 else 'disagrees'}; it closes {closed:.0%} "
                 f"of the {gap:.4f} bits/byte gap; " + detail + ".")
  return out


# --------------------------------------------------------------------------- run


COLUMNS = ["study", "format", "stored_as", "weight_bytes", "fd", "cond_accuracy", "bpb",
           "bpb_vs_fp32", "bpb_vs_fp32_se", "ms_per_step", "quant_seconds"]


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out_dir = common.study_dir(cfg.out_dir)
  rows, meta = [], {}
  if cfg.dit_formats:
    r, m = dit_rows(cfg)
    rows += r
    meta.update(m)
  if cfg.lm_formats:
    r, m = lm_rows(cfg)
    rows += r
    meta.update(m)
  total = time.perf_counter() - t_start
  notes = "\n".join([
      (f"DiT: {meta.get('dit_model')} ({meta.get('dit_params', 0):,} parameters, EMA weights), "
       f"DDIM-{cfg.steps} trailing + CFG {cfg.guidance_scale}, {meta.get('num_samples')} samples "
       f"({cfg.samples_per_class} per class), one sampling key for every format. `weight_bytes`: "
       "the whole tree as stored (embedders, final layer, norms and biases stay fp32). "
       f"`ms_per_step`: median of {cfg.repeats} compiled runs / steps (a CFG step is two network "
       f"evaluations of the batch). int4_g: groups of {cfg.group_size} input rows. AdaRound: "
       f"{cfg.adaround_iterations} Adam steps per weight on up to {cfg.calibration_rows} recorded "
       "inputs; its `quant_seconds` include that optimisation."),
      (f"Code LM: {meta.get('lm_params', 0):,}-parameter byte transformer "
       "(`experiments.kv_compression`'s: copy warm-up, then code with copy data), bits per byte "
       f"over {meta.get('lm_eval_bytes')} held-out "
       f"bytes ({cfg.eval_rows} windows). Quantized: every `kernel` (tied embedding stays fp32). "
       "fp8/fp4 `_search`: the per-tensor searched split and bias (chosen formats in "
       "`stored_as`). int3: 3-bit codes stored in 4-bit nibbles (no 3-bit packing), so int4's "
       f"bytes. SqueezeLLM: Fisher from {cfg.fisher_batches} training sequences, 0.5 % "
       "sparse outliers, fp16 lookup tables (its bytes include indices, tables and outliers)."),
      (f"Noise: the fp32 DiT sampled with another key scores FD "
       f"{meta.get('dit_fd_other_key') or float('nan'):.3f}; a format's FD change smaller than "
       "that key-to-key change is not a measured difference. `bpb_vs_fp32` ± `bpb_vs_fp32_se`: "
       "the mean per-window difference from fp32 and its standard error (paired windows)."),
      "", "Seed claims:", *claims(rows, _fd_noise(rows, meta)),
      "", f"Whole run {total:.0f} s on {jax.default_backend()}."])
  common.write_report(out_dir, rows, title="Low-bit weights: quality, bytes and speed",
                      notes=notes, columns=COLUMNS,
                      extra={"config": dataclasses.asdict(cfg), "total_seconds": total, **meta})
  plot(out_dir / "quantization.png", rows)
  common.print_report(out_dir, total)
  return rows


def plot(path: Path, rows: list[dict]) -> None:
  """Quality against weight bytes: FD-digits for the DiT, bits per byte for the code LM."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, study, metric, label in ((axes[0], "dit", "fd", "FD-digits (lower is better)"),
                                   (axes[1], "code_lm", "bpb", "held-out bits per byte")):
    pts = [r for r in rows if r["study"] == study]
    for r in pts:
      ax.scatter(r["weight_bytes"] / 1024, r[metric])
      ax.annotate(r["format"], (r["weight_bytes"] / 1024, r[metric]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="weight KiB (whole tree, as stored)", ylabel=label,
           title="DiT on digits" if study == "dit" else "byte-level code LM")
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
