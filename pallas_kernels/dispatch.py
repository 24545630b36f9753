"""Choosing an implementation and checking arguments, shared by the four ops.

Every public op in this package validates its arguments here *before* anything is traced, so a
bad shape, dtype or decay is reported as a `ValueError`/`TypeError` naming the argument instead of
an XLA shape error deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_gpu", "pallas_tpu")

# A block dimension the kernel sees squeezed away. `pl.squeezed` where this JAX has it (`None`
# is the older spelling, kept as the fallback).
SQUEEZED = getattr(pl, "squeezed", None)
_GPUS = ("gpu", "cuda", "rocm")


def resolve_impl(impl: str, interpret: bool, *, tpu_form: bool = False) -> str:
  """Maps `impl` to one of "reference" | "xla" | "pallas_gpu" | "pallas_tpu".

  Each op has two Pallas forms: a Triton-shaped one for GPU ("pallas_gpu") and a Mosaic-TPU one
  ("pallas_tpu", where the op passes `tpu_form=True`). "pallas" means the form of the backend
  JAX runs on; "auto" means that form on GPU and TPU and the chunked XLA form on CPU, where Pallas
  only runs through an interpreter (a correctness tool, not a fast path).

  `interpret=True` runs a Pallas form on any backend: "pallas" (and "auto") then means the GPU form
  in Pallas' generic interpreter, and "pallas_tpu" the TPU form in JAX's TPU interpret mode (TPU
  memory spaces, DMAs and semaphores simulated on CPU; see `tpu_interpret_params`). Without
  `interpret`, a form only runs on its own backend.
  """
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(interpret, bool):
    raise TypeError(f"interpret must be a bool, got {type(interpret).__name__}")
  backend = jax.default_backend()
  on_gpu, on_tpu = backend in _GPUS, backend == "tpu"
  if impl == "pallas_tpu" and not tpu_form:
    raise ValueError("impl='pallas_tpu': this op has no TPU (Mosaic) form yet; use impl='xla'")
  if impl == "auto":
    if on_tpu:
      return "pallas_tpu" if tpu_form else "xla"
    # interpret=True asks for the Pallas kernel explicitly, so honour it on any backend.
    return "pallas_gpu" if on_gpu or interpret else "xla"
  if impl == "pallas":
    if on_tpu and not interpret:
      if not tpu_form:
        raise ValueError("impl='pallas' on TPU: this op has no TPU (Mosaic) form yet; "
                         "use impl='xla'")
      return "pallas_tpu"
    if not (on_gpu or interpret):
      raise ValueError(
          f"impl='pallas' on the {backend!r} backend needs interpret=True: the Pallas kernels "
          "compile for GPU (Triton) and TPU (Mosaic) only; use impl='xla' for a compiled path here")
    return "pallas_gpu"
  if impl == "pallas_gpu" and not (on_gpu or interpret):
    raise ValueError(
        f"impl={impl!r} on the {backend!r} backend needs interpret=True: the GPU form compiles "
        "for GPU (Triton) only; use impl='xla' for a compiled path here")
  if impl == "pallas_tpu" and not (on_tpu or interpret):
    raise ValueError(
        f"impl='pallas_tpu' on the {backend!r} backend needs interpret=True (JAX's TPU interpret "
        "mode); use impl='xla' for a compiled path here")
  return impl


# The devices `lowering_target` stands in for by default: sm_90 is also what JAX 0.10's Triton
# lowering assumed when no GPU was present; "TPU v5 lite" (v5e) has one TensorCore per chip.
DEFAULT_TARGET_KINDS = {"gpu": "NVIDIA H100", "tpu": "TPU v5 lite"}


@contextlib.contextmanager
def lowering_target(platform: str, device_kind: str | None = None,
                    num_cores: int | None = None) -> Iterator[None]:
  """Lower for a device this host does not have (ahead-of-time `jax.export` from a CPU host).

  A Pallas lowering reads the target chip (a GPU's compute capability, a TPU's tiling) from the
  device. JAX 0.10 assumed sm_90 when no GPU was present; newer JAX (0.12) raises "No supported
  GPU devices found, please specify an abstract GPU device" instead and reads the target from the
  `AbstractDevice` of the current abstract mesh. This context sets a one-device abstract mesh with
  that device, which both versions accept (TPU lowering reads it on both). Only the lowering goes
  inside: eager array operations under an abstract-only mesh are refused by new JAX.

  Args:
    platform: "gpu" or "tpu".
    device_kind: the device's `device_kind` string, e.g. "NVIDIA H100" or "TPU v5 lite"; defaults
      to `DEFAULT_TARGET_KINDS[platform]`.
    num_cores: cores per device (TPU TensorCores), or None; for "tpu" it defaults to 1.
  """
  if platform not in DEFAULT_TARGET_KINDS:
    raise ValueError(f"platform must be one of {tuple(DEFAULT_TARGET_KINDS)}, got {platform!r}")
  if device_kind is None:
    device_kind = DEFAULT_TARGET_KINDS[platform]
  if not isinstance(device_kind, str) or not device_kind:
    raise ValueError(f"device_kind must be a non-empty string, got {device_kind!r}")
  if num_cores is None and platform == "tpu":
    num_cores = 1
  if num_cores is not None and (not isinstance(num_cores, int) or num_cores < 1):
    raise ValueError(f"num_cores must be a positive int or None, got {num_cores!r}")
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform=platform)
  with use_abstract_mesh(AbstractMesh((1,), ("lowering_target",), abstract_device=device)):
    yield


def tpu_interpret_params(interpret: bool, *, detect_races: bool = False):
  """The `interpret=` argument of a Mosaic-TPU `pallas_call`: False, or TPU interpret mode.

  TPU interpret mode raises on out-of-bounds reads and fills uninitialised memory with NaN, so a
  kernel that reads what it never wrote shows up as NaN; `detect_races=True` also checks DMAs and
  semaphores for races (slower; the kernel tests turn it on).
  """
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams(detect_races=detect_races)


def check_array(name: str, x, ndim: int) -> None:
  """`x` must be a floating array with `ndim` dimensions."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_shape(name: str, x, expected: Sequence[int]) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def check_same_dtype(names: Sequence[str], arrays: Sequence) -> None:
  """All `arrays` share one dtype: a silent promotion would change the kernel's precision."""
  dtypes = [a.dtype for a in arrays]
  if any(d != dtypes[0] for d in dtypes):
    listing = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
    raise TypeError(f"{', '.join(names)} must share one dtype, got {listing}")


def check_lengths(name: str, x, batch: int) -> None:
  """An integer vector of per-sequence lengths, shape [B]."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an integer array of shape ({batch},), got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
  check_shape(name, x, (batch,))


# The most elements of a device array a pre-trace check reads (one small transfer).
MAX_CHECKED_ELEMENTS = 1 << 16


def concrete_value(x) -> np.ndarray | None:
  """The value of `x` as numpy when a check may read it now, else None (the check is skipped).

  The rule (DESIGN.md, "Scale": checks before tracing never pull sharded arrays to the host):
  values are read from numpy arrays and Python numbers or lists, and from a `jax.Array` only if it
  lives on a single addressable device and holds at most `MAX_CHECKED_ELEMENTS` elements (a small
  copy; on GPU still one sync). Never read: tracers, abstract placeholders such as
  `jax.ShapeDtypeStruct`, arrays sharded over several devices (on a multi-host mesh they are not
  even addressable) and large device arrays.
  """
  if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    return None
  if isinstance(x, jax.Array):
    if (not x.is_fully_addressable or len(x.sharding.device_set) != 1
        or x.size > MAX_CHECKED_ELEMENTS):
      return None
    x = jax.device_get(x)
  try:
    value = np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          TypeError):
    return None
  # bfloat16 and the other ml_dtypes floats have numpy kind "V": read them as float32 (exact
  # for every value they hold), or their values would go unchecked.
  if value.dtype.kind == "V" and jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(np.float32)
  # Placeholders and other objects come back as object arrays: no value to check.
  return value if value.dtype.kind in "biuf" else None


def check_unit_interval(name: str, x) -> None:
  """Values in (0, 1] when they are known before tracing (a traced value can't be inspected)."""
  value = concrete_value(x)
  if value is None:
    return
  if not np.all((value > 0) & (value <= 1)):
    bad = value[~((value > 0) & (value <= 1))]
    raise ValueError(f"{name} must lie in (0, 1], got values such as {bad.ravel()[:4].tolist()}")


def check_blocks(blocks, cls: type, fields: Sequence[str]) -> None:
  """`blocks` is a `cls` whose `fields` (the sizes the chosen form reads) are positive ints."""
  if not isinstance(blocks, cls):
    raise TypeError(f"blocks must be a {cls.__name__}, got {type(blocks).__name__}")
  for field in fields:
    size = getattr(blocks, field)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
      raise ValueError(f"blocks.{field} must be a positive int, got {size!r}")


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Zero-pads (or `value`-pads) `axis` of `x` at the end up to `size`."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def gpu_compiler_params(num_warps: int, num_stages: int):
  """Triton launch parameters, passed everywhere except on TPU.

  Passing them explicitly matters: with no compiler params, recent JAX lowers a GPU pallas_call
  through Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True), whose layout rules these
  kernels are not written for. The interpreter ignores them; TPU lowering would reject them.
  """
  if jax.default_backend() == "tpu":
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tile(requested: int, length: int) -> int:
  """A power-of-two tile no larger than needed for `length`, at least 16 (Triton's dot minimum)."""
  return max(16, min(next_power_of_2(requested), next_power_of_2(length)))


def kernel_dot(a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
  """a @ b inside a kernel with fp32 accumulation.

  Operands are cast to `compute_dtype` (the input dtype: bf16 feeds the tensor cores); fp32
  operands ask for full precision so Triton does not silently drop to TF32.
  """
  precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
  return jnp.dot(a.astype(compute_dtype), b.astype(compute_dtype), precision=precision,
                 preferred_element_type=jnp.float32)


def compute_dtype(dtype) -> jnp.dtype:
  """The matmul operand dtype for inputs of `dtype`: 16-bit floats stay, anything else is fp32."""
  return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)
