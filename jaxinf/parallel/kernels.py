"""The Pallas kernels on a mesh: each op of `pallas_kernels` wrapped in `jax.shard_map`.

XLA cannot partition a `pallas_call` (a custom call on GPU, a Mosaic kernel on TPU): under GSPMD it
would gather the operands onto every device. These wrappers have the signatures of the
`pallas_kernels` ops; when the op resolves to its Pallas implementation and a mesh is active
(`jax.set_mesh`), they run it inside `jax.shard_map`, each device on its own rows of the batch
(the mesh axes of the rule "batch") and its own heads (the rule "heads", i.e. `tensor`; channels
for the selective scan). The kernels are independent per (batch row, head), so this is exact; an
axis that does not divide is left whole (replicated within the manual region). Without a mesh, or
for the XLA and reference forms (which GSPMD partitions itself), they call the op directly.

DESIGN.md: `pallas_kernels/` never imports the parallel layer; the models call these wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxinf.parallel import rules
from pallas_kernels import dispatch

# the ops' default blocks, as module-level singletons
_ATTENTION = pallas_kernels.AttentionBlocks()
_LIGHTNING = pallas_kernels.LightningBlocks()
_WKV = pallas_kernels.WKVBlocks()
_SCAN = pallas_kernels.SelectiveScanBlocks()


def _split(mesh, name: str, sizes: Sequence[int]) -> tuple[str, ...]:
  """Mesh axes (size > 1) of logical axis `name` if their product divides every size in `sizes`,
  else () (the axis stays whole)."""
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  axes = tuple(a for a in rules.rule_axes(dict(rules.DEFAULT_RULES)[name]) if shape.get(a, 1) > 1)
  n = math.prod(shape[a] for a in axes)
  return axes if axes and all(s % n == 0 for s in sizes) else ()


def _spec(ndim: int, dims: dict[int, tuple[str, ...]]) -> P:
  return P(*(None if not dims.get(d) else dims[d][0] if len(dims[d]) == 1 else dims[d]
             for d in range(ndim)))


def _run(op: Callable, arrays: dict, layout: dict[str, tuple[int | None, int | None]],
         out_layout: Sequence[tuple[int, int | None, int | None]], batch: int, heads: Sequence[int],
         head_name: str = "heads"):
  """`op(**arrays)` under shard_map: `layout[name]` = (batch dim, head dim) of each input,
  `out_layout` = (ndim, batch dim, head dim) of each output (a tuple if several)."""
  mesh = rules.active_mesh()
  b_axes = _split(mesh, "batch", (batch,))
  h_axes = _split(mesh, head_name, heads)
  if not b_axes and not h_axes:
    return op(**arrays)
  names = [n for n, x in arrays.items() if x is not None]

  def spec(ndim, bdim, hdim):
    dims = {}
    if bdim is not None:
      dims[bdim] = b_axes
    if hdim is not None:
      dims[hdim] = h_axes
    return _spec(ndim, dims)

  in_specs = tuple(spec(arrays[n].ndim, *layout[n]) for n in names)
  out_specs = tuple(spec(*o) for o in out_layout)

  def body(*xs):
    out = op(**dict(zip(names, xs)), **{n: None for n, x in arrays.items() if x is None})
    return out if isinstance(out, tuple) else (out,)

  out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                      check_vma=False)(*(arrays[n] for n in names))
  return out if len(out) > 1 else out[0]


def _pallas_on_mesh(impl: str, interpret: bool) -> bool:
  # tpu_form=True: only "is this a Pallas form at all" matters here; the op itself refuses a form
  # it does not have.
  chosen = dispatch.resolve_impl(impl, interpret, tpu_form=True)
  return chosen.startswith("pallas") and rules.active_mesh() is not None


def attention(q, k, v, *, causal: bool = False, scale=None, kv_lengths=None, q_offsets=None,
              impl: str = "auto", interpret: bool = False,
              blocks: pallas_kernels.AttentionBlocks = _ATTENTION):
  """`pallas_kernels.attention` (q [B, Tq, H, D], k/v [B, Tk, Hkv, D]) on the active mesh."""
  def op(q, k, v, kv_lengths, q_offsets):
    return pallas_kernels.attention(q, k, v, causal=causal, scale=scale, kv_lengths=kv_lengths,
                                    q_offsets=q_offsets, impl=impl, interpret=interpret,
                                    blocks=blocks)
  if not _pallas_on_mesh(impl, interpret):
    return op(q, k, v, kv_lengths, q_offsets)
  # scale defaults to D ** -0.5 of the whole head, which every shard keeps (heads split, D not)
  return _run(op, {"q": q, "k": k, "v": v, "kv_lengths": kv_lengths, "q_offsets": q_offsets},
              {"q": (0, 2), "k": (0, 2), "v": (0, 2), "kv_lengths": (0, None),
               "q_offsets": (0, None)},
              [(4, 0, 2)], q.shape[0], (q.shape[2], k.shape[2]))


def attention_step(q, k_cache, v_cache, lengths, *, scale=None, impl: str = "auto",
                   interpret: bool = False,
                   blocks: pallas_kernels.AttentionBlocks = _ATTENTION, layout: str = "bshd"):
  """`pallas_kernels.attention_step` (q [B, K, H, D], caches [B, S, Hkv, D], or [B, Hkv, S, D]
  with layout "bhsd") on the active mesh."""
  def op(q, k_cache, v_cache, lengths):
    return pallas_kernels.attention_step(q, k_cache, v_cache, lengths, scale=scale, impl=impl,
                                         interpret=interpret, blocks=blocks, layout=layout)
  if not _pallas_on_mesh(impl, interpret):
    return op(q, k_cache, v_cache, lengths)
  h_dim = 1 if layout == "bhsd" else 2
  return _run(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lengths": lengths},
              {"q": (0, 2), "k_cache": (0, h_dim), "v_cache": (0, h_dim), "lengths": (0, None)},
              [(4, 0, 2)], q.shape[0], (q.shape[2], k_cache.shape[h_dim]))


def lightning_attention(q, k, v, decay, *, initial_state=None, return_final_state: bool = False,
                        impl: str = "auto", interpret: bool = False,
                        blocks: pallas_kernels.LightningBlocks = _LIGHTNING):
  """`pallas_kernels.lightning_attention` (q/k/v [B, T, H, D], decay [H], state [B, H, Dk, Dv])
  on the active mesh."""
  def op(q, k, v, decay, initial_state):
    return pallas_kernels.lightning_attention(
        q, k, v, decay, initial_state=initial_state, return_final_state=return_final_state,
        impl=impl, interpret=interpret, blocks=blocks)
  if not _pallas_on_mesh(impl, interpret):
    return op(q, k, v, decay, initial_state)
  outs = [(4, 0, 2)] + ([(4, 0, 1)] if return_final_state else [])
  return _run(op,
              {"q": q, "k": k, "v": v, "decay": decay, "initial_state": initial_state},
              {"q": (0, 2), "k": (0, 2), "v": (0, 2), "decay": (None, 0), "initial_state": (0, 1)},
              outs, q.shape[0], (q.shape[2],))


def wkv7(r, w, k, v, a, b, *, initial_state=None, return_final_state: bool = False,
         impl: str = "auto", interpret: bool = False,
         blocks: pallas_kernels.WKVBlocks = _WKV):
  """`pallas_kernels.wkv7` (r, w, k, v, a, b [B, T, H, D], state [B, H, Dv, Dk]) on the active
  mesh."""
  def op(r, w, k, v, a, b, initial_state):
    return pallas_kernels.wkv7(r, w, k, v, a, b, initial_state=initial_state,
                               return_final_state=return_final_state, impl=impl,
                               interpret=interpret, blocks=blocks)
  if not _pallas_on_mesh(impl, interpret):
    return op(r, w, k, v, a, b, initial_state)
  outs = [(4, 0, 2)] + ([(4, 0, 1)] if return_final_state else [])
  per_head = (0, 2)
  return _run(op, {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b, "initial_state": initial_state},
              {**dict.fromkeys("rwkvab", per_head), "initial_state": (0, 1)},
              outs, r.shape[0], (r.shape[2],))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus: bool = False, *, initial_state=None,
                   return_final_state: bool = False, impl: str = "auto", interpret: bool = False,
                   blocks: pallas_kernels.SelectiveScanBlocks = _SCAN):
  """`pallas_kernels.selective_scan` (u/delta/z [B, T, D], A [D, N], B/C [B, T, N] shared by all
  channels, D/delta_bias [D], state [B, D, N]) on the active mesh: channels split like heads
  (the rule "ssm_inner"). Grouped B/C ([B, T, G, N]) split their groups with the channels."""
  def op(u, delta, A, B, C, D, z, delta_bias, initial_state):
    return pallas_kernels.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=initial_state,
        return_final_state=return_final_state, impl=impl, interpret=interpret, blocks=blocks)
  if not _pallas_on_mesh(impl, interpret):
    return op(u, delta, A, B, C, D, z, delta_bias, initial_state)
  grouped = B.ndim == 4
  outs = [(3, 0, 2)] + ([(3, 0, 1)] if return_final_state else [])
  bc = (0, 2) if grouped else (0, None)
  return _run(op,
              {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
               "delta_bias": delta_bias, "initial_state": initial_state},
              {"u": (0, 2), "delta": (0, 2), "A": (None, 0), "B": bc, "C": bc, "D": (None, 0),
               "z": (0, 2), "delta_bias": (None, 0), "initial_state": (0, 1)},
              outs, u.shape[0], (u.shape[2],) + ((B.shape[2],) if grouped else ()), "ssm_inner")
