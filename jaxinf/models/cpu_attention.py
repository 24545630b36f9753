"""Decode-step attention on XLA:CPU over the transformer's stacked KV cache, in place.

Why: the transformer's decode step attends layer i over `cache["k"][i]`, a slice of the stacked
`[L, B, Hkv, S, D]` cache, and XLA:CPU materializes that slice (a copy of the layer's whole cache,
K and V, every layer, every step), then runs the chunked XLA form over all S slots whatever the
valid length. Measured on the 2-core CPU (llama-110m, int4 weights with int8 activations, 32-token
prompt, 80 new tokens): the copies took 1.1 of 6.0 ms per step at batch 1 and 6 of 29 ms at batch 8,
the attention products another 0.3 and 4 ms.

`attention_step` calls `csrc/attention_step.cc` (built and registered with the CPU kernels of
`jaxinf.quant.cpu_kernel`): it takes the whole stack and the layer index, reads only the valid
slots of that layer (one pass over K, a softmax per query, one pass over V; one task per batch row
and kv head on XLA's intra-op threads) and has the semantics of `pallas_kernels.attention_step`
with layout "bhsd" (query t of row b sees slots s <= lengths[b] - T + t; GQA; a query that sees no
slot gets zeros). The cache may be fp32 or fp16 (`TransformerConfig.cache_dtype="float16"`,
llama.cpp's default KV type): fp16 slots are widened to fp32 as they are read, so a step streams
half the bytes. `use_cpu_attention` is the rule the transformer applies: `impl="auto"` on the CPU
backend with no active mesh, fp32 or fp16 caches, and a kernel that builds; `impl="xla"` keeps the
XLA form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.parallel import rules
from jaxinf.quant import cpu_kernel

_available: bool | None = None


def available() -> bool:
  """Whether the CPU kernels build and load here (cached; False without a C++ compiler)."""
  global _available
  if _available is None:
    try:
      cpu_kernel.load()
      _available = True
    except cpu_kernel.KernelUnavailableError:
      _available = False
  return _available


CACHE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))  # what the kernel reads


def use_cpu_attention(impl: str, interpret: bool, cache_dtype) -> bool:
  """The transformer's rule for its decode step: `impl="auto"`, not interpreted, JAX's default
  backend the CPU, no active mesh (`jax.set_mesh`: GSPMD would gather the cache for a custom call),
  fp32 or fp16 caches, and the kernel available."""
  return (impl == "auto" and not interpret and jax.default_backend() == "cpu"
          and rules.active_mesh() is None and np.dtype(cache_dtype) in CACHE_DTYPES
          and available())


def attention_step(q: jax.Array, k_stack: jax.Array, v_stack: jax.Array, lengths: jax.Array,
                   layer: int, *, scale: float | None = None,
                   path: str | None = None) -> jax.Array:
  """Attention of the T newest queries `q [B, T, H, D]` over layer `layer` of the stacked caches
  `k_stack, v_stack [L, B, Hkv, S, D]` (both fp32 or both fp16), `lengths [B]` the valid lengths
  including the T new tokens. Returns `[B, T, H, D]` fp32. `scale` defaults to D ** -0.5; `path`:
  None for the fastest path this CPU runs, else one of `cpu_kernel.PATHS` that it runs (tests).
  Checks shapes and dtypes before tracing (named errors)."""
  for name, x, nd, ok in (("q", q, 4, CACHE_DTYPES[:1]), ("k_stack", k_stack, 5, CACHE_DTYPES),
                          ("v_stack", v_stack, 5, CACHE_DTYPES)):
    if not hasattr(x, "dtype") or np.dtype(x.dtype) not in ok:
      raise TypeError(f"{name}: expected {' or '.join(map(str, ok))}, got "
                      f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != nd:
      raise ValueError(f"{name}: expected {nd} dims, got shape {tuple(x.shape)}")
  b, t, h, d = q.shape
  if np.dtype(k_stack.dtype) != np.dtype(v_stack.dtype):
    raise TypeError(f"v_stack: expected k_stack's dtype {k_stack.dtype}, got {v_stack.dtype}")
  if tuple(k_stack.shape) != tuple(v_stack.shape):
    raise ValueError(f"v_stack: expected k_stack's shape {tuple(k_stack.shape)}, got "
                     f"{tuple(v_stack.shape)}")
  n_layers, kb, hkv, _, kd = k_stack.shape
  if kb != b or kd != d:
    raise ValueError(f"k_stack: expected [L, {b}, Hkv, S, {d}] (q's batch and head dim), got "
                     f"{tuple(k_stack.shape)}")
  if hkv < 1 or h % hkv:
    raise ValueError(f"q: the {h} query heads must be a multiple of the {hkv} kv heads")
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
      or not 0 <= layer < n_layers:
    raise ValueError(f"layer: expected an int in [0, {n_layers}), got {layer!r}")
  if not hasattr(lengths, "dtype") or not jnp.issubdtype(lengths.dtype, jnp.integer) \
      or tuple(lengths.shape) != (b,):
    raise ValueError(f"lengths: expected an integer [{b}] array, got "
                     f"{getattr(lengths, 'dtype', None)} {tuple(getattr(lengths, 'shape', ()))}")
  scale = float(d ** -0.5 if scale is None else scale)
  cpu_kernel.check_backend("impl")
  cpu_kernel.load()
  code = cpu_kernel.check_path(path)
  call = jax.ffi.ffi_call(cpu_kernel.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q, k_stack, v_stack, lengths.astype(jnp.int32), layer=np.int64(layer),
              scale=np.float32(scale), path=np.int32(code))
