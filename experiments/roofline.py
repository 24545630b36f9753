"""Roofline study (issue 14, the LLM-Viewer method): idealised runtime of every language-model
family and of the DiT on data-sheet devices and on this machine, beside jaxinf's measured times.

1. Tables: for the code models (the four "-1m" families and `transformer-12m`) and DiT-S/2 at a
   16x16x4 latent, decode at batch 1 and 64 (and prefill) on H100 SXM, H200, TPU v5e / v5p / v6e
   (bf16) and this CPU (fp32, measured by `roofline.measure_host`): predicted ms, bound and
   arithmetic intensity (`jaxinf.analysis.roofline`).
2. Measured on this CPU: the compiled decode step of each model (a jitted `lax.scan` of
   `model.step` over `decode_steps` tokens, per token) at batch 1 and `decode_batch`, against the
   roofline's prediction for this machine: measured / predicted.
3. The DiT-S/2 sampling step of the issue (batch 4 with CFG: 8 latents per forward): the jitted
   forward's time as a fraction of this machine's measured matmul FLOP/s, and the time of the same
   matmuls alone (what the step would take with nothing but its matmuls).

    python -m experiments.roofline            # -> results/roofline/{results.json, report.md,
                                              #    roofline.png, meta.json}
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from experiments import common
from jaxinf.analysis import roofline as rl
from jaxinf.diffusion import schedules, solvers
from jaxinf.diffusion.denoiser import dit_denoiser
from jaxinf.diffusion.guidance import CFG
from jaxinf.diffusion.sample import sample
from jaxinf.models import families
from jaxinf.models.dit import DiT, dit_config
from jaxinf.models.functional import to_functional
from jaxinf.recipes import code_models

CODE_MODELS = ("transformer-1m", "mamba-1m", "rwkv7-1m", "transnormer-1m", "transformer-12m")
TINY_MODELS = ("transformer-tiny", "mamba-tiny", "rwkv7-tiny", "transnormer-tiny")


@dataclasses.dataclass(frozen=True)
class Config(common.StudyConfig):
  out_dir: str = "results/roofline"  # where results go
  models: tuple[str, ...] = CODE_MODELS  # registered sizes (one per family at least)
  devices: tuple[str, ...] = tuple(rl.DEVICES)  # data-sheet devices; this CPU is always added
  dtype: str = "bfloat16"            # the data-sheet devices' dtype (this CPU runs float32)
  context: int = 1024                # decode: the KV buffer / prefill: the prompt length
  batches: tuple[int, ...] = (1, 64)  # decode batches of the device tables
  prefill_batch: int = 8
  decode_batch: int = 64             # the measured decode's larger batch (beside batch 1)
  decode_steps: int = 32             # tokens per measured decode scan
  dit: str = "DiT-S/2"               # the DiT of the sampling case
  dit_latent: int = 16               # latent side (16x16x4: 128 px images)
  dit_batch: int = 8                 # latents per forward (batch 4 with CFG)
  dit_steps: int = 10                # DDIM steps of the timed guided sampling (per-step time)
  repeats: int = 5                   # timing medians
  host_matmul: int = 2048            # measure_host's matmul size
  host_copy_mib: int = 256           # measure_host's copy size

  def check(self) -> None:
    super().check()
    if not self.models:
      common.refuse("models", "expected at least one model size, got ()")
    for size in self.models:
      common.check_with("models", lambda s=size: families.named_config(s))
    common.check_choices(self, "devices", choices=tuple(rl.DEVICES))
    common.check_choices(self, "dtype", choices=tuple(rl.DTYPE_BYTES))
    common.check_ints(self, "context", "batches", "prefill_batch", "decode_batch", "repeats",
                      "dit_batch", "dit_steps", "host_copy_mib")
    if self.dit_batch % 2:
      common.refuse("dit_batch", f"expected an even number (CFG doubles the batch), got "
                                 f"{self.dit_batch}")
    common.check_ints(self, "decode_steps", low=1, high=self.context // 2)
    common.check_ints(self, "host_matmul", low=64)
    cfg = common.check_with("dit", lambda: dit_config(self.dit))
    common.check_ints(self, "dit_latent", low=cfg.patch_size)
    common.check_with("dit_latent", lambda: dit_config(self.dit, input_size=self.dit_latent))


def smoke_config(cfg: Config) -> Config:
  """The tiny size the tests run; options given beside `--smoke` are kept (`common.smoke_sized`)."""
  return common.smoke_sized(cfg, dataclasses.replace(
      cfg, out_dir=common.smoke_dir(cfg.out_dir), models=TINY_MODELS, context=32,
      batches=(1, 4), prefill_batch=2, decode_batch=4, decode_steps=2, dit="DiT-tiny",
      dit_latent=8, dit_batch=2, dit_steps=1, repeats=1, host_matmul=256, host_copy_mib=8))


# --- the tables ---------------------------------------------------------------------------------

def _row(model, family, mode, batch, device, pred, extra=None):
  return {"model": model, "family": family, "mode": mode, "batch": batch,
          "device": device.name, "predicted_ms": pred.seconds * 1e3, "bound": pred.bound,
          "intensity": pred.intensity, "gflop": pred.flops / 1e9, "mbytes": pred.bytes / 1e6,
          **(extra or {})}


def prediction_rows(cfg: Config, devices: list[rl.Device], host: rl.Device) -> list[dict]:
  rows = []
  dit_cfg = dit_config(cfg.dit, input_size=cfg.dit_latent)
  workloads = [("decode", b) for b in cfg.batches] + [("prefill", cfg.prefill_batch)]
  for dev in devices + [host]:
    dtype = "float32" if dev is host else cfg.dtype
    for size in cfg.models:
      for mode, batch in workloads:
        ops = rl.count(size, mode, batch, cfg.context, dtype)
        rows.append(_row(size, rl.family_name(size), mode, batch, dev, rl.total(ops, dev)))
    ops = rl.count(dit_cfg, batch=cfg.dit_batch, dtype=dtype)
    rows.append(_row(f"{cfg.dit} {cfg.dit_latent}x{cfg.dit_latent}", "dit", "forward",
                     cfg.dit_batch, dev, rl.total(ops, dev)))
  return rows


# --- measured on this CPU -----------------------------------------------------------------------

def _decode_scan(model, steps: int):
  """`steps` decode steps of one token per row, compiled as one scan (what `generate`'s loop
  runs, without sampling)."""
  @jax.jit
  def run(params, tokens, cache):
    def body(cache, _):
      logits, cache = model.step(params, tokens, cache)
      return cache, logits[:, -1, 0]
    return jax.lax.scan(body, cache, None, length=steps)
  return run


def measure_decode(cfg: Config, host: rl.Device, progress: bool) -> list[dict]:
  rows = []
  start = cfg.context // 2  # cache rows hold this many tokens; the scan appends decode_steps
  for size in tqdm(cfg.models, desc="decode", disable=not progress):
    model, params = families.build(families.named_config(size), seed=cfg.seed)
    for batch in sorted({1, cfg.decode_batch}):
      cache = model.init_cache(batch, cfg.context)
      cache = dict(cache, length=jnp.full((batch,), start, jnp.int32))
      tokens = jnp.ones((batch, 1), jnp.int32)
      run = _decode_scan(model, cfg.decode_steps)
      secs = common.median_seconds(lambda: run(params, tokens, cache), cfg.repeats)
      per_token = secs / cfg.decode_steps
      ops = rl.count(model, "decode", batch, cfg.context, "float32")
      pred = rl.total(ops, host)
      mem = sum(o.bytes for o in ops) / host.bandwidth
      comp = sum(o.flops for o in ops) / host.peak_flops
      rows.append({"model": size, "family": rl.family_name(size), "mode": "decode (measured)",
                   "batch": batch, "device": host.name, "predicted_ms": pred.seconds * 1e3,
                   "bound": pred.bound, "intensity": pred.intensity,
                   "measured_ms": per_token * 1e3, "measured/predicted": per_token / pred.seconds,
                   "measured/bandwidth_bound": per_token / mem,
                   "measured/compute_bound": per_token / comp,
                   "achieved_gflops": sum(o.flops for o in ops) / per_token / 1e9,
                   "achieved_gbps": sum(o.bytes for o in ops) / per_token / 1e9})
      del run
  return rows


def _dit_matmul_shapes(dit_cfg, b):
  """(name, batch dims, m, k, n, count per forward) of every matmul of the DiT forward."""
  d, tn, h = dit_cfg.hidden_size, dit_cfg.num_tokens, dit_cfg.num_heads
  m, dh, depth = int(d * dit_cfg.mlp_ratio), d // h, dit_cfg.depth
  return [("adaLN [B,d]x[d,6d]", 1, b, d, 6 * d, depth),
          ("qkv [BT,d]x[d,3d]", 1, b * tn, d, 3 * d, depth),
          ("scores per head [T,dh]x[dh,T]", b * h, tn, dh, tn, depth),
          ("values per head [T,T]x[T,dh]", b * h, tn, tn, dh, depth),
          ("proj [BT,d]x[d,d]", 1, b * tn, d, d, depth),
          ("fc1 [BT,d]x[d,4d]", 1, b * tn, d, m, depth),
          ("fc2 [BT,4d]x[4d,d]", 1, b * tn, m, d, depth)]


def matmul_rates(dit_cfg, b, host: rl.Device, repeats: int) -> list[dict]:
  """Each matmul shape of the DiT forward timed alone (jitted, fp32): its FLOP/s as a fraction of
  this machine's large-matmul peak, and its share of the forward's matmul time."""
  rows = []
  for name, batch, m, k, n, count in _dit_matmul_shapes(dit_cfg, b):
    x = jax.random.normal(jax.random.key(0), (batch, m, k), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (batch, k, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y))
    secs = common.median_seconds(lambda: f(x, y), repeats)
    flops = 2.0 * batch * m * k * n
    rows.append({"matmul": name, "per_forward": count, "gflop": count * flops / 1e9,
                 "ms_per_forward": count * secs * 1e3,
                 "fraction_of_peak": flops / secs / host.peak_flops})
  return rows


def _dit_matmuls(dit_cfg, batch):
  """A jitted function doing exactly the DiT forward's matmuls (same shapes, fp32), nothing
  else: the floor the forward would reach if its elementwise work were free."""
  d, tn, h = dit_cfg.hidden_size, dit_cfg.num_tokens, dit_cfg.num_heads
  m, dh = int(d * dit_cfg.mlp_ratio), d // h
  key = jax.random.key(0)
  w = {name: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02
       for i, (name, shape) in enumerate([("qkv", (d, 3 * d)), ("proj", (d, d)),
                                          ("fc1", (d, m)), ("fc2", (m, d)),
                                          ("ada", (d, 6 * d))])}
  x = jax.random.normal(key, (batch, tn, d), jnp.float32)
  c = jax.random.normal(key, (batch, d), jnp.float32)

  @jax.jit
  def run(x, c, w):
    for _ in range(dit_cfg.depth):
      mod = c @ w["ada"]
      qkv = (x @ w["qkv"]).reshape(batch, tn, 3, h, dh)
      s = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1])
      o = jnp.einsum("bhqk,bkhd->bqhd", s, qkv[:, :, 2]).reshape(batch, tn, d)
      x = (o @ w["proj"]) @ w["fc1"] @ w["fc2"] + mod[:, None, :d]
    return x

  return lambda: run(x, c, w)


def measure_dit(cfg: Config, host: rl.Device) -> dict:
  dit_cfg = dit_config(cfg.dit, input_size=cfg.dit_latent)
  apply, params = to_functional(DiT(dit_cfg, rngs=nnx.Rngs(cfg.seed)))
  b = cfg.dit_batch
  x = jax.random.normal(jax.random.key(cfg.seed), (b,) + dit_cfg.sample_shape)
  t = jnp.full((b,), 500.0)
  y = jnp.arange(b, dtype=jnp.int32) % dit_cfg.num_classes
  forward = jax.jit(apply)
  secs = common.median_seconds(lambda: forward(params, x, t, y), cfg.repeats)
  matmul_secs = common.median_seconds(_dit_matmuls(dit_cfg, b), cfg.repeats)
  rates = matmul_rates(dit_cfg, b, host, cfg.repeats)
  # the guided DDIM sampling of the issue: b // 2 latents, CFG doubling them per forward
  half = b // 2
  den = dit_denoiser(apply, params, dit_cfg)
  cond = jnp.arange(half, dtype=jnp.int32) % dit_cfg.num_classes
  guidance = CFG(4.0) if dit_cfg.null_class is not None else None

  def sampled():
    return sample(jax.random.key(cfg.seed), den, schedules.NoiseSchedule(), solvers.DDIM(),
                  (half,) + dit_cfg.sample_shape, steps=cfg.dit_steps, cond=cond,
                  guidance=guidance)

  sample_secs = common.median_seconds(sampled, max(1, cfg.repeats // 2))
  ops = rl.count(dit_cfg, batch=b, dtype="float32")
  tot = rl.totals(ops)
  kinds = rl.by_kind(ops)
  mm = sum(2.0 * bt * m * k * n * c for _, bt, m, k, n, c in _dit_matmul_shapes(dit_cfg, b))
  return {"model": f"{cfg.dit} {cfg.dit_latent}x{cfg.dit_latent}", "batch": b,
          "forward_ms": secs * 1e3, "matmul_only_ms": matmul_secs * 1e3,
          "gflop": tot["flops"] / 1e9, "matmul_gflop": mm / 1e9,
          "elementwise_share_of_flops": 1 - mm / tot["flops"],
          "transcendentals_m": tot["transcendentals"] / 1e6,
          "host_peak_gflops": host.peak_flops / 1e9,
          "fraction_of_peak": tot["flops"] / secs / host.peak_flops,
          "matmul_only_fraction_of_peak": mm / matmul_secs / host.peak_flops,
          "predicted_ms": rl.total(ops, host).seconds * 1e3,
          "sample_step_ms": sample_secs / cfg.dit_steps * 1e3, "sample_steps": cfg.dit_steps,
          "guided": guidance is not None, "matmul_rates": rates,
          "flops_by_kind": {k: v["flops"] for k, v in kinds.items()}}


# --- the report ---------------------------------------------------------------------------------

def _plot(rows, devices, host, path):
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(8, 5.5))
  xs = np.logspace(-1, 4, 200)
  for dev in devices + [host]:
    line, = ax.plot(xs, np.minimum(dev.peak_flops, xs * dev.bandwidth) / 1e12, lw=1,
                    label=dev.name)
    pts = [r for r in rows if r["device"] == dev.name and r["mode"] == "decode"]
    for r in pts:
      flops_s = r["gflop"] * 1e9 / (r["predicted_ms"] / 1e3) / 1e12
      ax.scatter(r["intensity"], flops_s, s=12, color=line.get_color(),
                 marker="o" if r["batch"] == 1 else "^")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("arithmetic intensity (flop / byte)")
  ax.set_ylabel("attainable TFLOP/s")
  ax.set_title("roofline: decode at batch 1 (o) and the larger batch (^), every model")
  ax.legend(fontsize=7)
  common.save_figure(fig, path)


def pivot(rows, mode, batch) -> list[dict]:
  """One row per model: its intensity (at the devices' dtype and at fp32 on this CPU) and the
  predicted ms on each device, with the bound's initial (M memory, C compute)."""
  out = {}
  for r in rows:
    if r["mode"] != mode or r["batch"] != batch:
      continue
    row = out.setdefault(r["model"], {"model": r["model"]})
    if r["device"] == "host-cpu":
      row["intensity (fp32)"] = r["intensity"]
    else:
      row["intensity"] = r["intensity"]
    row[r["device"] + " ms"] = f"{r['predicted_ms']:.4g} {r['bound'][0].upper()}"
  return list(out.values())


def _table(rows, mode, batch):
  return common.markdown_table(pivot(rows, mode, batch))


def _measured_note(cfg, measured, host) -> str:
  """What the measured decode says against the roofline, worded from the numbers."""
  lo_i, hi_i = min(r["intensity"] for r in measured), max(r["intensity"] for r in measured)
  compute = [f"{r['model']} at batch {r['batch']}" for r in measured if r["bound"] == "compute"]
  exceptions = (f", except {', '.join(compute)}, where the matmul layers at that batch pass the "
                "ridge and hold most of the predicted time" if compute else "")
  parts = [f"Measured: a jitted `lax.scan` of `model.step` over {cfg.decode_steps} tokens, per "
           f"token (median of {cfg.repeats}), fp32. Whole-step intensities are "
           f"{lo_i:.2g}-{hi_i:.2g} flop/byte against this CPU's ridge of {host.ridge:.1f}, so "
           f"the decode steps are predicted memory-bound{exceptions}: a decode step reads each "
           "weight for one multiply-add per row, and the transformer reads its whole KV buffer "
           "per token. The prediction is then the time to stream the counted bytes (weights, "
           "KV cache or states, activations) once at the measured DRAM bandwidth; "
           "measured/bandwidth_bound is measured over exactly that (bytes / bandwidth, summed "
           "over the layers)."]
  for batch in sorted({r["batch"] for r in measured}):
    sel = [r for r in measured if r["batch"] == batch]
    ratios = [r["measured/predicted"] for r in sel]
    gbps = [r["achieved_gbps"] for r in sel]
    gflops = [r["achieved_gflops"] for r in sel]
    text = (f"At batch {batch}: measured/predicted {min(ratios):.2f}-{max(ratios):.2f}, "
            f"{min(gbps):.1f}-{max(gbps):.1f} GB/s of counted bytes, "
            f"{min(gflops):.1f}-{max(gflops):.1f} GFLOP/s.")
    if max(ratios) < 1:
      text += (" Faster than the DRAM bound: the counted bytes are not all DRAM traffic (weights "
               "of 0.1-51 MB and states stay partly in the CPU's caches from token to token), "
               "so the DRAM roofline is an upper bound here, not a prediction.")
    elif min(ratios) > 1:
      text += (" Slower than the bound: activations, caches and the unfused elementwise ops of "
               "a step (one pass over memory each, which the per-layer count does not charge) "
               "and per-op overhead add to the bytes streamed.")
    else:
      text += (" Around the bound: cache-resident weights make some faster than it, the "
               "elementwise passes and per-op overhead make others slower.")
    parts.append(text)
  return " ".join(parts)


def run(cfg: Config) -> list[dict]:
  if cfg.smoke:
    cfg = smoke_config(cfg)
  t0 = time.perf_counter()
  out = common.study_dir(cfg.out_dir)
  host = rl.measure_host(matmul_size=cfg.host_matmul, copy_mib=cfg.host_copy_mib,
                         repeats=cfg.repeats)
  devices = [rl.get_device(name) for name in cfg.devices]
  rows = prediction_rows(cfg, devices, host)
  measured = measure_decode(cfg, host, cfg.progress)
  dit = measure_dit(cfg, host)
  # the machine is shared: measured again at the end, the spread says how steady it was
  host_after = host if cfg.smoke else rl.measure_host(
      matmul_size=cfg.host_matmul, copy_mib=cfg.host_copy_mib, repeats=cfg.repeats)
  dit["host_after_gflops"] = host_after.peak_flops / 1e9
  dit["host_after_gbps"] = host_after.bandwidth / 1e9
  all_rows = rows + measured
  if jax.process_index() == 0:
    _plot(rows, devices, host, out / "roofline.png")
  notes = _notes(cfg, rows, measured, dit, host)
  common.write_report(out, all_rows, title="Roofline: idealised vs measured inference time",
                      notes=notes, columns=["model", "family", "mode", "batch", "device",
                                            "predicted_ms", "bound", "intensity",
                                            "measured_ms", "measured/predicted"],
                      extra={"host": dataclasses.asdict(host), "dit": dit,
                             "devices": {d.name: dataclasses.asdict(d) for d in devices},
                             "config": dataclasses.asdict(cfg)})
  common.print_report(out, time.perf_counter() - t0)
  return all_rows


def _notes(cfg, rows, measured, dit, host) -> str:
  lines = [
      f"This machine (`measure_host`): {host.peak_flops / 1e9:.1f} GFLOP/s fp32 matmul, "
      f"{host.bandwidth / 1e9:.1f} GB/s copy bandwidth, ridge {host.ridge:.1f} flop/byte "
      f"(measured again after the timings: {dit['host_after_gflops']:.1f} GFLOP/s, "
      f"{dit['host_after_gbps']:.1f} GB/s; the 2 cores are shared with other work). "
      f"Data-sheet devices at {cfg.dtype}; this CPU at float32 (what the models run in here). "
      f"Decode: one token per row against a {cfg.context}-slot cache (the transformer's XLA form "
      "scores every slot of the buffer); prefill: "
      f"{cfg.prefill_batch} x {cfg.context} tokens. Per layer: max(flops / peak, bytes / "
      "bandwidth); a model's time is the sum over its layers.",
      "",
  ]
  for batch in cfg.batches:
    lines += [f"## Decode at batch {batch}", "", _table(rows, "decode", batch)]
  lines += [f"## Prefill at batch {cfg.prefill_batch}", "",
            _table(rows, "prefill", cfg.prefill_batch)]
  lines += ["## Measured decode on this CPU", "",
            common.markdown_table(measured, ["model", "batch", "measured_ms", "predicted_ms",
                                             "bound", "measured/predicted",
                                             "measured/bandwidth_bound", "achieved_gflops",
                                             "achieved_gbps"]),
            _measured_note(cfg, measured, host), ""]
  cfg_note = " (the issue's case: batch 4, doubled by CFG)" if dit["batch"] == 8 else ""
  lines += ["## DiT sampling step on this CPU", "",
            f"{dit['model']}, {dit['batch']} latents per forward{cfg_note}: the jitted forward "
            f"takes {dit['forward_ms']:.1f} ms for {dit['gflop']:.2f} GFLOP, "
            f"{dit['fraction_of_peak']:.2f} of this machine's measured matmul peak "
            f"({dit['host_peak_gflops']:.1f} GFLOP/s; roofline prediction "
            f"{dit['predicted_ms']:.1f} ms, compute-bound). One step of guided DDIM sampling "
            f"(`sample` with `CFG`, {dit['sample_steps']} steps timed, per step): "
            f"{dit['sample_step_ms']:.1f} ms. The forward's matmuls alone (the same shapes, "
            f"nothing else) take {dit['matmul_only_ms']:.1f} ms "
            f"({dit['matmul_only_fraction_of_peak']:.2f} of peak) for {dit['matmul_gflop']:.2f} "
            f"GFLOP; the elementwise rest is {100 * dit['elementwise_share_of_flops']:.1f}% of "
            f"the flops, plus {dit['transcendentals_m']:.1f} M transcendentals (softmax exp, "
            "GELU tanh, SiLU's logistic, rsqrt), and takes the remaining "
            f"{dit['forward_ms'] - dit['matmul_only_ms']:.1f} ms.", "",
            "Each matmul shape alone (jitted, fp32), as a fraction of the large-matmul peak:", "",
            common.markdown_table(dit["matmul_rates"]), ""]
  return "\n".join(lines)


if __name__ == "__main__":
  common.cli(run, Config)
