"""Compile every Pallas kernel on the GPU or TPU, check it against the reference, and time it.

  python -m experiments.device_check          # one H200 (or one TPU chip), under 5 minutes
  python -m experiments.device_check --cpu    # tiny sizes, Pallas in interpret mode (tested on CPU)
  python -m experiments.device_check --cpu --form tpu   # the TPU forms in TPU interpret mode

The kernel form follows the backend (`--form auto`): on a GPU the Triton forms, on a TPU the
Mosaic forms (`attention_tpu`, `lightning_tpu`, `wkv_tpu`, `selective_scan_tpu`), each chosen by
`impl="pallas"` as a user would get it. The sections and checks are the same for both; only the
block-size variants, the attention baseline and the peak figures differ (`FORMS`, `PEAKS`).

Sections, each independent (an error is printed and the next section runs):

1. correctness: each Pallas kernel (bf16 and fp32, T not a multiple of any block) against
   `pallas_kernels.reference`, as the test suite does on CPU;
2. flash attention (causal, bf16, B=4, H=32, D=128, T = 4k-16k) beside
   `jax.nn.dot_product_attention(implementation="cudnn")` (on TPU: beside JAX's own Pallas TPU
   flash attention, `jax.experimental.pallas.ops.tpu.flash_attention`) and our XLA form, in
   TFLOP/s and as a fraction of the chip's dense bf16 peak (H200 ~989 TFLOP/s; goal: >= 0.7x the
   baseline);
3. lightning attention at T = 16k beside our flash attention (goal: >= 3x faster) and its XLA form;
4. selective scan and WKV-7 at T = 4k beside their XLA forms (goal: >= 10x faster), in GB/s of
   unavoidable HBM traffic as a fraction of the chip's HBM bandwidth (H200 4.8 TB/s).

Prints as it goes (run with PYTHONUNBUFFERED=1 to see it live) and writes
`results/device_check/{results.json, meta.json, report.md}`. Sections after `budget_s` seconds
are skipped and listed as such, so the script stays inside its time box.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments.common import results_dir, write_report
from pallas_kernels import dispatch, reference

# what its page needs to have results (scripts/build_docs.py)
RESULTS_NEED = ("a GPU or TPU; none was lent to the sessions that built these pages (`--cpu` runs "
                "the tiny interpret-mode version the tests run)")

H200_BF16_TFLOPS = 989.0
H200_HBM_TBPS = 4.8
# Dense bf16 TFLOP/s and HBM TB/s per chip, by a substring of `device.device_kind` (first match;
# public spec sheets). Unknown devices fall back to the H200's figures, and the report says so.
PEAKS = {
    "H200": (H200_BF16_TFLOPS, H200_HBM_TBPS),
    "H100": (989.0, 3.35),
    "TPU v6": (918.0, 1.64),
    "TPU v5 lite": (197.0, 0.819),
    "TPU v5e": (197.0, 0.819),
    "TPU v5": (459.0, 2.765),  # v5p
    "TPU v4": (275.0, 1.2),
}


@dataclasses.dataclass(frozen=True)
class Form:
  """What differs between the GPU (Triton) and TPU (Mosaic) kernel forms in this check."""
  name: str
  attention_variants: dict  # name -> AttentionBlocks, the default first
  lightning_variants: dict  # name -> LightningBlocks
  scan_variants: dict  # name -> SelectiveScanBlocks
  wkv_variants: dict  # name -> WKVBlocks
  lightning_chunk: Callable  # LightningBlocks -> the kernel's positions per block (for FLOPs)


FORMS = {
    "gpu": Form(
        name="gpu",
        attention_variants={
            "pallas_flash": pk.AttentionBlocks(),
            # Larger tiles suit D = 128 on Hopper; reported to pick the default from data.
            "pallas_flash_128x64": pk.AttentionBlocks(block_q=128, block_k=64),
            "pallas_flash_128x128": pk.AttentionBlocks(block_q=128, block_k=128)},
        lightning_variants={
            "pallas": pk.LightningBlocks(),
            "pallas_block_v32": pk.LightningBlocks(block_v=32),
            "pallas_chunk128": pk.LightningBlocks(chunk=128)},
        # Channel-block sizes for the kernel (more, smaller programs hide more load latency).
        scan_variants={f"pallas_block_d{n}": pk.SelectiveScanBlocks(block_d=n)
                       for n in (64, 32, 128)},
        wkv_variants={f"pallas_block_v{n}": pk.WKVBlocks(block_v=n) for n in (32, 16, 64)},
        lightning_chunk=lambda blocks: blocks.chunk),
    "tpu": Form(
        name="tpu",
        attention_variants={
            "pallas_flash": pk.AttentionBlocks(),
            "pallas_flash_256x512": pk.AttentionBlocks(tpu_block_q=256, tpu_block_k=512),
            "pallas_flash_1024x512": pk.AttentionBlocks(tpu_block_q=1024, tpu_block_k=512)},
        lightning_variants={
            "pallas": pk.LightningBlocks(),
            "pallas_chunk128": pk.LightningBlocks(tpu_chunk=128),
            "pallas_chunk256": pk.LightningBlocks(tpu_chunk=256)},
        # Channels per program (wider: fewer, longer programs) and steps per time chunk.
        scan_variants={
            "pallas_block_d256": pk.SelectiveScanBlocks(),
            "pallas_block_d128": pk.SelectiveScanBlocks(tpu_block_d=128),
            "pallas_block_d512": pk.SelectiveScanBlocks(tpu_block_d=512),
            "pallas_block_d512_chunk128": pk.SelectiveScanBlocks(tpu_block_d=512,
                                                                  tpu_chunk=128)},
        # Dv = 128 is one 128-lane block, so the TPU variants differ in the time chunk.
        wkv_variants={f"pallas_chunk{n}": pk.WKVBlocks(tpu_chunk=n) for n in (64, 32, 128)},
        lightning_chunk=lambda blocks: blocks.tpu_chunk),
}


def peaks(device) -> tuple[float, float, str]:
  """(bf16 TFLOP/s, HBM TB/s, where they came from) for `device`."""
  kind = getattr(device, "device_kind", "")
  for name, (tflops, tbps) in PEAKS.items():
    if name in kind:
      return tflops, tbps, name
  return H200_BF16_TFLOPS, H200_HBM_TBPS, f"unknown device {kind!r}: H200 figures"


@dataclasses.dataclass(frozen=True)
class DeviceCheckConfig:
  """Sizes of the device check; `--cpu` swaps in tiny ones and the Pallas interpreter."""
  cpu: bool = False
  """Run on CPU with tiny sizes and interpret=True (what the test suite runs)."""
  batch: int = 4
  heads: int = 32
  dim: int = 128
  attention_lengths: tuple[int, ...] = (4096, 8192, 16384)
  lightning_length: int = 16384
  scan_length: int = 4096
  state_size: int = 16
  check_length: int = 1000
  dtype: str = "bfloat16"
  repeats: int = 10
  budget_s: float = 270.0
  form: str = "auto"
  """Kernel form: "gpu" (Triton), "tpu" (Mosaic) or "auto" (TPU on a TPU backend, else GPU).
  With `--cpu` the form runs in its interpreter (TPU interpret mode for "tpu")."""
  peak_tflops: float | None = None
  """Dense bf16 TFLOP/s of one chip; None: from `PEAKS` by the device kind."""
  peak_tbps: float | None = None
  """HBM TB/s of one chip; None: from `PEAKS` by the device kind."""
  name: str = "device_check"
  results_root: str = "results"


CPU_SIZES = {"batch": 1, "heads": 2, "dim": 32, "attention_lengths": (64,),
             "lightning_length": 64, "scan_length": 64, "state_size": 4, "check_length": 50,
             "repeats": 2, "name": "device_check_cpu"}


def log(message: str) -> None:
  print(message, flush=True)


def timed(fn: Callable, args: tuple, repeats: int) -> float:
  """Median seconds of `fn(*args)` after compiling and one warm-up call."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def relative_error(actual, expected) -> float:
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6))


class Checker:
  """Runs sections, keeping rows, errors and the time budget."""

  def __init__(self, cfg: DeviceCheckConfig):
    self.cfg = cfg
    self.rows: list[dict] = []
    self.errors: list[str] = []
    self.skipped: list[str] = []
    self.start = time.perf_counter()
    self.interpret = cfg.cpu
    self.form = FORMS[cfg.form]
    # impl="pallas" is the backend's own form (TPU on a TPU); in interpret mode on CPU it means
    # the GPU form, so the TPU form is named there.
    self.pallas_impl = "pallas_tpu" if cfg.cpu and cfg.form == "tpu" else "pallas"
    self.key = jax.random.PRNGKey(0)

  def variants(self, table: dict) -> dict:
    """A form's block-size variants; only the default at --cpu sizes (every tile clamps there)."""
    return dict(list(table.items())[:1]) if self.cfg.cpu else dict(table)

  def section(self, name: str, fn: Callable[[], None]) -> None:
    elapsed = time.perf_counter() - self.start
    if elapsed > self.cfg.budget_s:
      self.skipped.append(name)
      log(f"== {name}: SKIPPED (budget of {self.cfg.budget_s:.0f}s spent, {elapsed:.0f}s elapsed)")
      return
    log(f"== {name}  (t={elapsed:.0f}s)")
    try:
      fn()
    except Exception as err:  # one broken kernel must not hide the others' numbers
      self.errors.append(f"{name}: {type(err).__name__}: {err}")
      log(f"   ERROR in {name}: {type(err).__name__}: {err}")
      traceback.print_exc(file=sys.stdout, limit=4)
      sys.stdout.flush()

  def normal(self, shape, dtype, scale=1.0):
    self.key, sub = jax.random.split(self.key)
    return (scale * jax.random.normal(sub, shape, jnp.float32)).astype(dtype)

  def row(self, **fields) -> None:
    self.rows.append(fields)
    log("   " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in fields.items()))

  # -- inputs ---------------------------------------------------------------------------------

  def attention_inputs(self, t_len, dtype, heads=None):
    c = self.cfg
    shape = (c.batch, t_len, heads or c.heads, c.dim)
    return tuple(self.normal(shape, dtype) for _ in range(3))

  def lightning_inputs(self, t_len, dtype, heads=None):
    c = self.cfg
    h = heads or c.heads
    shape = (c.batch, t_len, h, c.dim)
    decay = jnp.linspace(0.9, 0.999, h, dtype=jnp.float32)
    return (self.normal(shape, dtype, c.dim ** -0.5), self.normal(shape, dtype),
            self.normal(shape, dtype), decay)

  def scan_inputs(self, t_len, dtype, channels=None):
    c = self.cfg
    d = channels or c.heads * c.dim
    n = c.state_size
    A = -jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1))
    return (self.normal((c.batch, t_len, d), dtype), self.normal((c.batch, t_len, d), dtype, 0.5),
            A, self.normal((c.batch, t_len, n), dtype), self.normal((c.batch, t_len, n), dtype),
            jnp.ones((d,), jnp.float32), self.normal((c.batch, t_len, d), dtype))

  def wkv_inputs(self, t_len, dtype, heads=None):
    c = self.cfg
    shape = (c.batch, t_len, heads or c.heads, c.dim)
    kk = self.normal(shape, jnp.float32)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    self.key, k1, k2 = jax.random.split(self.key, 3)
    rate = jax.random.uniform(k1, shape)
    w = jax.random.uniform(k2, shape, minval=0.6, maxval=1.0)
    return (self.normal(shape, dtype), w.astype(dtype), self.normal(shape, dtype, c.dim ** -0.5),
            self.normal(shape, dtype), (-kk).astype(dtype), (kk * rate).astype(dtype))

  # -- sections -------------------------------------------------------------------------------

  def correctness(self) -> None:
    """Each Pallas kernel against the reference at a size that is not a multiple of any block."""
    t_len, heads = self.cfg.check_length, 4
    tol = {"float32": 1e-4, "bfloat16": 2e-2}  # fp32 allows TF32-free rounding noise over T
    for dtype_name in ("bfloat16", "float32"):
      dtype = jnp.dtype(dtype_name)
      cases = {
          "flash_attention": (
              lambda q, k, v: pk.attention(q, k, v, causal=True, impl=self.pallas_impl,
                                           interpret=self.interpret),
              lambda q, k, v: reference.softmax_attention(q, k, v, causal=True),
              self.attention_inputs(t_len, dtype, heads)),
          "lightning_attention": (
              lambda q, k, v, lam: pk.lightning_attention(q, k, v, lam, impl=self.pallas_impl,
                                                          interpret=self.interpret),
              lambda q, k, v, lam: reference.lightning_attention(q, k, v, lam)[0],
              self.lightning_inputs(t_len, dtype, heads)),
          "selective_scan": (
              lambda u, dt, A, B, C, D, z: pk.selective_scan(
                  u, dt, A, B, C, D, z, delta_softplus=True, impl=self.pallas_impl,
                  interpret=self.interpret),
              lambda u, dt, A, B, C, D, z: reference.selective_scan(
                  u, dt, A, B, C, D, z, delta_softplus=True)[0],
              self.scan_inputs(t_len, dtype, channels=256)),
          "wkv7": (
              lambda *x: pk.wkv7(*x, impl=self.pallas_impl, interpret=self.interpret),
              lambda *x: reference.wkv7(*x)[0],
              self.wkv_inputs(t_len, dtype, heads)),
      }
      for op, (fast, slow, args) in cases.items():
        try:
          err = relative_error(jax.jit(fast)(*args), jax.jit(slow)(*args))
          ok = err <= tol[dtype_name]
          self.row(section="correctness", op=op, form=self.form.name, dtype=dtype_name, T=t_len,
                   rel_err=err, tol=tol[dtype_name], status="PASS" if ok else "FAIL")
        except Exception as error:
          self.errors.append(f"correctness {op} {dtype_name}: {type(error).__name__}: {error}")
          log(f"   ERROR {op} {dtype_name}: {type(error).__name__}: {error}")
          traceback.print_exc(file=sys.stdout, limit=4)

  def attention_speed(self) -> None:
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    on_gpu = jax.default_backend() == "gpu"
    for t_len in c.attention_lengths:
      q, k, v = self.attention_inputs(t_len, dtype)
      flops = 4 * c.batch * c.heads * t_len * t_len * c.dim / 2  # causal: half the tiles
      results = {}
      flash = lambda blocks: (lambda q, k, v: pk.attention(
          q, k, v, causal=True, impl=self.pallas_impl, interpret=self.interpret, blocks=blocks))
      candidates = {name: flash(blocks)
                    for name, blocks in self.variants(self.form.attention_variants).items()}
      baseline = self.attention_baseline(on_gpu and not c.cpu)
      candidates.update({
          baseline[0]: baseline[1],
          "xla_chunked": lambda q, k, v: pk.attention(q, k, v, causal=True, impl="xla"),
      })
      for impl, fn in candidates.items():
        try:
          seconds = timed(fn, (q, k, v), c.repeats)
        except Exception as error:
          self.errors.append(f"attention {impl} T={t_len}: {type(error).__name__}: {error}")
          log(f"   ERROR attention {impl} T={t_len}: {type(error).__name__}: {error}")
          continue
        results[impl] = seconds
        tflops = flops / seconds / 1e12
        self.row(section="attention", impl=impl, T=t_len, ms=1e3 * seconds, tflops=tflops,
                 frac_peak=tflops / c.peak_tflops)
      baseline_s = results.get(baseline[0])
      flash_times = {k: t for k, t in results.items() if k.startswith("pallas_flash")}
      if flash_times and baseline_s:
        best = min(flash_times, key=flash_times.get)
        ratio = baseline_s / flash_times[best]
        self.row(section="attention", impl=f"flash_vs_{baseline[0]}", T=t_len, best=best,
                 speed_ratio=ratio, goal=">=0.7", status="MET" if ratio >= 0.7 else "NOT MET")

  def attention_baseline(self, on_gpu: bool) -> tuple[str, Callable]:
    """(row name, fn) of the attention a user would otherwise run on this device."""
    if on_gpu:
      return "cudnn", lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")
    if jax.default_backend() == "tpu" and not self.cfg.cpu:
      # JAX's own Pallas TPU flash attention, head-major [B, H, T, D].
      from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu
      scale = self.cfg.dim ** -0.5
      head_major = lambda x: jnp.swapaxes(x, 1, 2)
      return "jax_tpu_flash", lambda q, k, v: jnp.swapaxes(jax_tpu.flash_attention(
          head_major(q), head_major(k), head_major(v), causal=True, sm_scale=scale), 1, 2)
    return "jax_nn_xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)

  def lightning_speed(self) -> None:
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    t_len = c.lightning_length
    q, k, v, lam = self.lightning_inputs(t_len, dtype)
    variants = self.variants(self.form.lightning_variants)
    variants["xla"] = pk.LightningBlocks()
    times = {}
    for name, blocks in variants.items():
      impl = name.split("_")[0]
      fn = lambda q, k, v, lam, impl=impl, blocks=blocks: pk.lightning_attention(
          q, k, v, lam, impl=self.pallas_impl if impl == "pallas" else impl,
          interpret=self.interpret and impl == "pallas", blocks=blocks)
      try:
        times[name] = timed(fn, (q, k, v, lam), c.repeats)
      except Exception as error:
        self.errors.append(f"lightning {name}: {type(error).__name__}: {error}")
        log(f"   ERROR lightning {name}: {type(error).__name__}: {error}")
        continue
      chunk = self.form.lightning_chunk(blocks) if impl == "pallas" else blocks.xla_chunk
      flops = 2 * c.batch * c.heads * t_len * (2 * chunk * c.dim + 2 * c.dim * c.dim)
      tflops = flops / times[name] / 1e12
      self.row(section="lightning", impl=name, T=t_len, ms=1e3 * times[name], tflops=tflops,
               frac_peak=tflops / c.peak_tflops)
    flash = timed(lambda q, k, v: pk.attention(q, k, v, causal=True, impl=self.pallas_impl,
                                               interpret=self.interpret),
                  (q, k, v), c.repeats)
    kernels = {k: t for k, t in times.items() if k.startswith("pallas")}
    best = min(kernels, key=kernels.get)
    ratio = flash / kernels[best]
    self.row(section="lightning", impl="lightning_vs_flash", T=t_len, best=best,
             flash_ms=1e3 * flash, speedup=ratio, goal=">=3",
             status="MET" if ratio >= 3 else "NOT MET")

  def recurrence_speed(self, op: str) -> None:
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    t_len = c.scan_length
    if op == "selective_scan":
      args = self.scan_inputs(t_len, dtype)
      variants = self.variants(self.form.scan_variants)
      variants["xla"] = pk.SelectiveScanBlocks()
      fn_of = lambda name, blocks: (lambda u, dt, A, B, C, D, z: pk.selective_scan(
          u, dt, A, B, C, D, z, delta_softplus=True, impl=self.impl_of(name),
          interpret=self.interpret and name != "xla", blocks=blocks))
      out_bytes = args[0].size * args[0].dtype.itemsize
    else:
      args = self.wkv_inputs(t_len, dtype)
      variants = self.variants(self.form.wkv_variants)
      variants["xla"] = pk.WKVBlocks()
      fn_of = lambda name, blocks: (lambda *x: pk.wkv7(
          *x, impl=self.impl_of(name), interpret=self.interpret and name != "xla",
          blocks=blocks))
      out_bytes = args[3].size * args[3].dtype.itemsize
    # Unavoidable HBM traffic: read every input once, write the output once.
    traffic = sum(x.size * x.dtype.itemsize for x in args) + out_bytes
    times = {}
    for name, blocks in variants.items():
      try:
        times[name] = timed(fn_of(name, blocks), args, c.repeats)
      except Exception as error:  # e.g. a tile too large for one configuration
        self.errors.append(f"{op} {name}: {type(error).__name__}: {error}")
        log(f"   ERROR {op} {name}: {type(error).__name__}: {error}")
        continue
      gbps = traffic / times[name] / 1e9
      self.row(section=op, impl=name, T=t_len, ms=1e3 * times[name], gb_per_s=gbps,
               frac_hbm=gbps / (1e3 * c.peak_tbps))
    kernels = {k: t for k, t in times.items() if k.startswith("pallas")}
    if kernels and "xla" in times:
      best = min(kernels, key=kernels.get)
      ratio = times["xla"] / kernels[best]
      self.row(section=op, impl="pallas_vs_xla", T=t_len, best=best, speedup=ratio, goal=">=10",
               status="MET" if ratio >= 10 else "NOT MET")

  def impl_of(self, name: str) -> str:
    """The `impl` of a variant's row name: "xla", or the Pallas form this check runs."""
    return "xla" if name == "xla" else self.pallas_impl


def main(cfg: DeviceCheckConfig) -> dict:
  if cfg.form not in ("auto", *FORMS):
    raise ValueError(f"form must be 'auto', 'gpu' or 'tpu', got {cfg.form!r}")
  if cfg.cpu:
    cfg = dataclasses.replace(cfg, **CPU_SIZES)
  device = jax.devices("cpu")[0] if cfg.cpu else jax.devices()[0]
  backend = jax.default_backend()
  if cfg.form == "auto":
    cfg = dataclasses.replace(cfg, form="tpu" if backend == "tpu" and not cfg.cpu else "gpu")
  tflops, tbps, source = peaks(device)
  cfg = dataclasses.replace(cfg, peak_tflops=cfg.peak_tflops or tflops,
                            peak_tbps=cfg.peak_tbps or tbps)
  log(f"jax {jax.__version__}; backend {backend}; devices {jax.devices()}")
  log(f"config: {cfg}  (peaks: {source})")
  checker = Checker(cfg)
  with jax.default_device(device):
    if not cfg.cpu and backend not in ("gpu", "tpu"):
      log("WARNING: no GPU or TPU backend; Pallas kernels need --cpu (interpret mode) here")
    if not cfg.cpu and (backend == "tpu") != (cfg.form == "tpu"):
      log(f"WARNING: the {cfg.form} form does not compile on the {backend!r} backend")
    if not cfg.cpu and backend in ("gpu", "tpu"):
      # What a user gets: impl="pallas" and "auto" both pick this backend's Pallas form.
      log("impl='pallas' -> " + dispatch.resolve_impl("pallas", False, tpu_form=True)
          + ", impl='auto' -> " + dispatch.resolve_impl("auto", False, tpu_form=True))
    baseline = {"gpu": "cuDNN", "tpu": "JAX's TPU flash attention"}.get(backend, "jax.nn (XLA)")
    checker.section(f"correctness vs reference ({cfg.form} forms)", checker.correctness)
    checker.section(f"flash attention vs {'jax.nn (XLA)' if cfg.cpu else baseline}",
                    checker.attention_speed)
    checker.section("lightning attention vs flash", checker.lightning_speed)
    checker.section("selective scan vs XLA", lambda: checker.recurrence_speed("selective_scan"))
    checker.section("WKV-7 vs XLA", lambda: checker.recurrence_speed("wkv7"))
  elapsed = time.perf_counter() - checker.start
  failed = [r for r in checker.rows if r.get("status") == "FAIL"]
  log(f"== done in {elapsed:.0f}s: {len(checker.rows)} rows, {len(failed)} correctness failures, "
      f"{len(checker.errors)} errors, skipped: {checker.skipped or 'none'}")
  for error in checker.errors:
    log(f"   error: {error}")
  out_dir = results_dir(cfg.name, cfg.results_root)
  order = ["section", "op", "form", "impl", "dtype", "T", "ms", "tflops", "frac_peak", "gb_per_s",
           "frac_hbm", "rel_err", "tol", "best", "flash_ms", "speed_ratio", "speedup", "goal",
           "status"]
  present = {k for r in checker.rows for k in r}
  columns = [k for k in order if k in present] + sorted(present - set(order))
  notes = (f"Backend `{jax.default_backend()}`, JAX {jax.__version__}, {cfg.form.upper()} kernel "
           f"forms, {'CPU interpret mode (tiny sizes)' if cfg.cpu else str(jax.devices()[0])}; "
           f"peaks {cfg.peak_tflops} TFLOP/s, {cfg.peak_tbps} TB/s ({source}); "
           f"{elapsed:.0f}s. Errors: {checker.errors or 'none'}. Skipped: "
           f"{checker.skipped or 'none'}.")
  write_report(out_dir, checker.rows, title="Device check: Pallas kernels", notes=notes,
               columns=columns, extra={"config": dataclasses.asdict(cfg),
                                       "errors": checker.errors, "skipped": checker.skipped,
                                       "elapsed_s": elapsed})
  return {"rows": checker.rows, "errors": checker.errors, "skipped": checker.skipped}


if __name__ == "__main__":
  import tyro  # imported here: the GPU image has JAX but not tyro; main() runs without it

  main(tyro.cli(DeviceCheckConfig))
