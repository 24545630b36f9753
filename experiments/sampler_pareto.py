"""Sampler Pareto study on the digits DiT: FD-digits and conditional accuracy against NFE and wall
time for every solver, with and without feature caching; and a peer comparison with diffusers.

    python -m experiments.sampler_pareto            # ~10 minutes on a 2-core CPU
    python -m experiments.sampler_pareto --smoke    # a tiny version, about a minute

Model: the quickstart's DiT-digits (v-prediction, `jaxinf.recipes.quickstart_dit`), trained or
reused from `results/quickstart/dit/`.
Every sampler draws the same 200 labels (20 per class) from the same key, unguided (the FD study;
guidance trades FD for accuracy, see the quickstart's sweep). `seconds` is the compiled call alone.

Caching rows use DDIM-50: a fixed refresh interval (FORA), Step Rehash (refresh where the cached
features change, from a calibration pass) and a schedule learned on a calibration batch to minimise
the final-sample error (HarmoniCa's objective); `speedup` is uncached seconds / cached seconds,
measured side by side in this run.

Peer comparison: a DiT-S/2-sized model (latent 16x16x4, 1000 classes, learned sigma, random
weights) in diffusers' `DiTPipeline` (DDIM-50, CFG 4) against jaxinf's `sample` + VAE decode on the
same converted weights and initial latents: the images must agree to 1e-4, and the report gives
the wall-time ratio (median of repeated runs, each side warmed up first).

Few-step models (`jaxinf.recipes.few_step_digits`): a flow-matching DiT teacher, 2-rectified flow,
InstaFlow and SlimFlow one-step students, LCM and MLCM consistency models — trained (or reused from
`results/sampler_pareto/few_step/`) and sampled with their recommended solvers.

The seed claims checked in `report.md`: DPM-Solver++ at 15-20 steps matches DDIM at 100+ steps;
caching gives 1.5-1.8x with a small FD change; a one-step reflow+distilled model stays within 2x of
the 50-step FD.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxinf.data import digits
from jaxinf.diffusion import cache as fc
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser, dit_feature_apply
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import compile_sample
from jaxinf.metrics.digits_classifier import DigitsEvaluator
from jaxinf.models.dit import DiT
from jaxinf.recipes import quickstart_dit
from jaxinf.recipes.few_step_digits import FewStepBudget, few_step_models_on_digits
from jaxinf.train.distill import CouplingConfig
from flax import nnx

# (label, solver name, options, step counts)
SOLVER_GRID = (
    ("DDPM", "ddpm", dict(spacing="trailing"), (250, 1000)),
    ("DDIM", "ddim", dict(spacing="trailing"), (10, 20, 50, 100, 200)),
    ("DPM-Solver++ 2M", "dpmsolver++", dict(), (5, 10, 15, 20, 25)),
    ("DPM-Solver++ 2M SDE", "dpmsolver++", dict(algorithm_type="sde-dpmsolver++"), (10, 20, 50)),
    ("UniPC bh2", "unipc", dict(), (5, 10, 15, 20)),
    ("Euler (Karras)", "euler", dict(use_karras_sigmas=True), (10, 20, 50)),
    ("Heun (Karras)", "heun", dict(use_karras_sigmas=True), (5, 10, 25)),
)


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/sampler_pareto"  # where results go
  dit: quickstart_dit.QuickstartDiT = quickstart_dit.QuickstartDiT()  # the quickstart's DiT
  # the quickstart's results folder: the DiT is reused from (or trained in) its `dit/`
  quickstart_dir: str = quickstart_dit.QUICKSTART_RESULTS
  samples_per_class: int = 20     # samples of each digit per sampler
  cache_steps: int = 50
  cache_intervals: tuple[int, ...] = (2, 3)
  calibration_batch: int = 10
  # learned schedules: greedy elimination in this many rounds (None: one row per round, exact)
  learn_rounds: int | None = 6
  peer_batch: int = 4
  peer_steps: int = 50
  peer_guidance: float = 4.0
  peer_repeats: int = 3
  few_step: FewStepBudget = FewStepBudget()
  include_few_step: bool = True

  def check(self) -> None:
    super().check()
    if not self.quickstart_dir:
      common.refuse("quickstart_dir", "expected a folder, got ''")
    common.check_ints(self, "samples_per_class", "calibration_batch", "peer_repeats")
    common.check_ints(self, "cache_intervals")
    if self.learn_rounds is not None:
      common.check_ints(self, "learn_rounds")
    t = self.dit.schedule().num_train_timesteps
    common.check_ints(self, "cache_steps", "peer_steps", high=t)  # DDIM steps on T timesteps
    common.check_ints(self, "peer_batch", high=1000)  # distinct labels of the 1000 classes
    common.check_with("peer_guidance", lambda: CFG(self.peer_guidance))


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, dit=quickstart_dit.smoke_dit(cfg.dit),
      quickstart_dir=common.smoke_dir(cfg.quickstart_dir), samples_per_class=2, cache_steps=6,
      cache_intervals=(2,), calibration_batch=2, peer_steps=3, peer_repeats=1, peer_batch=2,
      few_step=FewStepBudget(teacher_steps=2, reflow_steps=2, instaflow_steps=2,
                             slimflow_reflow_steps=2, slimflow_distill_steps=2, lcm_steps=2,
                             mlcm_steps=2, coupling=CouplingConfig(pairs=20, solver_steps=2)),
      out_dir=common.smoke_dir(cfg.out_dir)), derived=("out_dir", "quickstart_dir"))


SMOKE_GRID = (("DDIM", "ddim", dict(spacing="trailing"), (4,)),
              ("DPM-Solver++ 2M", "dpmsolver++", dict(), (4,)),
              ("Heun (Karras)", "heun", dict(use_karras_sigmas=True), (3,)))


def timed(run_fn, key):
  t0 = time.perf_counter()
  x = np.asarray(jax.block_until_ready(run_fn(key)))
  return x, time.perf_counter() - t0


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t_start = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  evaluator = DigitsEvaluator.load()
  schedule = cfg.dit.schedule()
  model_cfg, apply, state, _ = cfg.dit.trained(quickstart_dit.dit_folder(cfg.quickstart_dir),
                                               progress=cfg.progress)
  module = DiT(model_cfg, rngs=nnx.Rngs(0))  # the graph for the feature hooks; weights: the EMA
  denoiser = cfg.dit.denoiser(model_cfg, apply, state, features=dit_feature_apply(module))
  n = cfg.samples_per_class * digits.NUM_CLASSES
  labels = quickstart_dit.balanced_labels(cfg.samples_per_class)
  shape = (n, *model_cfg.sample_shape)
  key = jax.random.key(cfg.seed)
  rows = []

  def record(study, label, name, steps, nfe, x, seconds, compile_seconds, **extra):
    row = dict(study=study, sampler=label, solver=name, steps=steps, nfe=nfe, seconds=seconds,
               compile_seconds=compile_seconds,
               **quickstart_dit.digits_scores(evaluator, x, labels), **extra)
    rows.append(row)
    print(f"{study:8s} {label:28s} steps {steps:5d} nfe {nfe:5d}  {seconds:7.3f} s  "
          f"FD {row['fd']:7.3f}  acc {row['cond_accuracy']:.3f}", flush=True)
    return row

  # --- every solver -----------------------------------------------------------------------
  for label, name, options, step_list in (SMOKE_GRID if cfg.smoke else SOLVER_GRID):
    solver = solvers.make_solver(name, **options)
    for steps in step_list:
      t0 = time.perf_counter()
      run_fn = compile_sample(denoiser, schedule, solver, shape, steps=steps, cond=labels)
      t1 = time.perf_counter()
      x, sec = timed(run_fn, key)
      nfe = len(solver.table(schedule, steps)["t"])
      record("solver", label, name, steps, nfe, x, sec, t1 - t0)

  # --- feature caching on DDIM-<cache_steps> ----------------------------------------------
  solver = solvers.DDIM(spacing="trailing")
  s = cfg.cache_steps
  t0 = time.perf_counter()
  full_fn = compile_sample(denoiser, schedule, solver, shape, steps=s, cond=labels)
  t1 = time.perf_counter()
  x_full, sec_full = timed(full_fn, key)
  full_row = record("cache", f"DDIM-{s} uncached", "ddim", s, s, x_full, sec_full, t1 - t0,
                    refresh=s, speedup=1.0)
  cal_shape = (cfg.calibration_batch, *model_cfg.sample_shape)
  cal_labels = jnp.arange(cfg.calibration_batch) % digits.NUM_CLASSES
  cal_key = jax.random.fold_in(key, 1)  # calibration draws differ from the evaluation draws
  changes = fc.feature_changes(cal_key, denoiser, schedule, solver, cal_shape, steps=s,
                               cond=cal_labels)
  schedules_to_run = []
  for interval in cfg.cache_intervals:
    fixed = fc.fixed_interval(s, interval)
    schedules_to_run.append((f"FORA interval {interval}", fixed))
    schedules_to_run.append((f"Step Rehash ({fixed.num_refresh} refreshes)",
                             fc.step_rehash(changes, fixed.num_refresh)))
    t_learn = time.perf_counter()
    learned, _ = fc.learn_schedule(cal_key, denoiser, schedule, solver, cal_shape, steps=s,
                                   num_refresh=fixed.num_refresh, cond=cal_labels,
                                   rounds=cfg.learn_rounds)
    print(f"learned a {fixed.num_refresh}-refresh schedule in "
          f"{time.perf_counter() - t_learn:.1f} s")
    schedules_to_run.append((f"learned ({fixed.num_refresh} refreshes)", learned))
  for label, cache in schedules_to_run:
    t0 = time.perf_counter()
    run_fn = fc.compile_sample_cached(denoiser, schedule, solver, shape, steps=s, cache=cache,
                                      cond=labels)
    t1 = time.perf_counter()
    # time the uncached and cached calls side by side (medians of 3), so load changes cancel
    full_times, cached_times = [], []
    for _ in range(3):
      full_times.append(timed(full_fn, key)[1])
      x, sec = timed(run_fn, key)
      cached_times.append(sec)
    speedup = statistics.median(full_times) / statistics.median(cached_times)
    record("cache", label, "ddim", s, cache.num_refresh, x, statistics.median(cached_times),
           t1 - t0, refresh=cache.num_refresh, speedup=speedup,
           fd_change=evaluator.fd(x) - full_row["fd"],
           refresh_rows="".join("R" if r else "." for r in cache.refresh))

  # --- few-step models ---------------------------------------------------------------------
  if cfg.include_few_step:
    models = few_step_models_on_digits(out / "few_step", cfg.few_step, progress=cfg.progress)
    for name, m in models.items():
      t0 = time.perf_counter()
      run_fn = compile_sample(m.denoiser, m.schedule, m.solver, shape, steps=m.steps, cond=labels,
                              guidance=m.guidance)
      t1 = time.perf_counter()
      x, sec = timed(run_fn, key)
      nfe = len(m.solver.table(m.schedule, m.steps)["t"]) * (1 if m.guidance is None else 2)
      record("few-step", name, type(m.solver).__name__, m.steps, nfe, x, sec, t1 - t0,
             guidance=0.0 if m.guidance is None else float(m.guidance.scale),
             params=m.params, train_steps=m.train_steps)

  # --- peer comparison with diffusers' DiTPipeline ----------------------------------------
  rows.extend(peer_comparison(cfg))

  total = time.perf_counter() - t_start
  notes = claims(rows) + (f"\n\n{n} samples per sampler, unguided, EMA weights of "
                          f"{cfg.dit.model} ({cfg.dit.train.prediction_type}); whole run "
                          f"{total:.0f} s on {jax.default_backend()}.")
  common.write_report(out, rows, title="Sampler Pareto on digits, caching, and diffusers peer",
                      notes=notes, columns=["study", "sampler", "steps", "nfe", "seconds", "fd",
                                            "cond_accuracy", "speedup", "fd_change",
                                            "max_abs_diff"],
                      extra=dict(config=dataclasses.asdict(cfg), total_seconds=total))
  plot(out / "pareto.png", rows)
  common.print_report(out, total)
  return rows


def best(rows, sampler, steps):
  return next((r for r in rows if r["sampler"] == sampler and r["steps"] == steps), None)


def claims(rows) -> str:
  lines = ["## Seed claims, as measured", ""]
  ddim = [r for r in rows
          if r["study"] == "solver" and r["sampler"] == "DDIM" and r["steps"] >= 100]
  dpm = [r for r in rows if r["study"] == "solver" and r["sampler"] == "DPM-Solver++ 2M"
         and 15 <= r["steps"] <= 20]
  if ddim and dpm:
    ref = min(r["fd"] for r in ddim)
    got = min(r["fd"] for r in dpm)
    lines.append(f"- DPM-Solver++ 2M at 15-20 steps: best FD {got:.3f}; DDIM at 100+ steps: best "
                 f"FD {ref:.3f} -> {'agrees' if got <= 1.1 * ref else 'does not agree'} "
                 f"(within 10% counted as a match).")
  cached = [r for r in rows if r["study"] == "cache" and r.get("speedup", 1.0) > 1.0]
  if cached:
    for r in cached:
      lines.append(f"- caching, {r['sampler']}: {r['speedup']:.2f}x faster, FD change "
                   f"{r['fd_change']:+.3f} (uncached FD "
                   f"{r['fd'] - r['fd_change']:.3f}).")
  few = {r["sampler"]: r for r in rows if r["study"] == "few-step"}
  if "flow_teacher" in few:
    ref = few["flow_teacher"]
    for name in ("instaflow", "slimflow"):
      if name in few:
        r = few[name]
        lines.append(f"- one-step {name}: FD {r['fd']:.3f} vs the {ref['steps']}-step flow "
                     f"teacher's {ref['fd']:.3f} (both CFG {r['guidance']:g} / "
                     f"{ref['guidance']:g}): "
                     f"{r['fd'] / ref['fd']:.2f}x -> "
                     f"{'within' if r['fd'] <= 2 * ref['fd'] else 'not within'} 2x.")
  peer = [r for r in rows if r["study"] == "peer"]
  if len(peer) == 2:
    ratio = peer[0]["seconds"] / peer[1]["seconds"]  # diffusers' seconds over jaxinf's
    lines.append(f"- peer: jaxinf {ratio:.2f}x the speed of diffusers' DiTPipeline "
                 f"(goal >= 2x), samples agree to {peer[0]['max_abs_diff']:.1e}.")
  return "\n".join(lines)


def peer_comparison(cfg: Config) -> list[dict]:
  """DiTPipeline (torch, CPU) vs jaxinf on the same DiT-S/2-sized random weights."""
  import torch
  import diffusers
  from jaxinf.checkpoints import dit as dit_ckpt
  from jaxinf.checkpoints import vae as vae_ckpt
  from jaxinf.models.functional import to_functional
  from jaxinf.models.vae import AutoencoderKL

  size = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12) if not cfg.smoke else \
      dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)
  transformer = diffusers.DiTTransformer2DModel(
      in_channels=4, out_channels=8, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
      **size).eval()
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, sample_size=32,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
  g = torch.Generator().manual_seed(cfg.seed)
  with torch.no_grad():  # random weights everywhere (adaLN-Zero would make the DiT output zero)
    for model in (transformer, vae):
      for name, p in model.named_parameters():
        if p.ndim == 1:
          base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
          p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))
        else:
          p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    emb0 = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(emb0.state_dict())
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      prediction_type="epsilon", clip_sample=False)
  pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  labels = list(range(0, 1000, 1000 // cfg.peer_batch))[: cfg.peer_batch]

  def run_pipe():
    return pipe(class_labels=labels, guidance_scale=cfg.peer_guidance,
                num_inference_steps=cfg.peer_steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images

  sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  dcfg = dit_ckpt.dit_config_from_diffusers(transformer.config)
  dparams = dit_ckpt.dit_params_from_state_dict(sd(transformer), dcfg, "diffusers")
  apply, _ = to_functional(DiT(dcfg, rngs=nnx.Rngs(0)))
  vcfg = vae_ckpt.vae_config_from_diffusers(vae.config)
  vparams = vae_ckpt.vae_params_from_state_dict(sd(vae), vcfg)
  decode, _ = to_functional(AutoencoderKL(vcfg, rngs=nnx.Rngs(0)), "decode_latents")
  init = torch.randn((len(labels), 4, 16, 16), generator=torch.Generator().manual_seed(0)).numpy()
  x_init = jnp.asarray(init.transpose(0, 2, 3, 1))
  den = dit_denoiser(apply, dparams, dcfg)
  sampler_fn = compile_sample(den, schedules.NoiseSchedule(), solvers.DDIM(), x_init.shape,
                              steps=cfg.peer_steps, cond=jnp.asarray(labels),
                              guidance=CFG(cfg.peer_guidance), x_init=x_init)
  decode_fn = jax.jit(lambda p, z: jnp.clip(decode(p, z) / 2 + 0.5, 0.0, 1.0))

  def run_jax():
    return np.asarray(jax.block_until_ready(decode_fn(vparams, sampler_fn(jax.random.key(0)))))

  ref, ours = run_pipe(), run_jax()  # warm-up (and jaxinf's compilation)
  diff = float(np.abs(ref - ours).max())
  if diff > 1e-4:
    raise AssertionError(f"peer: jaxinf and DiTPipeline disagree by {diff:.2e} > 1e-4")
  t_torch, t_jax = [], []
  for _ in range(cfg.peer_repeats):
    t0 = time.perf_counter(); run_pipe(); t_torch.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); run_jax(); t_jax.append(time.perf_counter() - t0)
  shared = dict(study="peer", steps=cfg.peer_steps, nfe=2 * cfg.peer_steps, fd=float("nan"),
                cond_accuracy=float("nan"), max_abs_diff=diff, compile_seconds=float("nan"))
  name = "DiT-S/2 16x16x4" if not cfg.smoke else "tiny DiT 16x16x4"
  rows = [dict(shared, sampler=f"diffusers DiTPipeline {name}", solver="ddim",
               seconds=statistics.median(t_torch)),
          dict(shared, sampler=f"jaxinf sample+decode {name}", solver="ddim",
               seconds=statistics.median(t_jax))]
  for r in rows:
    print(f"peer     {r['sampler']:40s} {r['seconds']:.3f} s (max |diff| {diff:.1e})", flush=True)
  return rows


def plot(path: Path, rows: list[dict]) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  solver_rows = [r for r in rows if r["study"] in ("solver", "few-step")]
  for label in dict.fromkeys(r["sampler"] for r in solver_rows):
    pts = sorted((r for r in solver_rows if r["sampler"] == label), key=lambda r: r["nfe"])
    for ax, key in zip(axes, ("nfe", "seconds")):
      ax.plot([r[key] for r in pts], [r["fd"] for r in pts], "o-", label=label, ms=4)
  cache_rows = [r for r in rows if r["study"] == "cache"]
  for r in cache_rows:
    for ax, key in zip(axes, ("refresh", "seconds")):
      ax.scatter(r[key], r["fd"], marker="*", s=80, color="k")
      ax.annotate(r["sampler"], (r[key], r["fd"]), fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
  for ax, key in zip(axes, ("NFE (model evaluations; caching: refreshes)", "wall seconds")):
    ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("FD-digits")
  axes[0].legend(fontsize=7)
  axes[0].set_title("FD against NFE")
  axes[1].set_title("FD against wall time (compiled)")
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.cli(run, Config)
