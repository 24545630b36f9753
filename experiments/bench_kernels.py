"""Time and memory of the four kernels against sequence length, with fitted scaling exponents.

  python -m experiments.bench_kernels            # T = 256 ... 16384, B = 1, H = 8, D = 64
  python -m experiments.bench_kernels --smoke    # tiny sizes, seconds

For every op (softmax attention, lightning attention, selective scan, WKV-7) and every impl that is
sensible on the current backend, each point is compiled once (`jit(...).lower().compile()`), run
once to warm up, then timed `repeats` times with `block_until_ready`; the median is reported. Peak
memory is XLA's own account of the compiled executable (`memory_analysis()`: arguments + outputs
+ temporaries, or its peak figure where the backend reports one). The scaling exponent is the
least-squares slope of log(time) against log(T) over T >= `fit_min_length`.

Skipped on purpose: the references beyond `reference_max_length` (quadratic memory or one scan
step per token), and on CPU the Pallas kernels beyond `interpret_max_length` (the interpreter is a
correctness tool; its timings say nothing about the kernel). The report lists what was skipped.

Writes `results/bench_kernels/{results.json, meta.json, report.md, time.png, memory.png}`.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import pallas_kernels as pk
from experiments import common
from experiments.common import markdown_table, results_dir, write_report

OPS = ("attention", "lightning", "selective_scan", "wkv7")
IMPLS = ("reference", "xla", "xla_parallel", "pallas")
# "xla" is what impl="xla" (and "auto" on CPU) runs. For the two recurrences that is a sequential
# in-block loop on CPU; "xla_parallel" forces the form used on accelerators (associative in-block
# scan for the selective scan, the WY chunk form for WKV-7) so both are on the record.
PARALLEL_FORMS = {
    "selective_scan": pk.SelectiveScanBlocks(xla_inner="associative"),
    "wkv7": pk.WKVBlocks(xla_form="chunked"),
}


@dataclasses.dataclass(frozen=True)
class BenchConfig(common.Checked):
  """Benchmark sizes. Selective scan uses D = heads * dim channels with `state_size` states."""
  smoke: bool = False
  """Tiny sizes that run in seconds (the test suite runs this)."""
  lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
  batch: int = 1
  heads: int = 8
  dim: int = 64
  state_size: int = 16
  dtype: str = "float32"
  ops: tuple[str, ...] = OPS
  impls: tuple[str, ...] = IMPLS
  repeats: int = 5
  reference_max_length: int = 4096
  interpret_max_length: int = 2048
  fit_min_length: int = 1024
  name: str = "bench_kernels"
  results_root: str = "results"
  """Results go to `<results_root>/<name>/`."""

  def check(self) -> None:
    super().check()
    common.check_ints(self, "lengths", "batch", "heads", "dim", "state_size", "repeats",
                      "reference_max_length", "interpret_max_length", "fit_min_length")
    for name, choices in (("ops", OPS), ("impls", IMPLS)):
      if not getattr(self, name):
        common.refuse(name, f"expected some of {list(choices)}, got ()")
      common.check_choices(self, name, choices=choices)
    try:
      floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
    except TypeError:  # not a dtype name at all
      floating = False
    if not floating:
      common.refuse("dtype", f"expected a floating dtype such as 'float32' or 'bfloat16', got "
                             f"{self.dtype!r}")
    for name in ("name", "results_root"):
      if not getattr(self, name):
        common.refuse(name, "expected a folder name, got ''")


SMOKE = dict(lengths=(64, 128), heads=2, dim=32, state_size=4, repeats=2,
             reference_max_length=128, interpret_max_length=128, fit_min_length=64,
             name="bench_kernels_smoke")


def make_op(op: str, impl: str, cfg: BenchConfig, t_len: int, interpret: bool,
            ) -> tuple[Callable, tuple, float]:
  """(function of arrays, its arguments, FLOPs of one call for the fast algorithm)."""
  key = jax.random.PRNGKey(t_len)
  keys = jax.random.split(key, 8)
  dtype = jnp.dtype(cfg.dtype)
  b, h, d = cfg.batch, cfg.heads, cfg.dim
  extra = {"blocks": PARALLEL_FORMS[op]} if impl == "xla_parallel" else {}
  impl = "xla" if impl == "xla_parallel" else impl
  normal = lambda k, shape, s=1.0: (s * jax.random.normal(k, shape)).astype(dtype)
  if op == "attention":
    args = tuple(normal(keys[i], (b, t_len, h, d)) for i in range(3))
    fn = lambda q, k, v: pk.attention(q, k, v, causal=True, impl=impl, interpret=interpret)
    flops = 2 * 2 * b * h * t_len * t_len * d / 2  # causal: half of QK^T and PV
  elif op == "lightning":
    args = (normal(keys[0], (b, t_len, h, d), d ** -0.5), normal(keys[1], (b, t_len, h, d)),
            normal(keys[2], (b, t_len, h, d)), jnp.linspace(0.9, 0.999, h, dtype=jnp.float32))
    fn = lambda q, k, v, lam: pk.lightning_attention(q, k, v, lam, impl=impl, interpret=interpret)
    chunk = pk.LightningBlocks().xla_chunk
    flops = 2 * b * h * t_len * (2 * chunk * d + 2 * d * d)  # intra-block + state read/update
  elif op == "selective_scan":
    channels, n = h * d, cfg.state_size
    u = normal(keys[0], (b, t_len, channels))
    delta = normal(keys[1], (b, t_len, channels), 0.5)
    A = -jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (channels, 1))
    B, C = normal(keys[2], (b, t_len, n)), normal(keys[3], (b, t_len, n))
    D = jnp.ones((channels,), jnp.float32)
    args = (u, delta, A, B, C, D)
    fn = lambda u, delta, A, B, C, D: pk.selective_scan(
        u, delta, A, B, C, D, delta_softplus=True, impl=impl, interpret=interpret, **extra)
    flops = 6 * b * t_len * channels * n
  elif op == "wkv7":
    kk = jax.random.normal(keys[4], (b, t_len, h, d))
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    rate = jax.random.uniform(keys[5], (b, t_len, h, d))
    w = jax.random.uniform(keys[6], (b, t_len, h, d), minval=0.6, maxval=1.0)
    args = (normal(keys[0], (b, t_len, h, d)), w.astype(dtype),
            normal(keys[1], (b, t_len, h, d), d ** -0.5), normal(keys[2], (b, t_len, h, d)),
            (-kk).astype(dtype), (kk * rate).astype(dtype))
    fn = lambda r, w, k, v, a, bb: pk.wkv7(r, w, k, v, a, bb, impl=impl, interpret=interpret,
                                           **extra)
    flops = 8 * b * h * t_len * d * d
  else:
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
  return fn, args, float(flops)


def skip_reason(impl: str, t_len: int, cfg: BenchConfig, backend: str) -> str | None:
  if impl == "reference" and t_len > cfg.reference_max_length:
    return f"reference skipped above T={cfg.reference_max_length}"
  if impl == "pallas" and backend == "cpu" and t_len > cfg.interpret_max_length:
    return f"Pallas interpret mode skipped on CPU above T={cfg.interpret_max_length}"
  return None


def memory_bytes(compiled) -> dict[str, float]:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return {"peak_mb": float("nan"), "temp_mb": float("nan")}
  if stats is None:
    return {"peak_mb": float("nan"), "temp_mb": float("nan")}
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  peak = max(getattr(stats, "peak_memory_in_bytes", 0) or 0, total)
  return {"peak_mb": peak / 2**20, "temp_mb": stats.temp_size_in_bytes / 2**20}


def measure(fn: Callable, args: tuple, repeats: int) -> dict[str, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
          "compile_s": compile_s, **memory_bytes(compiled)}


def fit_exponent(rows: list[dict], min_length: int) -> float:
  points = [(r["T"], r["median_ms"]) for r in rows if r["T"] >= min_length]
  if len(points) < 2:
    return float("nan")
  t, ms = np.log([p[0] for p in points]), np.log([p[1] for p in points])
  return float(np.polyfit(t, ms, 1)[0])


def plot(rows: list[dict], ops: tuple[str, ...], out_dir, key: str, ylabel: str, file: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
  for ax, op in zip(axes[0], ops):
    for impl in IMPLS:
      pts = [(r["T"], r[key]) for r in rows if r["op"] == op and r["impl"] == impl
             and not math.isnan(r[key])]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(op)
    ax.set_xlabel("T")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / file, dpi=110)
  plt.close(fig)


def main(cfg: BenchConfig) -> dict:
  if cfg.smoke:  # options given beside --smoke are kept (`common.smoke_sized`)
    cfg = common.smoke_sized(cfg, dataclasses.replace(cfg, **SMOKE), derived=())
  backend = jax.default_backend()
  interpret = backend == "cpu"
  rows, skipped = [], []
  plan = [(op, impl, t) for op in cfg.ops for impl in cfg.impls for t in cfg.lengths]
  plan = [(op, impl, t) for op, impl, t in plan if impl != "xla_parallel" or op in PARALLEL_FORMS]
  for op, impl, t_len in tqdm(plan, desc="bench_kernels"):
    reason = skip_reason(impl, t_len, cfg, backend)
    if reason is not None:
      skipped.append(f"{op}/{impl} T={t_len}: {reason}")
      continue
    fn, args, flops = make_op(op, impl, cfg, t_len, interpret and impl == "pallas")
    stats = measure(fn, args, cfg.repeats)
    rows.append({"op": op, "impl": impl, "T": t_len, **stats,
                 "gflops": flops / (stats["median_ms"] * 1e6)})
    tqdm.write(f"{op:15s} {impl:9s} T={t_len:6d} {stats['median_ms']:10.3f} ms "
               f"peak {stats['peak_mb']:9.1f} MiB")

  exponents = []
  for op in cfg.ops:
    for impl in cfg.impls:
      sel = [r for r in rows if r["op"] == op and r["impl"] == impl]
      if sel:
        exponents.append({"op": op, "impl": impl, "fit_from_T": cfg.fit_min_length,
                          "exponent": fit_exponent(sel, cfg.fit_min_length),
                          "max_T": max(r["T"] for r in sel)})

  def at(op, impl, t_len):
    hits = [r for r in rows if r["op"] == op and r["impl"] == impl and r["T"] == t_len]
    return hits[0]["median_ms"] if hits else float("nan")

  t_max = max(cfg.lengths)
  speedup = at("attention", "xla", t_max) / at("lightning", "xla", t_max)
  lightning_exp = next((e["exponent"] for e in exponents
                        if e["op"] == "lightning" and e["impl"] == "xla"), float("nan"))
  goals = {
      "T": t_max,
      "lightning_xla_exponent": lightning_exp,
      "lightning_xla_exponent_le_1.2": bool(lightning_exp <= 1.2),
      "speedup_lightning_vs_softmax_xla": speedup,
      "speedup_ge_5x": bool(speedup >= 5.0),
  }
  out_dir = results_dir(cfg.name, cfg.results_root)
  notes = "\n".join([
      f"Backend `{backend}` ({platform.processor() or platform.machine()}, "
      f"{jax.device_count()} device(s), JAX {jax.__version__}); "
      f"B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, dtype={cfg.dtype}; causal attention; selective "
      f"scan with D={cfg.heads * cfg.dim} channels and N={cfg.state_size}. Medians of "
      f"{cfg.repeats} runs after one warm-up; peak memory from XLA's memory analysis of the "
      "compiled executable. `gflops` counts the fast algorithm's FLOPs (causal half for "
      "attention), so reference rows are not comparable on it. `xla` is what impl='xla' runs "
      "here (on CPU the recurrences use a sequential in-block loop); `xla_parallel` is the form "
      "used on accelerators (associative in-block scan for the selective scan, the WY chunk "
      "form for WKV-7). `pallas` on CPU is the Pallas interpreter, not a compiled kernel.",
      "",
      f"**Goal check (T={t_max})**: lightning (xla) exponent {lightning_exp:.3f} "
      f"(goal <= 1.2: {'met' if goals['lightning_xla_exponent_le_1.2'] else 'NOT met'}); "
      f"lightning (xla) is {speedup:.1f}x faster than softmax attention (xla) "
      f"(goal >= 5x: {'met' if goals['speedup_ge_5x'] else 'NOT met'}).",
      "",
      "Scaling exponents (slope of log time vs log T):",
      "",
      markdown_table(exponents, ["op", "impl", "exponent", "fit_from_T", "max_T"]),
      "Skipped: " + ("; ".join(skipped) if skipped else "nothing") + ".",
  ])
  write_report(out_dir, rows, title="Kernel benchmarks: time and memory against T", notes=notes,
               columns=["op", "impl", "T", "median_ms", "min_ms", "compile_s", "peak_mb",
                        "temp_mb", "gflops"],
               extra={"config": dataclasses.asdict(cfg), "backend": backend,
                      "jax": jax.__version__, "exponents": exponents, "goals": goals,
                      "skipped": skipped})
  plot(rows, cfg.ops, out_dir, "median_ms", "median time (ms)", "time.png")
  plot(rows, cfg.ops, out_dir, "peak_mb", "peak memory (MiB)", "memory.png")
  print(f"wrote {out_dir}/report.md")
  print(f"goals: {goals}")
  return {"rows": rows, "exponents": exponents, "goals": goals, "out_dir": str(out_dir)}


if __name__ == "__main__":
  main(common.parse(BenchConfig))
