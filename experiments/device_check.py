"""Compile every Pallas kernel on the GPU, check it against the reference, and time it.

  python -m experiments.device_check          # one H200, under 5 minutes
  python -m experiments.device_check --cpu    # tiny sizes, Pallas in interpret mode (tested on CPU)

Sections, each independent (an error is printed and the next section runs):

1. correctness: each Pallas kernel (bf16 and fp32, T not a multiple of any block) against
   `pallas_kernels.reference`, as the test suite does on CPU;
2. flash attention (causal, bf16, B=4, H=32, D=128, T = 4k-16k) beside
   `jax.nn.dot_product_attention(implementation="cudnn")` and our XLA form, in TFLOP/s and as a
   fraction of the H200's ~989 TFLOP/s dense bf16 (goal: >= 0.7x cuDNN);
3. lightning attention at T = 16k beside our flash attention (goal: >= 3x faster) and its XLA form;
4. selective scan and WKV-7 at T = 4k beside their XLA forms (goal: >= 10x faster), in GB/s of
   unavoidable HBM traffic as a fraction of 4.8 TB/s.

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
from pallas_kernels import reference

H200_BF16_TFLOPS = 989.0
H200_HBM_TBPS = 4.8


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
  peak_tflops: float = H200_BF16_TFLOPS
  peak_tbps: float = H200_HBM_TBPS
  name: str = "device_check"
  results_root: str = "results"


CPU_SIZES = dict(batch=1, heads=2, dim=32, attention_lengths=(64,), lightning_length=64,
                 scan_length=64, state_size=4, check_length=50, repeats=2,
                 name="device_check_cpu")


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
    self.key = jax.random.PRNGKey(0)

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
              lambda q, k, v: pk.attention(q, k, v, causal=True, impl="pallas",
                                           interpret=self.interpret),
              lambda q, k, v: reference.softmax_attention(q, k, v, causal=True),
              self.attention_inputs(t_len, dtype, heads)),
          "lightning_attention": (
              lambda q, k, v, lam: pk.lightning_attention(q, k, v, lam, impl="pallas",
                                                          interpret=self.interpret),
              lambda q, k, v, lam: reference.lightning_attention(q, k, v, lam)[0],
              self.lightning_inputs(t_len, dtype, heads)),
          "selective_scan": (
              lambda u, dt, A, B, C, D, z: pk.selective_scan(
                  u, dt, A, B, C, D, z, delta_softplus=True, impl="pallas",
                  interpret=self.interpret),
              lambda u, dt, A, B, C, D, z: reference.selective_scan(
                  u, dt, A, B, C, D, z, delta_softplus=True)[0],
              self.scan_inputs(t_len, dtype, channels=256)),
          "wkv7": (
              lambda *x: pk.wkv7(*x, impl="pallas", interpret=self.interpret),
              lambda *x: reference.wkv7(*x)[0],
              self.wkv_inputs(t_len, dtype, heads)),
      }
      for op, (fast, slow, args) in cases.items():
        try:
          err = relative_error(jax.jit(fast)(*args), jax.jit(slow)(*args))
          ok = err <= tol[dtype_name]
          self.row(section="correctness", op=op, dtype=dtype_name, T=t_len, rel_err=err,
                   tol=tol[dtype_name], status="PASS" if ok else "FAIL")
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
          q, k, v, causal=True, impl="pallas", interpret=self.interpret, blocks=blocks))
      candidates = {"pallas_flash": flash(pk.AttentionBlocks())}
      if not c.cpu:  # at --cpu sizes every tile clamps to the same small one
        # Larger tiles suit D = 128 on Hopper; reported to pick the default from data.
        candidates["pallas_flash_128x64"] = flash(pk.AttentionBlocks(block_q=128, block_k=64))
        candidates["pallas_flash_128x128"] = flash(pk.AttentionBlocks(block_q=128, block_k=128))
      candidates.update({
          "cudnn" if on_gpu else "jax_nn_xla": lambda q, k, v: jax.nn.dot_product_attention(
              q, k, v, is_causal=True, implementation="cudnn" if on_gpu else None),
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
      baseline = results.get("cudnn", results.get("jax_nn_xla"))
      flash_times = {k: t for k, t in results.items() if k.startswith("pallas_flash")}
      if flash_times and baseline:
        best = min(flash_times, key=flash_times.get)
        ratio = baseline / flash_times[best]
        self.row(section="attention", impl="flash_vs_cudnn" if on_gpu else "flash_vs_jax_nn",
                 T=t_len, best=best, speed_ratio=ratio, goal=">=0.7",
                 status="MET" if ratio >= 0.7 else "NOT MET")

  def lightning_speed(self) -> None:
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    t_len = c.lightning_length
    q, k, v, lam = self.lightning_inputs(t_len, dtype)
    variants = {"pallas": pk.LightningBlocks()}
    if not c.cpu:
      variants["pallas_block_v32"] = pk.LightningBlocks(block_v=32)
      variants["pallas_chunk128"] = pk.LightningBlocks(chunk=128)
    variants["xla"] = pk.LightningBlocks()
    times = {}
    for name, blocks in variants.items():
      impl = name.split("_")[0]
      fn = lambda q, k, v, lam, impl=impl, blocks=blocks: pk.lightning_attention(
          q, k, v, lam, impl=impl, interpret=self.interpret and impl == "pallas", blocks=blocks)
      try:
        times[name] = timed(fn, (q, k, v, lam), c.repeats)
      except Exception as error:
        self.errors.append(f"lightning {name}: {type(error).__name__}: {error}")
        log(f"   ERROR lightning {name}: {type(error).__name__}: {error}")
        continue
      chunk = blocks.chunk if impl == "pallas" else blocks.xla_chunk
      flops = 2 * c.batch * c.heads * t_len * (2 * chunk * c.dim + 2 * c.dim * c.dim)
      tflops = flops / times[name] / 1e12
      self.row(section="lightning", impl=name, T=t_len, ms=1e3 * times[name], tflops=tflops,
               frac_peak=tflops / c.peak_tflops)
    flash = timed(lambda q, k, v: pk.attention(q, k, v, causal=True, impl="pallas",
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
      # Channel-block sizes for the kernel (more, smaller programs hide more load latency).
      variants = {f"pallas_block_d{n}": pk.SelectiveScanBlocks(block_d=n)
                  for n in ((64,) if c.cpu else (32, 64, 128))}
      variants["xla"] = pk.SelectiveScanBlocks()
      fn_of = lambda name, blocks: (lambda u, dt, A, B, C, D, z: pk.selective_scan(
          u, dt, A, B, C, D, z, delta_softplus=True, impl=name.split("_")[0],
          interpret=self.interpret and name != "xla", blocks=blocks))
      out_bytes = args[0].size * args[0].dtype.itemsize
    else:
      args = self.wkv_inputs(t_len, dtype)
      variants = {f"pallas_block_v{n}": pk.WKVBlocks(block_v=n)
                  for n in ((32,) if c.cpu else (16, 32, 64))}
      variants["xla"] = pk.WKVBlocks()
      fn_of = lambda name, blocks: (lambda *x: pk.wkv7(
          *x, impl=name.split("_")[0], interpret=self.interpret and name != "xla",
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


def main(cfg: DeviceCheckConfig) -> dict:
  if cfg.cpu:
    cfg = dataclasses.replace(cfg, **CPU_SIZES)
  device = jax.devices("cpu")[0] if cfg.cpu else jax.devices()[0]
  log(f"jax {jax.__version__}; backend {jax.default_backend()}; devices {jax.devices()}")
  log(f"config: {cfg}")
  checker = Checker(cfg)
  with jax.default_device(device):
    if not cfg.cpu and jax.default_backend() != "gpu":
      log("WARNING: no GPU backend; Pallas kernels need --cpu (interpret mode) here")
    checker.section("correctness vs reference", checker.correctness)
    checker.section("flash attention vs cuDNN", checker.attention_speed)
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
  order = ["section", "op", "impl", "dtype", "T", "ms", "tflops", "frac_peak", "gb_per_s",
           "frac_hbm", "rel_err", "tol", "best", "flash_ms", "speed_ratio", "speedup", "goal",
           "status"]
  present = {k for r in checker.rows for k in r}
  columns = [k for k in order if k in present] + sorted(present - set(order))
  notes = (f"Backend `{jax.default_backend()}`, JAX {jax.__version__}, "
           f"{'CPU interpret mode (tiny sizes)' if cfg.cpu else str(jax.devices()[0])}; "
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
