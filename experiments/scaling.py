"""Scale-out on 1/2/4/8 devices: data- and tensor-parallel DiT sampling and LM generation, and
patch-parallel DiT sampling (exact, DistriFusion, PCPP) — outputs against one device, bytes
communicated per step from the compiled HLO, wall time, and the stale modes' FD-digits and
conditional accuracy against the exact mode.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.scaling
    python -m experiments.scaling --smoke            # the test's size (sets the flag itself)
    # sized for a TPU v5e-8 or an 8-GPU node (documented, not run here):
    python -m experiments.scaling --dit DiT-XL/2 --batch 8 --ddim-steps 50 --lm-width 2048 \\
      --lm-layers 24 --lm-heads 16 --prompt-len 512 --new-tokens 256 --quality-per-class 0

With 8 forced host devices on this machine the "devices" share 2 CPU cores: wall times measure
the cost of the partitioned program (collectives included), not a speed-up. Bytes per step are
counted in the compiled HLO (`jaxinf.parallel.patch.hlo_collective_bytes`): for the data/tensor
rows every collective of the compiled sampler/decoder with loop bodies counted once (so, per step,
plus any one-off collectives outside the loop); for the patch rows, one compiled model step (a
stale step for DistriFusion/PCPP), which `closed_form_communication` predicts (checked per row).
Quality (FD-digits, conditional accuracy with the shipped digits classifier) uses the
quickstart's trained digits DiT (`jaxinf.recipes.quickstart_dit`; trained here if missing); the
smoke run scores an untrained DiT-tiny (the numbers then only exercise the path).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the device count is fixed when JAX starts its backend
  _FORCE = "--xla_force_host_platform_device_count=8"
  if _FORCE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FORCE}".strip()

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import common  # noqa: E402
from jaxinf.decoding.generate import generate  # noqa: E402
from jaxinf.diffusion import schedules  # noqa: E402
from jaxinf.diffusion.denoiser import dit_denoiser  # noqa: E402
from jaxinf.diffusion.sample import sample  # noqa: E402
from jaxinf.diffusion.solvers import DDIM  # noqa: E402
from jaxinf.metrics.digits_classifier import DigitsEvaluator  # noqa: E402
from jaxinf.models import dit, families  # noqa: E402
from jaxinf.models.functional import to_functional  # noqa: E402
from jaxinf.models.transformer import TransformerConfig  # noqa: E402
from jaxinf.parallel import patch as pp  # noqa: E402
from jaxinf.parallel import shard  # noqa: E402
from jaxinf.parallel.mesh import make_mesh  # noqa: E402
from jaxinf.recipes.quickstart_dit import (QUICKSTART_RESULTS, QuickstartDiT,  # noqa: E402
                                           balanced_labels, digits_scores, dit_folder)

# The papers' headline figures (from their abstracts; our rows are a digits DiT on CPU devices).
PAPER_FIGURES = [
    dict(source="DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481, abstract)",
         figure="up to 6.1x speed-up on 8 A100s vs one, SDXL, no quality degradation"),
    dict(source="PCPP (Zhang, Luo & Lu 2024, arXiv 2412.02962, abstract)",
         figure="~70% less communication than DistriFusion; 2.36-8.02x speed-up on 4-8 GPUs "
                "(DistriFusion 2.32-6.71x), possible quality loss"),
]


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/scaling"
  devices: tuple[int, ...] = (1, 2, 4, 8)
  dit: str = "DiT-digits"     # random weights for the identity/bytes/time rows
  batch: int = 16             # DiT samples and LM prompts (divisible by every device count)
  ddim_steps: int = 20
  lm_width: int = 128         # transformer hidden size (MLP 4x)
  lm_layers: int = 4
  lm_heads: int = 8
  prompt_len: int = 16
  new_tokens: int = 32
  warmup_steps: int = 2       # DistriFusion / PCPP synchronous steps
  pcpp_fraction: float = 0.5  # PCPP: share of each neighbouring band attended to
  quality_devices: int = 4    # patch bands for the FD / accuracy comparison
  quality_per_class: int = 50  # samples per digit class (0: skip the quality rows)
  quickstart_results: str = QUICKSTART_RESULTS  # where the trained digits DiT lives
  repeats: int = 3            # timed runs (median) after a warm-up

  def check(self) -> None:
    """The options alone; whether JAX has `max(devices)` devices is checked as the run starts."""
    super().check()
    common.check_ints(self, "devices", "batch", "lm_width", "lm_layers", "lm_heads",
                      "prompt_len", "new_tokens", "quality_devices", "repeats")
    common.check_ints(self, "quality_per_class", low=0)
    common.check_ints(self, "ddim_steps", high=schedules.NoiseSchedule().num_train_timesteps)
    common.check_choices(self, "dit", choices=tuple(dit.DIT_CONFIGS))
    if any(self.batch % n for n in self.devices):
      common.refuse("batch", f"expected a multiple of every device count {self.devices}, got "
                             f"{self.batch}")
    if self.lm_width % self.lm_heads:
      common.refuse("lm_width", f"{self.lm_width} does not split into lm_heads={self.lm_heads} "
                                f"heads")
    for mode in pp.MODES:  # the patch-parallel modes' own checks
      common.check_with("warmup_steps", lambda m=mode: pp.PatchParallel(
          m, warmup_steps=self.warmup_steps))
      common.check_with("pcpp_fraction", lambda m=mode: pp.PatchParallel(
          m, warmup_steps=self.warmup_steps, fraction=self.pcpp_fraction))
    if not self.quickstart_results:
      common.refuse("quickstart_results", "expected a folder, got ''")


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, devices=(1, 4), dit="DiT-tiny", batch=4, ddim_steps=3, lm_width=32, lm_layers=2,
      lm_heads=4, prompt_len=4, new_tokens=4, warmup_steps=1, quality_per_class=2, repeats=1,
      out_dir=common.smoke_dir(cfg.out_dir)))


def _dit_cfg(cfg: Config) -> dit.DiTConfig:
  return dit.dit_config(cfg.dit, **({"num_heads": 4} if cfg.dit == "DiT-tiny" else {}))


def _lm_cfg(cfg: Config) -> TransformerConfig:
  return TransformerConfig(vocab_size=64, hidden_size=cfg.lm_width, num_layers=cfg.lm_layers,
                           num_heads=cfg.lm_heads, num_kv_heads=cfg.lm_heads,
                           mlp_hidden=4 * cfg.lm_width, max_len=cfg.prompt_len + cfg.new_tokens,
                           init_std=0.3 if cfg.lm_width <= 32 else 0.05)


def _kinds(n: int) -> tuple[str, ...]:
  return ("none",) if n == 1 else ("data", "tensor")


def _mesh(kind: str, n: int, heads: int):
  devices = jax.devices()[:n]
  if kind == "none":
    return make_mesh(data=1, devices=devices), "one device"
  if kind == "data":
    return make_mesh(data=n, devices=devices), f"data={n}"
  tensor = max(t for t in (1, 2, 4, 8) if t <= n and heads % t == 0 and n % t == 0)
  return (make_mesh(data=n // tensor, tensor=tensor, devices=devices),
          f"data={n // tensor} x tensor={tensor}")


def _timed(fn, repeats: int) -> float:
  return common.median_seconds(fn, repeats)


def _dit_rows(cfg: Config, n: int, ref: dict, host_params) -> list[dict]:
  dcfg = _dit_cfg(cfg)
  module = nnx.eval_shape(lambda: dit.DiT(dcfg, rngs=nnx.Rngs(0)))
  apply = to_functional(module)[0]
  labels = np.arange(cfg.batch, dtype=np.int32) % dcfg.num_classes
  rows = []
  for kind in _kinds(n):
    mesh, where = _mesh(kind, n, dcfg.num_heads)
    params = shard.shard_params(dcfg, host_params, mesh)
    y = shard.shard_batch(labels, mesh, what="labels")

    @jax.jit
    def draw(params, y):
      return sample(jax.random.key(cfg.seed), dit_denoiser(apply, params, dcfg),
                    schedules.NoiseSchedule(), DDIM(), (cfg.batch, *dcfg.sample_shape),
                    steps=cfg.ddim_steps, cond=y)

    with jax.set_mesh(mesh):
      compiled = draw.lower(params, y).compile()
      out = np.asarray(compiled(params, y))
      hlo = pp.hlo_collective_bytes(compiled.as_text())
      seconds = _timed(lambda: compiled(params, y), cfg.repeats)
    ref.setdefault("dit", out)
    rows.append(dict(model=cfg.dit, work=f"DDIM {cfg.ddim_steps}", parallel=kind, devices=n,
                     mesh=where, max_abs_diff=float(np.abs(out - ref["dit"]).max()),
                     max_abs_ref=float(np.abs(ref["dit"]).max()), tokens_identical="", bytes_per_step=hlo["sent"],
                     closed_form="", seconds=seconds))
  return rows


def _lm_rows(cfg: Config, n: int, ref: dict) -> list[dict]:
  lcfg = _lm_cfg(cfg)
  model, _ = families.build(lcfg)
  prompts = np.random.default_rng(cfg.seed).integers(
      0, lcfg.vocab_size, (cfg.batch, cfg.prompt_len)).astype(np.int32)
  rows = []
  for kind in _kinds(n):
    mesh, where = _mesh(kind, n, lcfg.num_heads)
    params = shard.init_params(model, mesh, seed=cfg.seed)
    x = shard.shard_batch(prompts, mesh, what="prompts")

    with jax.set_mesh(mesh):
      compiled = jax.jit(lambda p, x: generate(model, p, x, jax.random.key(cfg.seed),
                                               max_new_tokens=cfg.new_tokens).tokens
                         ).lower(params, x).compile()
      tokens = np.asarray(compiled(params, x))
      hlo = pp.hlo_collective_bytes(compiled.as_text())
      seconds = _timed(lambda: compiled(params, x), cfg.repeats)
    ref.setdefault("lm", tokens)
    rows.append(dict(model=f"transformer w{cfg.lm_width}", work=f"greedy {cfg.new_tokens}",
                     parallel=kind, devices=n, mesh=where, max_abs_diff="", max_abs_ref="",
                     tokens_identical=bool((tokens == ref["lm"]).all()),
                     bytes_per_step=hlo["sent"], closed_form="", seconds=seconds))
  return rows


def _patch_params(dcfg, seed):
  """Random DiT weights (for every DiT row) with the zero-initialised adaLN and output layers perturbed, so that
  every token's output depends on the others (at init the model outputs zeros)."""
  params = to_functional(dit.DiT(dcfg, rngs=nnx.Rngs(seed)))[1]
  return dit.jitter_params(params, seed + 1)


def _patch_rows(cfg: Config, n: int, ref: dict, params) -> list[dict]:
  dcfg = _dit_cfg(cfg)
  mesh = make_mesh(sequence=n, devices=jax.devices()[:n])
  labels = jnp.asarray(np.arange(cfg.batch, dtype=np.int32) % dcfg.num_classes)
  if "patch" not in ref:
    ref["patch"] = np.asarray(sample(
        jax.random.key(cfg.seed), dit_denoiser(to_functional(dit.DiT(dcfg, rngs=nnx.Rngs(0)))[0],
                                               params, dcfg),
        schedules.NoiseSchedule(), DDIM(), (cfg.batch, *dcfg.sample_shape),
        steps=cfg.ddim_steps, cond=labels))
  rows = []
  for mode in pp.MODES:
    patch = pp.PatchParallel(mode, warmup_steps=cfg.warmup_steps, fraction=cfg.pcpp_fraction)
    if mode == "pcpp" and (dcfg.num_tokens // n) * cfg.pcpp_fraction % 1:
      continue  # the band is too short for this fraction
    draw = lambda patch=patch: pp.sample_patch_parallel(  # noqa: E731
        jax.random.key(cfg.seed), dcfg, params, schedules.NoiseSchedule(), DDIM(),
        (cfg.batch, *dcfg.sample_shape), steps=cfg.ddim_steps, mesh=mesh, patch=patch,
        cond=labels)
    out = np.asarray(draw())
    stale = mode != "exact"
    hlo = pp.communication_per_step(dcfg, params, mesh, patch, cfg.batch, stale=stale)
    closed = pp.closed_form_communication(dcfg, mesh, patch, cfg.batch, stale=stale)
    rows.append(dict(model=cfg.dit, work=f"DDIM {cfg.ddim_steps}", parallel=f"patch {mode}",
                     devices=n, mesh=f"sequence={n}",
                     max_abs_diff=float(np.abs(out - ref["patch"]).max()),
                     max_abs_ref=float(np.abs(ref["patch"]).max()), tokens_identical="",
                     bytes_per_step=hlo["sent"], closed_form=closed["sent"],
                     seconds=_timed(draw, cfg.repeats)))
  return rows


def _quality_rows(cfg: Config) -> list[dict]:
  """FD-digits and conditional accuracy of exact / DistriFusion / PCPP samples of the digits DiT
  on `quality_devices` bands (same key, same labels)."""
  qs = QuickstartDiT()
  if cfg.smoke:
    dcfg = _dit_cfg(cfg)
    params, pred = _patch_params(dcfg, cfg.seed), "epsilon"
  else:
    dcfg, _, state, _ = qs.trained(dit_folder(cfg.quickstart_results), progress=cfg.progress)
    # restored arrays are committed to device 0; host copies let the patch mesh place them
    params, pred = jax.device_get(state["ema"]), qs.train.prediction_type
  n = cfg.quality_devices
  mesh = make_mesh(sequence=n, devices=jax.devices()[:n])
  labels = balanced_labels(cfg.quality_per_class)
  evaluator = DigitsEvaluator.load()
  rows, base = [], None
  for mode in pp.MODES:
    patch = pp.PatchParallel(mode, warmup_steps=cfg.warmup_steps, fraction=cfg.pcpp_fraction)
    x = np.asarray(pp.sample_patch_parallel(
        jax.random.key(cfg.seed + 1), dcfg, params, qs.schedule(), DDIM(),
        (len(labels), *dcfg.sample_shape), steps=cfg.ddim_steps, mesh=mesh, patch=patch,
        cond=labels, prediction_type=pred))
    scores = digits_scores(evaluator, x, labels)
    sent = pp.closed_form_communication(dcfg, mesh, patch, len(labels), stale=mode != "exact")
    base = base or dict(scores, sent=sent["sent"], x=x)
    rows.append(dict(mode=mode, bands=n, warmup_steps=cfg.warmup_steps if mode != "exact" else "",
                     fd_digits=scores["fd"], fd_change=scores["fd"] - base["fd"],
                     cond_accuracy=scores["cond_accuracy"],
                     accuracy_change=scores["cond_accuracy"] - base["cond_accuracy"],
                     rel_l2_vs_exact=float(np.linalg.norm(x - base["x"])
                                           / np.linalg.norm(base["x"])),
                     bytes_per_stale_step=sent["sent"]))
  df = next(r["bytes_per_stale_step"] for r in rows if r["mode"] == "distrifusion")
  for r in rows:
    r["bytes_vs_distrifusion"] = r["bytes_per_stale_step"] / df if df else float("nan")
  return rows


def _plot(rows: list[dict], path: Path) -> None:
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for name in sorted({r["parallel"] + " " + r["model"] for r in rows}):
    sel = [r for r in rows if r["parallel"] + " " + r["model"] == name]
    devs = [r["devices"] for r in sel]
    ax1.plot(devs, [max(r["bytes_per_step"], 1) for r in sel], "o-", label=name)
    ax2.plot(devs, [r["seconds"] for r in sel], "o-", label=name)
  ax1.set(xscale="log", yscale="log", xlabel="devices", ylabel="bytes sent per device per step",
          title="communication (compiled HLO)")
  ax2.set(xscale="log", xlabel="devices", ylabel="seconds (8 devices share 2 CPU cores)",
          title="wall time")
  ax1.legend(fontsize=6)
  common.save_figure(fig, path)


def run(cfg: Config) -> dict:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  if max(cfg.devices) > len(jax.devices()):
    raise ValueError(f"devices: {cfg.devices} needs {max(cfg.devices)} devices, JAX has "
                     f"{len(jax.devices())} (set XLA_FLAGS=--xla_force_host_platform_device_count"
                     f"=8 before JAX starts)")
  t0 = time.perf_counter()
  ref: dict = {}
  rows = []
  patch_params = _patch_params(_dit_cfg(cfg), cfg.seed)
  for n in sorted(cfg.devices):
    rows += _dit_rows(cfg, n, ref, patch_params) + _lm_rows(cfg, n, ref) + _patch_rows(cfg, n, ref,
                                                                         patch_params)
  quality = _quality_rows(cfg) if cfg.quality_per_class else []
  out = common.study_dir(cfg.out_dir)
  _plot(rows, out / "scaling.png")
  notes = (
      f"{len(jax.devices())} {jax.devices()[0].platform} devices sharing the host's CPU cores "
      f"(wall times include collectives but no real parallel speed-up). `max_abs_diff` against "
      f"the 1-device row of the same model (fp32; `max_abs_ref`: the largest |x| of that row, "
      f"large for the random-weight DiT's epsilon-prediction samples); `tokens_identical`: "
      f"greedy tokens vs 1 device. `bytes_per_step`: bytes the busiest device sends per step, "
      f"from the compiled HLO (all-gather operand x (g-1), collective-permute operand, "
      f"all-reduce 2(g-1)/g x operand; data/tensor rows: every collective of the compiled loop, "
      f"loop bodies counted once). A PCPP band with two neighbours sends both permutes; at 2 "
      f"bands each has one, so there a device sends half the PCPP figure. "
      f"`closed_form`: the same from the shapes (patch rows). Patch stale rows: a stale step "
      f"(warm-up steps cost the exact row's bytes). DistriFusion/PCPP `max_abs_diff` is the "
      f"stale approximation, not an error.\n\n"
      + common.markdown_table(PAPER_FIGURES)
      + ("\n## Stale modes vs exact (FD-digits, conditional accuracy)\n\n"
         + common.markdown_table(quality) if quality else ""))
  common.write_report(out, rows, title="Scaling: data, tensor and patch parallel", notes=notes,
                      extra=dict(config=dataclasses.asdict(cfg), quality=quality,
                                 paper_figures=PAPER_FIGURES))
  common.print_report(out, time.perf_counter() - t0)
  return dict(rows=rows, quality=quality)


if __name__ == "__main__":
  common.cli(run, Config)
