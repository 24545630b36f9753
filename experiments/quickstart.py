"""Quickstart: a class-conditional DiT on scikit-learn's digits, sampled with DDPM and DDIM, with
and without classifier-free guidance.

    python -m experiments.quickstart            # ~2.5 minutes on a 2-core CPU, compilation included
    python -m experiments.quickstart --smoke    # a tiny version, under a minute

It trains a small DiT (`jaxinf.recipes.quickstart_dit`, or reuses the finished checkpoint in
`results/quickstart/dit/`, which `experiments.sampler_pareto` reuses too), then
compares DDPM-1000, DDPM-250, DDIM-50/20/10, each unguided and with CFG: wall seconds (compilation
timed apart), NFE (network evaluations per sample: a guided step costs two), FD-digits and
conditional accuracy (see `jaxinf.metrics.digits_classifier`). Samplers of `long_steps` steps or
more (the two DDPMs) draw `long_samples_per_class` samples of each digit instead of
`samples_per_class`, and the real-digits FD floor is given at both sample counts, since FD is
biased upward at small N: compare a row's FD with the floor of its own `n`. It writes
`results/quickstart/{results.json, report.md, samples.png, pareto.png, guidance.png}`.

This revisits the report "Enhancing Diffusion Models for High-Quality Image Generation": DDIM with
CFG should give better conditional samples than DDPM at a fraction of the time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from experiments import common
from jaxinf.data import digits
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import compile_sample, sample
from jaxinf.metrics.digits_classifier import DigitsEvaluator
from jaxinf.recipes import quickstart_dit

DIGITS_IMAGES = 1797  # scikit-learn's digits (`digits.load_digits_images`; a test holds it)


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = quickstart_dit.QUICKSTART_RESULTS  # where results go
  # the DiT, its training and noise schedule; trained in `<out_dir>/dit/`
  dit: quickstart_dit.QuickstartDiT = quickstart_dit.QuickstartDiT()
  # (solver, steps) pairs; each runs unguided and with CFG at `guidance_scale`
  samplers: tuple[tuple[str, int], ...] = (
      ("ddpm", 1000), ("ddpm", 250), ("ddim", 50), ("ddim", 20), ("ddim", 10))
  spacing: str = "trailing"
  guidance_scale: float = 1.5
  # guidance scales swept with one sampler (the scale is a traced value: no recompilation)
  sweep_sampler: tuple[str, int] = ("ddim", 20)
  sweep_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
  samples_per_class: int = 20     # samples of each digit per sampler
  # samplers with at least `long_steps` steps draw `long_samples_per_class` of each digit instead
  long_steps: int = 250
  long_samples_per_class: int = 8

  def check(self) -> None:
    super().check()
    common.check_choices(self, "spacing", choices=schedules.TIMESTEP_SPACINGS)
    schedule = self.dit.schedule()
    if not self.samplers:
      common.refuse("samplers", "expected at least one (solver, steps) pair, got ()")
    common.check_solver_steps("samplers", self.samplers, schedule, spacing=self.spacing)
    common.check_solver_steps("sweep_sampler", (self.sweep_sampler,), schedule,
                              spacing=self.spacing)
    common.check_with("guidance_scale", lambda: CFG(self.guidance_scale))
    for scale in self.sweep_scales:
      common.check_with("sweep_scales", lambda s=scale: CFG(s))
    # the real-digits reference row draws 10 x samples_per_class of the 1,797 images, no repeats
    common.check_ints(self, "samples_per_class", "long_samples_per_class",
                      high=DIGITS_IMAGES // digits.NUM_CLASSES)
    common.check_ints(self, "long_steps")


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, dit=quickstart_dit.smoke_dit(cfg.dit), samplers=(("ddpm", 20), ("ddim", 5)),
      samples_per_class=4, long_steps=20, long_samples_per_class=2, sweep_sampler=("ddim", 5),
      sweep_scales=(1.0, 3.0),
      out_dir=common.smoke_dir(cfg.out_dir)))


def make_solver(name: str, spacing: str):
  return solvers.make_solver(name, spacing=spacing)


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  evaluator = DigitsEvaluator.load()
  schedule = cfg.dit.schedule()
  folder = quickstart_dit.dit_folder(out)
  reused = cfg.dit.finished(folder)
  model_cfg, apply, state, records = cfg.dit.trained(folder, progress=cfg.progress)
  t_trained = time.perf_counter()
  denoiser = cfg.dit.denoiser(model_cfg, apply, state)

  per_class = {cfg.samples_per_class, *(cfg.long_samples_per_class for _, steps in cfg.samplers
                                         if steps >= cfg.long_steps)}
  images, real_labels = digits.load_digits_images()
  rows = []
  for k in sorted(per_class, reverse=True):  # the FD floor at each sample count used
    pick = np.random.default_rng(cfg.seed).choice(len(images), k * digits.NUM_CLASSES,
                                                  replace=False)
    rows.append(dict(study="reference", sampler="real digits", steps=0, n=len(pick), nfe=0,
                     guidance=0.0, seconds=0.0, compile_seconds=0.0,
                     **quickstart_dit.digits_scores(evaluator, images[pick], real_labels[pick])))
  grids = {}
  for name, steps in cfg.samplers:
    k = cfg.long_samples_per_class if steps >= cfg.long_steps else cfg.samples_per_class
    labels = quickstart_dit.balanced_labels(k)
    shape = (k * digits.NUM_CLASSES, *model_cfg.sample_shape)
    for scale in (None, cfg.guidance_scale):
      solver = make_solver(name, cfg.spacing)
      t0 = time.perf_counter()
      run_fn = compile_sample(denoiser, schedule, solver, shape, steps=steps, cond=labels,
                              guidance=None if scale is None else CFG(scale))
      t1 = time.perf_counter()
      x = np.asarray(jax.block_until_ready(run_fn(jax.random.key(cfg.seed))))
      t2 = time.perf_counter()
      label = f"{name.upper()}-{steps}" + ("" if scale is None else f" CFG {scale:g}")
      row = dict(study="main", sampler=name, steps=steps, n=shape[0],
                 nfe=steps * (1 if scale is None else 2),
                 guidance=0.0 if scale is None else float(scale), seconds=t2 - t1,
                 compile_seconds=t1 - t0,
                 **quickstart_dit.digits_scores(evaluator, x, labels))
      rows.append(row)
      grids[label] = (x, k)
      print(f"{label:18s} {row['seconds']:7.2f} s (+{row['compile_seconds']:.1f} s compile)  "
            f"FD {row['fd']:7.3f}  cond acc {row['cond_accuracy']:.3f}", flush=True)

  # the sweep: a guidance scale is a traced value, so one compiled sampler serves every scale; a
  # scale the main table ran with this sampler (CFG 1 is the unguided sampler's output) is reused
  name, steps = cfg.sweep_sampler
  n = cfg.samples_per_class * digits.NUM_CLASSES
  labels = quickstart_dit.balanced_labels(cfg.samples_per_class)
  shape = (n, *model_cfg.sample_shape)
  ran = {(r["guidance"] or 1.0): r for r in rows if r["study"] == "main" and r["sampler"] == name
         and r["steps"] == steps and r["n"] == n}
  for scale in cfg.sweep_scales:
    if float(scale) in ran:
      scores = {key: ran[float(scale)][key] for key in ("fd", "cond_accuracy")}
    else:
      x = np.asarray(jax.block_until_ready(sample(
          jax.random.key(cfg.seed), denoiser, schedule, make_solver(name, cfg.spacing), shape,
          steps=steps, cond=labels, guidance=CFG(scale))))
      scores = quickstart_dit.digits_scores(evaluator, x, labels)
    rows.append(dict(study="guidance sweep", sampler=name, steps=steps, n=n, nfe=2 * steps,
                     guidance=float(scale), seconds=None, compile_seconds=None,  # not timed
                     **scores))
    print(f"sweep {name.upper()}-{steps} CFG {scale:<4g}  FD {rows[-1]['fd']:7.3f}  "
          f"cond acc {rows[-1]['cond_accuracy']:.3f}", flush=True)

  total = time.perf_counter() - t_start
  meta = dict(config=dataclasses.asdict(cfg), train_seconds=t_trained - t_start,
              reused_checkpoint=reused,
              total_seconds=total, final_loss=float(np.mean([r["loss"] for r in records[-50:]])),
              backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
              num_samples=n)
  notes = (f"{n} samples per sampler ({cfg.samples_per_class} per class; "
           f"{cfg.long_samples_per_class * digits.NUM_CLASSES} for samplers of "
           f"{cfg.long_steps} steps or more: column `n`), {cfg.dit.model}, "
           f"{cfg.dit.train.steps} training steps ({meta['train_seconds']:.0f} s including "
           f"start-up, 0 if reused), `{cfg.spacing}` timestep spacing, CFG scale "
           f"{cfg.guidance_scale}. "
           f"`seconds` excludes compilation (`compile_seconds`); `nfe` counts network evaluations "
           f"per sample. The `real digits` rows are the FD floor of `n` real images against all "
           f"1,797 (FD is biased upward at small sample sizes: compare a row with the floor of "
           f"its own `n`); a guidance-sweep scale the main table ran is reused from it, CFG 1 "
           f"being the unguided sampler. Whole run: {total:.0f} s on "
           f"{jax.default_backend()}.")
  columns = ["study", "sampler", "steps", "n", "nfe", "guidance", "seconds", "compile_seconds",
             "fd", "cond_accuracy"]
  common.write_report(out, rows,
                      title="Quickstart: DDPM vs DDIM, with and without CFG, on digits",
                      notes=notes, columns=columns, extra=meta)
  plot_samples(out / "samples.png", grids)
  plot_pareto(out / "pareto.png", [r for r in rows if r["study"] != "guidance sweep"])
  plot_guidance(out / "guidance.png", [r for r in rows if r["study"] == "guidance sweep"])
  common.print_report(out, total)
  return rows


def plot_samples(path: Path, grids: dict[str, tuple[np.ndarray, int]]) -> None:
  """One mosaic per sampler: `grids[label] = (samples [10 * per_class, 8, 8, 1], per_class)`."""
  plt = common.pyplot()
  cols = min(min(k for _, k in grids.values()), 8)
  ncols = (len(grids) + 1) // 2
  fig, axes = plt.subplots(2, ncols, figsize=(3.0 * ncols, 8.0), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (label, (x, per_class)) in zip(axes.T.flat, grids.items()):
    x = x.reshape(digits.NUM_CLASSES, per_class, 8, 8)[:, :cols]
    # one row per class: [10 * 8, cols * 8]
    mosaic = np.clip(x, -1, 1).transpose(0, 2, 1, 3).reshape(digits.NUM_CLASSES * 8, cols * 8)
    ax.imshow(mosaic, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(label, fontsize=8)
  fig.suptitle("Samples (rows: classes 0-9)", fontsize=10)
  common.save_figure(fig, path, dpi=150)


def plot_pareto(path: Path, rows: list[dict]) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for guided, marker in ((False, "o"), (True, "s")):
    for name, color in (("ddpm", "tab:blue"), ("ddim", "tab:orange")):
      pts = [r for r in rows if r["sampler"] == name and (r["guidance"] > 0) == guided]
      if not pts:
        continue
      ax.scatter([r["seconds"] for r in pts], [r["fd"] for r in pts], marker=marker, color=color,
                 label=f"{name.upper()}{' + CFG' if guided else ''}")
      for r in pts:
        ax.annotate(str(r["steps"]), (r["seconds"], r["fd"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
  for r, ls in zip([r for r in rows if r["sampler"] == "real digits"], ("--", ":")):
    ax.axhline(r["fd"], color="gray", ls=ls, lw=1, label=f"real digits, N = {r['n']}")
  ax.set_xscale("log")
  ax.set_xlabel("wall seconds (compiled, excluding compilation)")
  ax.set_ylabel("FD-digits (lower is better)")
  ax.legend(fontsize=8)
  ax.set_title("FD against wall time")
  common.save_figure(fig, path)


def plot_guidance(path: Path, rows: list[dict]) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  scales = [r["guidance"] for r in rows]
  ax.plot(scales, [r["fd"] for r in rows], "o-", color="tab:blue")
  ax.set_xlabel("guidance scale")
  ax.set_ylabel("FD-digits", color="tab:blue")
  ax2 = ax.twinx()
  ax2.plot(scales, [r["cond_accuracy"] for r in rows], "s--", color="tab:red")
  ax2.set_ylabel("conditional accuracy", color="tab:red")
  if rows:
    ax.set_title(f"Guidance sweep, {rows[0]['sampler'].upper()}-{rows[0]['steps']}")
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
