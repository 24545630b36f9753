"""A hand-written CPU kernel for low-bit products `x [M, K] @ W [K, N]`, shaped for decoding.

Why a hand-written kernel: XLA:CPU has no low-bit matmul. For `x @ QArray` it converts the int8 /
int4 codes to fp32 inside the jitted step and runs an fp32 dot, so a decode step still streams (and
converts) every weight at fp32 width: int8 decoded at fp32 speed and int4 (nibble unpacking) more
slowly than fp32 (a 110M Llama: fp32 34.9 tok/s, int8 34.4, int4 27.7 at batch 1), while
llama.cpp's Q8_0 / Q4_0 kernels on the same weights ran at 98.7 / 130.5. At decode batch sizes the
product is bound by reading the weight, so the speed-up has to come from reading the codes as
stored and widening them in registers; nothing in XLA's CPU pipeline (fusion, Eigen, oneDNN) does
that for our stored form, so `csrc/lowbit_matmul.cc` does, behind the XLA FFI:

- layout (`kernel_layout`): the codes in panels of 16 output columns, so that one 64-byte load
  feeds 16 output lanes (16 columns x 4 k for int8, x 8 k for int4 nibbles; a lane's 4 bytes
  are 4 consecutive k, `vpdpbusd`'s group) and a group's 16 column scales are one load — no
  horizontal sums, and a scale group of 32 is no longer half a vector. `int8 [16 P, 4 ceil(K/4)]`,
  int4 `uint8 [16 P, 4 ceil(K/8)]` (P = ceil(N/16); columns and k past the ends are zero codes);
  the scales (fp32, or fp16 with `scale_dtype="float16"`) stay `[G, N]`.
  `QArray(kernel="cpu_ffi")` stores this layout from quantization on (`nbytes` counts the
  padding; `codes()` / `dequantize()` undo it). The previous row layout
  (one output column per row, a horizontal sum per output) ran W8A8 at 8 rows 2.7x slower on the
  110M Llama's tied head (32000 x 768, one scale per row) and 7x slower with groups of 32;
- weight-only (`act_format=None`): fp32 activations, codes widened to fp32 in vector registers,
  fp32 FMA per group, each group's sum times its scale. On AVX-512 an int4 code is widened by a
  16-entry table lookup (`vpermps` on the nibble: one shift and one permute per 16 codes where
  shift, shift and convert took three), 1.6x faster on the 110M Llama's 768 x 2048 product in
  cache (26.9 against 42.4 us, a 2-core AMD EPYC Zen 4) and exact (the table holds -8 .. 7);
- W8A8 (`act_format="int8"`): each row of x quantized to int8 inside the kernel exactly as
  `QArray`'s XLA path does (absmax / 127, round half to even), then the integer dot: on AVX-512
  VNNI `vpdpbusd`, the weight offset to unsigned and the offset times the row's group sums of
  x subtracted; on AVX2 `vpmaddubsw` + `vpmaddwd` (int8: |w| times x sign(w), no s16
  saturation; int4: the same offset as VNNI);
- fp32 weights (`KernelWeight`, `ptq.kernel_params`): the same streaming product without
  quantization, in fp32 panels of 16 columns (`f32_panels`: float32 `[16 P, K]`, one 64-byte line
  per k); XLA:CPU's own fp32 dot reads a decode step's weights at about 60 % of the DRAM
  bandwidth, and the earlier row layout (a horizontal sum per output) cost 2x at 7 rows what it
  cost at one;
- rows: up to 8 rows of x per pass over the columns, so a decode batch of up to 8 reads each
  weight once (register tiles of up to 8 rows x 1-4 panels); any number of rows (`use_kernel`
  says where XLA's dot is faster and takes over);
- threads: the N columns in blocks shared between the calling thread and XLA's intra-op thread
  pool (`ffi::ThreadPool`, so the kernel uses the threads XLA was given);
- several weights that share x (`lowbit_matmul_many`; `layers.project` uses it for q, k, v and
  for gate, up): one call whose column blocks span all the products, the activations prepared
  once. At decode sizes a call costs beyond its bytes (handing blocks to the pool's threads,
  streams that restart): 12 layers' int4 products of the 110M Llama took 3.82 ms as 4 calls per
  layer against 4.46 ms as 7 (fp32 activations; 2.72 against 3.05 with int8 ones), and its decode
  went from 4.9 to 4.2 ms per token (int4, batch 1, Zen 4);
- instruction sets, chosen at run time (`isa()`; `lowbit_matmul(path=...)` forces one):
  AVX-512 (VNNI for W8A8); AVX2 + FMA (the same panels read as half-panels of 8 columns; fp32
  weights in row groups of 12 register sums per column tile, the second group reading the tile
  from cache) — many x86 servers (AMD EPYC before Zen 4) and laptops stop at AVX2; a portable
  scalar path (same sums) elsewhere, e.g. on ARM.

The same shared library holds the decode-step attention of `jaxinf.models.cpu_attention`
(`csrc/attention_step.cc`): every source of `csrc/` is compiled into it.

The shared library is compiled on first use with the system C++ compiler (`$CXX`, else `c++`,
else `g++`) into a per-user cache (`$JAXINF_KERNEL_CACHE`, else `$XDG_CACHE_HOME/jaxinf/kernels`,
else `~/.cache/jaxinf/kernels`), keyed by a hash of the source, the compiler and the jaxlib
version, loaded with ctypes and registered as the XLA FFI targets `jaxinf_lowbit_matmul` and
`jaxinf_lowbit_matmul_many` for the CPU platform. Without a compiler, selecting the kernel raises `KernelUnavailableError` saying so;
the XLA path (`kernel=None`) never needs it.

`lowbit_matmul` runs inside `jax.jit`, `lax.while_loop` and `lax.scan`; under `jax.vmap` it loops
over the mapped axis (`vmap_method="sequential"`: a vmapped decode step calls it once per mapped
row — correct, not fast; `QArray.__rmatmul__` folds all leading axes of x into M instead).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("cpu_ffi",)
MAX_ROWS = 64          # x rows up to which fp32 weights (`KernelWeight`) take the kernel
TARGET = "jaxinf_lowbit_matmul"
MANY_TARGET = "jaxinf_lowbit_matmul_many"  # several weights sharing x in one call
ATTENTION_TARGET = "jaxinf_attention_step"  # csrc/attention_step.cc (jaxinf.models.cpu_attention)
# every source of csrc/ goes into the one shared library
SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cc")))
# headers the sources include (part of the build cache key)
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")


class KernelUnavailableError(RuntimeError):
  """The CPU kernel cannot be built or loaded here (no C++ compiler, a failed build)."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def check_kernel(kernel: Any, arg: str = "kernel") -> str | None:
  """`kernel` (None: the XLA path, or one of `KERNELS`); ValueError naming `arg` otherwise."""
  if kernel is not None and kernel not in KERNELS:
    raise ValueError(f"{arg}: expected None or one of {KERNELS}, got {kernel!r}")
  return kernel


def check_backend(arg: str = "kernel") -> None:
  """ValueError naming `arg` unless JAX's default backend is the CPU."""
  backend = jax.default_backend()
  if backend != "cpu":
    raise ValueError(f"{arg}: 'cpu_ffi' runs only on the CPU backend; JAX's default backend here "
                     f"is {backend!r} (use kernel=None, the XLA path)")


def cache_dir() -> Path:
  if os.environ.get("JAXINF_KERNEL_CACHE"):
    return Path(os.environ["JAXINF_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return Path(base) / "jaxinf" / "kernels"


def compiler() -> str:
  """The C++ compiler: `$CXX`, else `c++`, else `g++` on PATH; KernelUnavailableError if none."""
  for name in (os.environ.get("CXX"), "c++", "g++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise KernelUnavailableError(
      "kernel='cpu_ffi' needs a C++ compiler to build jaxinf/quant/csrc/lowbit_matmul.cc on first "
      "use, and none was found ($CXX unset or not found, no c++ or g++ on PATH); install one "
      "(e.g. apt-get install g++) or use kernel=None (the XLA path)")


def library_path() -> Path:
  """Where the shared library for this source, compiler and jaxlib lives (built or not)."""
  import jaxlib

  cxx = compiler()
  key = hashlib.sha256()
  for source in SOURCES + HEADERS:
    key.update(source.name.encode() + source.read_bytes())
  key.update(f"{cxx}|{' '.join(FLAGS)}|jaxlib {jaxlib.__version__}".encode())
  return cache_dir() / f"lowbit_matmul-{key.hexdigest()[:16]}.so"


def build(path: Path) -> None:
  """Compile `SOURCES` to `path` (a temporary file renamed into place: concurrent builds from
  several processes are safe)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      raise KernelUnavailableError(f"building the cpu_ffi kernel failed ({' '.join(cmd)}):\n"
                                   f"{done.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def load() -> ctypes.CDLL:
  """Build (once per source / compiler / jaxlib, cached on disk), load and register the kernel;
  idempotent within a process."""
  global _lib
  with _lock:
    if _lib is None:
      path = library_path()
      if not path.exists():
        build(path)
      lib = ctypes.CDLL(str(path))
      jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxinfLowbitMatmul),
                                  platform="cpu")
      jax.ffi.register_ffi_target(MANY_TARGET, jax.ffi.pycapsule(lib.JaxinfLowbitMatmulMany),
                                  platform="cpu")
      jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.JaxinfAttentionStep),
                                  platform="cpu")
      lib.jaxinf_lowbit_isa.restype = ctypes.c_int
      lib.jaxinf_lowbit_has.restype = ctypes.c_int
      _lib = lib
  return _lib


def isa(act_int8: bool = False) -> str:
  """The instruction set the kernel uses on this CPU for products with (`act_int8`) or without
  int8 activations: "avx512-vnni", "avx512", "avx2" (AVX2 + FMA) or "scalar"."""
  return ("scalar", "avx512", "avx512-vnni", "avx2")[load().jaxinf_lowbit_isa(int(bool(act_int8)))]


PATHS = ("scalar", "avx2", "avx512")  # `lowbit_matmul(path=...)`; None: the fastest one here
_PATH_CODE = {None: 0, "scalar": 1, "avx2": 2, "avx512": 3}


def paths(act_int8: bool = False) -> tuple[str, ...]:
  """The kernel paths this CPU runs (a subset of `PATHS`; "avx512" with int8 activations needs
  AVX-512 VNNI)."""
  lib = load()
  return tuple(name for name in PATHS
               if lib.jaxinf_lowbit_has(_PATH_CODE[name], int(bool(act_int8))))


def check_path(path: Any, act_int8: bool = False, arg: str = "path") -> int:
  """The FFI code of `path` (None or one of `PATHS`); ValueError naming `arg` for an unknown one
  or one this CPU does not run."""
  if path is not None and (not isinstance(path, str) or path not in PATHS):
    raise ValueError(f"{arg}: expected None (the fastest path here) or one of {PATHS}, got "
                     f"{path!r}")
  if path is not None and path not in paths(act_int8):
    raise ValueError(f"{arg}: this CPU does not run the {path!r} path "
                     f"(it runs {paths(act_int8)})")
  return _PATH_CODE[path]


PANEL = 16  # columns per panel
OCTET = 8   # int4 k per 64-byte panel step
QUAD = 4    # int8 k per 64-byte panel step


def use_kernel(rows: int, *, codes: bool) -> bool:
  """Whether `x @ w` with `rows` rows of x runs the kernel rather than XLA's form. Integer codes
  (`codes=True`: int4 or int8, fp32 or int8 activations): at every row count, prefill included,
  because a kernel-layout QArray's XLA fallback must first undo the panels and XLA:CPU's grouped /
  integer dots are slow. At 256 rows x 768 x 2304 the kernel took 1.8 ms for W4A8 and 4.3 for W4
  where the fallback took 64 and 25 ms; int8 weight-only, the kernel against the fallback at
  65 / 128 / 256 rows: 0.5-0.6x / 0.5-0.7x / 0.6-1.1x with one scale per column (the one loss,
  1.02 against 0.91 ms at 256 x 384 x 1024) and 0.4-0.6x with groups of 32. fp32 weights
  (`KernelWeight`): up to `MAX_ROWS`; above, XLA's dense fp32 dot (compute-bound, its packing
  wins). `python -m experiments.bench_decode` measures both forms by rows (its kernel-or-XLA
  table)."""
  return rows > 0 and (codes or rows <= MAX_ROWS)


def kernel_step(bits: int) -> int:
  """k per 64-byte panel step: 8 for int2-int4 (nibbles), 4 for int8 (bytes)."""
  return OCTET if bits <= 4 else QUAD


def kernel_layout(codes: jax.Array, bits: int) -> jax.Array:
  """int8 codes `[K, N]` -> the kernel's stored form, panels of 16 columns (P = ceil(N / 16);
  columns and k past the ends are zero codes). bits > 4: int8 `[16 P, 4 ceil(K / 4)]`, panel q's
  bytes `[ceil(K / 4), 16, 4]`: quad o, column 16 q + j, byte b holding k = 4 o + b. bits <= 4:
  uint8 `[16 P, 4 ceil(K / 8)]`, panel q's bytes `[ceil(K / 8), 16, 4]`: octet o, column 16 q + j,
  byte b holding k = 8 o + b in its low nibble and k = 8 o + 4 + b in its high one."""
  codes = jnp.asarray(codes, jnp.int8)
  k, n = codes.shape
  step, panels = kernel_step(bits), -(-n // PANEL)
  ks = -(-k // step)
  if bits > 4:
    u = jnp.pad(codes, ((0, step * ks - k), (0, PANEL * panels - n)))
    u = u.reshape(ks, 4, panels, PANEL)  # [o, b, q, j]: k = 4 o + b; n = 16 q + j
  else:
    u = jnp.pad(codes.astype(jnp.uint8) & 0xF, ((0, step * ks - k), (0, PANEL * panels - n)))
    u = u.reshape(ks, 2, 4, panels, PANEL)  # k = 8 o + 4 h + b; n = 16 q + j
    u = u[:, 0] | (u[:, 1] << 4)  # [o, b, q, j]
  return u.transpose(2, 0, 3, 1).reshape(PANEL * panels, 4 * ks)


def f32_panels(w: jax.Array) -> jax.Array:
  """fp32 `w [K, N]` -> the kernel's fp32 weight panels, float32 `[16 P, K]` (P = ceil(N / 16)):
  panel q's floats `[K, 16]`, line k holding columns 16 q .. 16 q + 15 at that k (columns past N
  are zeros). One 64-byte load gives 16 columns at one k, as the code panels do."""
  w = jnp.asarray(w, jnp.float32)
  k, n = w.shape
  panels = -(-n // PANEL)
  u = jnp.pad(w, ((0, 0), (0, PANEL * panels - n))).reshape(k, panels, PANEL)
  return u.transpose(1, 0, 2).reshape(PANEL * panels, k)


def f32_weights(data: jax.Array, n: int) -> jax.Array:
  """fp32 weight panels `[16 P, K]` -> `W [K, n]` (`f32_panels` undone)."""
  rows, k = data.shape
  return data.reshape(rows // PANEL, k, PANEL).transpose(1, 0, 2).reshape(k, rows)[:, :n]


def f32_columns(data: jax.Array, ids: jax.Array) -> jax.Array:
  """Columns `ids` of the weights in fp32 panels, `W[:, ids]` as `[*ids.shape, K]`."""
  rows, k = data.shape
  ids = jnp.asarray(ids)
  return data.reshape(rows // PANEL, k, PANEL)[ids // PANEL, :, ids % PANEL]


def _unpack_steps(d: jax.Array, bits: int, axis: int) -> jax.Array:
  """Panel step bytes -> int8 codes: int8 bytes as they are; int4 nibbles, the low and high one
  of each byte stacked at `axis` (k = 8 o + 4 h + b), sign-extended."""
  if bits > 4:
    return jnp.asarray(d, jnp.int8)
  u = jnp.stack([d & 0xF, d >> 4], axis=axis)
  return (u.astype(jnp.int8) ^ 8) - 8  # sign-extend the 4-bit two's complement


def _panel_bytes(data: jax.Array, bits: int) -> jax.Array:
  return jnp.asarray(data, jnp.int8 if bits > 4 else jnp.uint8)


def kernel_codes(data: jax.Array, bits: int, k: int, n: int) -> jax.Array:
  """The inverse of `kernel_layout`: the int8 codes `[k, n]` (packed codes sign-extended)."""
  data = _panel_bytes(data, bits)
  ks = data.shape[1] // 4
  d = data.reshape(-1, ks, PANEL, 4).transpose(1, 3, 0, 2)  # [o, b, q, j]: no gather
  u = _unpack_steps(d, bits, axis=1)  # int4: [o, h, b, q, j]
  return u.reshape(kernel_step(bits) * ks, -1)[:k, :n]


def kernel_columns(data: jax.Array, bits: int, k: int, ids: jax.Array) -> jax.Array:
  """Columns `ids` of the codes stored in the kernel layout, int8 `[k, *ids.shape]`; reads only
  their bytes."""
  ids = jnp.asarray(ids)
  data = _panel_bytes(data, bits)
  ks = data.shape[1] // 4
  d = data.reshape(-1, ks, PANEL, 4)[ids // PANEL, :, ids % PANEL, :]  # [*ids, o, b]
  u = _unpack_steps(d, bits, axis=-2)  # int4: [*ids, o, h, b]
  codes = u.reshape(ids.shape + (kernel_step(bits) * ks,))[..., :k]
  return jnp.moveaxis(codes, -1, 0)


def _check_operands(x: Any, data: Any, scale: Any, k: Any, group_size: Any, act_int8: bool,
                    suffix: str = "") -> int:
  """N of `x @ W` for W = (`data`, `scale`) in the kernel layout, or TypeError / ValueError naming
  the argument (`suffix`: which weight of several, e.g. "[1]")."""
  d, s = f"data{suffix}", f"scale{suffix}"
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x: expected a floating [M, {k}] array, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k: expected a positive int, got {k!r}")
  if x.ndim != 2 or x.shape[1] != k:
    raise ValueError(f"x: expected shape [M, {k}], got {tuple(x.shape)}")
  if not hasattr(data, "dtype") or np.dtype(data.dtype) not in (
      np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32)):
    raise TypeError(f"{d}: expected int8 / uint8 (int8 / int4 code panels) or float32 "
                    f"(fp32 weight panels), got {getattr(data, 'dtype', type(data).__name__)}")
  if np.dtype(data.dtype) == np.dtype(np.float32) and act_int8:
    raise ValueError("act_int8: fp32 weights take fp32 activations")
  panels = np.dtype(data.dtype) != np.dtype(np.float32)
  bits = 4 if np.dtype(data.dtype) == np.dtype(np.uint8) else 8
  kb = 4 * (-(-k // kernel_step(bits))) if panels else k
  if data.ndim != 2 or data.shape[1] != kb:
    raise ValueError(f"{d}: expected shape [16 P, {kb}] for K = {k}, got {tuple(data.shape)}")
  if not hasattr(scale, "shape") or len(scale.shape) != 2:
    raise ValueError(f"{s}: expected shape [G, N], got {getattr(scale, 'shape', None)}")
  n = int(scale.shape[1])
  if data.shape[0] != PANEL * (-(-n // PANEL)):
    raise ValueError(f"{d}: expected {PANEL * (-(-n // PANEL))} rows (panels of {PANEL} for "
                     f"N = {n} columns), got {data.shape[0]}")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
      or group_size < 1 or k % group_size:
    raise ValueError(f"group_size: expected a positive divisor of K = {k}, got {group_size!r}")
  if not panels and group_size != k:
    raise ValueError(f"group_size: fp32 weights take one group (group_size = K = {k}), got "
                     f"{group_size}")
  if not hasattr(scale, "dtype") or np.dtype(scale.dtype) not in (np.dtype(np.float32),
                                                                   np.dtype(np.float16)):
    raise TypeError(f"{s}: expected float32 or float16, got "
                    f"{getattr(scale, 'dtype', type(scale).__name__)}")
  if tuple(scale.shape) != (k // group_size, n):
    raise ValueError(f"{s}: expected shape {(k // group_size, n)}, got {tuple(scale.shape)}")
  return n


def lowbit_matmul(x: jax.Array, data: jax.Array, scale: jax.Array, *, k: int, group_size: int,
                  act_int8: bool = False, path: str | None = None) -> jax.Array:
  """`y [M, N] = x [M, K] @ W`, W given in the kernel layout (`kernel_layout`): `data` int8
  `[16 ceil(N / 16), 4 ceil(K / 4)]` (int8 panels), uint8 `[16 ceil(N / 16), 4 ceil(K / 8)]`
  (int4 panels) or float32 `[16 ceil(N / 16), K]` (fp32 weight panels, `f32_panels`; `scale`
  then ones `[1, N]`), `scale` fp32 or fp16 `[K / group_size, N]` (N is read from `scale`).
  `act_int8`: quantize each row of x to int8 (W8A8) and use the integer dot. `path`: None for
  the fastest path this CPU runs, else one of `PATHS` that it runs (`paths()`; the tests run each).
  x is cast to fp32; y is fp32.
  Checks shapes and dtypes before tracing (TypeError / ValueError naming the argument)."""
  n = _check_operands(x, data, scale, k, group_size, act_int8)
  check_backend()
  load()
  code = check_path(path, act_int8)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x.astype(jnp.float32), data, scale, k=np.int64(k),
              group_size=np.int64(group_size), act_int8=np.int32(bool(act_int8)),
              path=np.int32(code))


MAX_FUSED = 8  # weights per `lowbit_matmul_many` call


def lowbit_matmul_many(x: jax.Array, weights: Sequence[tuple[jax.Array, jax.Array]], *, k: int,
                       group_size: int, act_int8: bool = False,
                       path: str | None = None) -> list[jax.Array]:
  """`[x @ W_0, x @ W_1, ...]` for up to `MAX_FUSED` weights `(data, scale)` of one kind (the
  same `data` dtype and group size, as `lowbit_matmul` takes them) in one kernel call: the
  column blocks of every product are shared out to the threads at once and the activations are
  prepared (padded or quantized) once. Each result equals `lowbit_matmul`'s bit for bit (a
  column's sums do not depend on the blocks). A fused projection (q, k and v; gate and up) is one
  call instead of several, which at decode sizes is what a call costs beyond its weights' bytes.
  Checks shapes and dtypes before tracing (TypeError / ValueError naming the argument)."""
  if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_FUSED:
    raise ValueError(f"weights: expected a list of 1 to {MAX_FUSED} (data, scale) pairs, got "
                     f"{type(weights).__name__} of {len(weights) if hasattr(weights, '__len__') else '?'}")
  ns = []
  for i, pair in enumerate(weights):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f"weights[{i}]: expected a (data, scale) pair, got {type(pair).__name__}")
    ns.append(_check_operands(x, pair[0], pair[1], k, group_size, act_int8, f"[{i}]"))
    if np.dtype(pair[0].dtype) != np.dtype(weights[0][0].dtype):
      raise TypeError(f"weights[{i}]: data dtype {pair[0].dtype} differs from weights[0]'s "
                      f"{weights[0][0].dtype} (one call takes one kind of weight)")
  check_backend()
  load()
  code = check_path(path, act_int8)
  call = jax.ffi.ffi_call(MANY_TARGET, [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
                                        for n in ns], vmap_method="sequential")
  operands = [a for pair in weights for a in pair]
  return list(call(x.astype(jnp.float32), *operands, k=np.int64(k),
                   group_size=np.int64(group_size), act_int8=np.int32(bool(act_int8)),
                   path=np.int32(code)))
