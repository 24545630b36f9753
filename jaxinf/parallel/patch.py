"""Patch parallelism for DiT sampling: each device owns one band of the token sequence.

    patch = PatchParallel(mode="distrifusion", warmup_steps=2)
    x = sample_patch_parallel(key, cfg, params, schedule, DDIM(), (B, 8, 8, 1), steps=20,
                              cond=labels, mesh=make_mesh(sequence=4), patch=patch)

The DiT's T tokens (patches in row-major order) are cut into n contiguous bands of L = T / n
tokens, one per device of the mesh's `sequence` axis (batch rows split over `data` as well). In a
DiT nothing but self-attention couples tokens: the patch embedding, the position embedding, the
LayerNorms (per token, no GroupNorm), the adaLN modulations (from t and y only), the MLPs and the
final layer are all per token. So a band needs from the others only their keys and values, and
the three modes differ only in which K/V a band's queries see:

* `exact`: every layer all-gathers the fresh K/V of every band (one AllGather per layer and step).
  Equal to one device up to fp32 summation order.
* `distrifusion`: displaced patch parallelism (Li et al. 2024, "DistriFusion: Distributed
  Parallel Inference for High-Resolution Diffusion Models", §4.1): a band attends to its own fresh
  K/V and to the other bands' K/V *from the previous step*; the fresh K/V are all-gathered for the
  next step, off the critical path (nothing in this step waits for that AllGather, so XLA's
  scheduler may overlap it with the rest of the step; on CPU nothing overlaps). The first
  `warmup_steps` steps are synchronous (exact), as the paper's warm-up. Communication per step is
  the exact mode's.
* `pcpp`: partially conditioned patch parallelism (Zhang, Luo & Lu 2024, "Partially Conditioned
  Patch Parallelism for Accelerated Diffusion Model Inference", arXiv 2412.02962): AllGather is
  replaced by neighbour-to-neighbour exchanges, and a band attends to its own fresh K/V plus only
  the `fraction` of each *neighbouring* band's (previous-step) K/V nearest to it: the last
  m = fraction * L tokens of band i-1 and the first m of band i+1 (for full-row bands, the patch
  rows adjacent to the boundary). Bands further away are not attended at all; the first and last
  band have one neighbour (the missing side is masked). Each step sends two collective-permutes
  of m tokens' K/V per layer instead of an AllGather of L tokens' to n-1 devices. The warm-up
  steps are exact, as in DistriFusion. What we implemented is this fixed, symmetric choice of
  neighbouring tokens; the paper's exact selection of the partial context may differ.

The stale K/V live in the loop's carry (the "sampler state" beside the solver's), the same
pattern as the feature cache of `jaxinf.diffusion.cache`. The whole sampling loop runs inside one
`jax.shard_map` over the `sequence` (patch) axis, as two `lax.scan`s (warm-up rows, stale rows: no
`lax.cond` on the step index); the solver's step rule (`reverse.apply_step`), per-row noise
(`reverse.step_noise`, drawn at full size then sliced, so the draws equal one device's) and
starting noise (`reverse.initial_noise`) are the library's own. Solvers with dynamic thresholding
(a per-sample quantile over all pixels) are refused: their step rule couples bands.

`communication_per_step` counts the bytes of every collective in the compiled HLO of one step;
`closed_form_communication` gives the same from the shapes. The mesh axis is the existing
`sequence` axis of `jaxinf.parallel.mesh` (no new axis).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.checkpoints.validate import abstract_tree, check_params
from jaxinf.config import check_key
from jaxinf.diffusion.denoiser import Denoiser, DenoiserSpec
from jaxinf.diffusion.reverse import (apply_step, initial_noise, model_inputs, prepare,
                                      step_noise)
from jaxinf.models import dit, layers

MODES = ("exact", "distrifusion", "pcpp")


@dataclasses.dataclass(frozen=True)
class PatchParallel:
  """How the bands exchange K/V (see the module docstring).

  mode: `exact`, `distrifusion` or `pcpp`.
  warmup_steps: synchronous (exact) table rows at the start, >= 1 (no stale K/V exist before the
    first step) and at most the number of rows; ignored by `exact`.
  fraction: `pcpp` only: the share of a neighbouring band's tokens a band attends to, in (0, 1];
    fraction * L must be a whole number of tokens.
  axis: the mesh axis that holds the bands.
  """

  mode: str = "exact"
  warmup_steps: int = 1
  fraction: float = 0.5
  axis: str = "sequence"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
      raise TypeError(f"warmup_steps: expected an int, got {self.warmup_steps!r}")
    if self.warmup_steps < 1:
      raise ValueError(f"warmup_steps: expected >= 1 (the first step has no stale K/V), got "
                       f"{self.warmup_steps}")
    if (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
        or not 0.0 < self.fraction <= 1.0):
      raise ValueError(f"fraction: expected a number in (0, 1], got {self.fraction!r}")
    if not isinstance(self.axis, str):
      raise TypeError(f"axis: expected a mesh axis name, got {self.axis!r}")


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static sizes of one patch-parallel run."""

  n: int            # bands (devices on the patch axis)
  band: int         # L = T / n tokens per band
  neighbor: int     # m: pcpp's tokens taken from each neighbouring band
  batch_axis: Any   # mesh axis of the batch rows, or None
  rows_per_device: int


def _layout(cfg: dit.DiTConfig, mesh, patch: PatchParallel, batch: int) -> _Layout:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  if patch.axis not in sizes:
    raise ValueError(f"mesh: has no axis {patch.axis!r} (patch.axis); axes {tuple(sizes)}")
  n = sizes[patch.axis]
  tokens = cfg.num_tokens
  if tokens % n:
    raise ValueError(f"mesh: the {patch.axis!r} axis has {n} devices (patch bands), which does "
                     f"not divide the DiT's token count T={tokens}")
  others = [a for a, s in sizes.items() if a not in (patch.axis, "data") and s > 1]
  if others:
    raise ValueError(f"mesh: patch parallelism splits tokens over {patch.axis!r} and rows over "
                     f"'data'; axes {others} must have size 1")
  d = sizes.get("data", 1)
  if batch % d:
    raise ValueError(f"shape: batch {batch} is not divisible by the 'data' mesh axis ({d})")
  band = tokens // n
  m = patch.fraction * band
  if patch.mode == "pcpp" and (m != int(m) or m < 1):
    raise ValueError(f"fraction: {patch.fraction} of a band of {band} tokens is {m}, not a whole "
                     f"number >= 1 of tokens")
  return _Layout(n=n, band=band, neighbor=int(m) if patch.mode == "pcpp" else 0, batch_axis="data" if d > 1 else None,
                 rows_per_device=batch // d)


@functools.cache
def _graph(cfg: dit.DiTConfig):
  """(graphdef, abstract params) of a DiT of this config (nothing allocated)."""
  module = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  return graphdef, abstract_tree(nnx.to_pure_dict(state))


def _tokens(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, T, p*p, C] (patchify's token and (p q c) order, channels kept apart)."""
  return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q) c", p=p, q=p)


def _image(tok: jax.Array, p: int, grid: int) -> jax.Array:
  return einops.rearrange(tok, "b (h w) (p q) c -> b (h p) (w q) c", h=grid, w=grid, p=p, q=p)


# --- one step of the model on a band -------------------------------------------------------------

def _band_forward(model, cfg, lay: _Layout, axis: str, x_tok, t, y, kv, kind: str):
  """The DiT on this device's band: `x_tok [Bl, L, p*p, C]` -> (output `[Bl, L, p*p, C_out]`
  fp32, the K/V state for the next step). `kind`: exact | distrifusion | pcpp (a stale step)."""
  dtype = jnp.dtype(cfg.dtype)
  i = lax.axis_index(axis)
  bl, band = x_tok.shape[:2]
  d, heads = cfg.hidden_size, cfg.num_heads
  pos = jnp.asarray(layers.sincos_2d(d, cfg.grid_size), dtype)
  pos = lax.dynamic_slice_in_dim(pos, i * band, band, 0)
  h = model.x_embedder(x_tok.reshape(bl, band, -1).astype(dtype)) + pos[None]
  c = model.t_embedder(t) + model.y_embedder(y)
  m = lay.neighbor
  new_kv = []
  for li, block in enumerate(model.blocks):
    mod = block.adaLN_modulation(jax.nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    hn = layers.modulate(layers.layer_norm(h, block.eps), shift_msa, scale_msa)
    qkv = block.attn.qkv(hn).reshape(bl, band, 3, heads, d // heads)
    q = qkv[:, :, 0]
    fresh = jnp.stack([qkv[:, :, 1], qkv[:, :, 2]])  # [2, Bl, L, H, Dh]
    mask = None
    if kind == "exact":
      kv_all = lax.all_gather(fresh, axis, axis=2, tiled=True)  # [2, Bl, T, H, Dh]
      if lay.neighbor and kv is not None:  # pcpp warm-up: the neighbours' parts, no extra traffic
        total = band * lay.n
        left = lax.dynamic_slice_in_dim(kv_all, jnp.maximum(i * band - m, 0), m, 2)
        right = lax.dynamic_slice_in_dim(kv_all, jnp.minimum((i + 1) * band, total - m), m, 2)
        new_kv.append(jnp.concatenate([left, right], axis=2))
      else:
        new_kv.append(kv_all)
      keys = kv_all
    elif kind == "distrifusion":
      # own band fresh, the others from the previous step (displaced patch parallelism)
      keys = lax.dynamic_update_slice_in_dim(kv[li], fresh, i * band, 2)
      new_kv.append(lax.all_gather(fresh, axis, axis=2, tiled=True))  # for the next step
    else:  # pcpp: own band fresh, m stale tokens from each neighbour
      keys = jnp.concatenate([kv[li][:, :, :m], fresh, kv[li][:, :, m:]], axis=2)
      s = jnp.arange(2 * m + band)
      visible = ((s >= m) & (s < m + band)) | ((s < m) & (i > 0)) | (
          (s >= m + band) & (i < lay.n - 1))
      mask = jnp.broadcast_to(visible, (band, 2 * m + band))[None, None]
      n = lay.n
      # band i-1's last m tokens to band i; band i+1's first m tokens to band i
      if n == 1:  # no neighbours: nothing to send (an empty permute would still be emitted)
        from_left = from_right = jnp.zeros_like(fresh[:, :, :m])
      else:
        from_left = lax.ppermute(fresh[:, :, band - m:], axis,
                                 [(j, j + 1) for j in range(n - 1)])
        from_right = lax.ppermute(fresh[:, :, :m], axis, [(j, j - 1) for j in range(1, n)])
      new_kv.append(jnp.concatenate([from_left, from_right], axis=2))
    out = jax.nn.dot_product_attention(q, keys[0], keys[1], mask=mask)
    attn = block.attn.proj(out.reshape(bl, band, d))
    h = h + gate_msa[:, None] * attn
    hn = layers.modulate(layers.layer_norm(h, block.mlp_eps), shift_mlp, scale_mlp)
    h = h + gate_mlp[:, None] * block.mlp(hn)
  out = model.final_layer(h, c).astype(jnp.float32)
  new_kv = jnp.stack(new_kv) if kv is not None else None
  p2 = cfg.patch_size**2
  return out.reshape(bl, band, p2, -1), new_kv


def _kv_shape(cfg, lay: _Layout, mode: str):
  """The carried K/V per device: `[depth, 2, Bl, S, H, Dh]` (S = T, or 2m for pcpp)."""
  s = cfg.num_tokens if mode == "distrifusion" else 2 * lay.neighbor
  return (cfg.depth, 2, lay.rows_per_device, s, cfg.num_heads, cfg.hidden_size // cfg.num_heads)


# --- the sampling loop ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "spec", "solver", "shape", "patch", "mesh",
                                             "lay"))
def _patch_scan(key, params, table, cond, x_init, init_scale, *, cfg, spec, solver, shape, patch,
                mesh, lay):
  graphdef, _ = _graph(cfg)
  axis, p = patch.axis, cfg.patch_size
  x, loop_key = initial_noise(key, x_init, init_scale, shape)
  rows = table["t"].shape[0]
  warm = rows if patch.mode == "exact" else min(patch.warmup_steps, rows)
  b_ax = lay.batch_axis
  tok_spec = P(b_ax, axis, None, None)

  def body(params, x_tok, cond, table, loop_key):
    model = nnx.merge(graphdef, params)
    den = Denoiser(params, spec)
    i_seq = lax.axis_index(axis)
    i_row = lax.axis_index(b_ax) * lay.rows_per_device if b_ax is not None else 0

    def noise(i):
      z = step_noise(loop_key, i, solver, shape)
      if z is None:
        return None
      z = _tokens(z, p)
      z = lax.dynamic_slice_in_dim(z, i_row, lay.rows_per_device, 0)
      return lax.dynamic_slice_in_dim(z, i_seq * lay.band, lay.band, 1)

    def row(kind):
      def f(carry, inp):
        x, state, kv = carry
        i, c = inp
        x_in, t = model_inputs(solver, x, c)
        out, kv = _band_forward(model, cfg, lay, axis, x_in, t, cond, kv, kind)
        x, state = apply_step(den, solver, x, c, out, noise(i), state)
        return (x, state, kv), None
      return f

    kv = (None if patch.mode == "exact"
          else jnp.zeros(_kv_shape(cfg, lay, patch.mode), jnp.dtype(cfg.dtype)))
    carry = (x_tok, solver.init_state(x_tok), kv)
    idx = jnp.arange(rows, dtype=jnp.int32)
    head = jax.tree.map(lambda a: a[:warm], table)
    carry, _ = lax.scan(row("exact"), carry, (idx[:warm], head))
    if warm < rows:
      tail = jax.tree.map(lambda a: a[warm:], table)
      carry, _ = lax.scan(row(patch.mode), carry, (idx[warm:], tail))
    return carry[0]

  out = jax.shard_map(body, mesh=mesh, in_specs=(P(), tok_spec, P(b_ax), P(), P()),
                      out_specs=tok_spec, check_vma=False)(
                          params, _tokens(x, p), cond, table, loop_key)
  return _image(out, p, cfg.grid_size)


def _check(cfg, params, mesh, patch, shape, solver):
  if not isinstance(cfg, dit.DiTConfig):
    raise TypeError(f"cfg: expected a DiTConfig, got {type(cfg).__name__}")
  if not isinstance(patch, PatchParallel):
    raise TypeError(f"patch: expected a PatchParallel, got {type(patch).__name__}")
  if getattr(solver, "thresholding", False):
    raise ValueError("solver: dynamic thresholding takes a quantile over the whole sample, which "
                     "couples the bands; patch parallelism refuses it")
  check_params(_graph(cfg)[1], params, name="params", dtypes="kind", what="the DiT's parameters")
  if not isinstance(shape, tuple) or not shape or not isinstance(shape[0], (int, np.integer)):
    raise ValueError(f"shape: expected a tuple of ints [B, H, W, C], got {shape!r}")
  return _layout(cfg, mesh, patch, int(shape[0]))


def sample_patch_parallel(key: jax.Array, cfg: dit.DiTConfig, params, schedule, solver,
                          shape: tuple[int, ...], *, steps: int, mesh: Mesh,
                          patch: PatchParallel = PatchParallel(), cond: Any = None,
                          prediction_type: str = "epsilon",
                          x_init: jax.Array | None = None) -> jax.Array:
  """`jaxinf.diffusion.sample.sample` of a DiT, patch parallel over `mesh`'s `patch.axis`.

  Arguments are those of `sample` (key, schedule, solver, shape, steps, cond, x_init; no guidance,
  trajectory or replayed noise) plus the DiT's config and parameters (as `to_functional(DiT)`),
  its `prediction_type`, the mesh and the `PatchParallel` mode. The same key gives the same
  starting and per-step noise as `sample`; `exact` gives the same samples up to fp32 rounding.
  Every argument is checked here, before tracing: the patch axis must divide the token count,
  `warmup_steps` must not exceed the table's rows, the batch must divide over `data`.
  """
  check_key(key)
  lay = _check(cfg, params, mesh, patch, shape, solver)
  # weights committed to one device (a restored checkpoint's are) could not meet the mesh's
  # devices inside the computation: replicate them onto the mesh first
  params = jax.device_put(params, NamedSharding(mesh, P()))
  den = Denoiser(params, _spec(cfg, prediction_type))
  run = prepare(den, schedule, solver, shape, steps=steps, cond=cond, x_init=x_init)
  if patch.mode != "exact" and patch.warmup_steps > run.rows:
    raise ValueError(f"warmup_steps: {patch.warmup_steps} exceeds the {run.rows} table rows of "
                     f"{type(solver).__name__} with {steps} steps")
  return _patch_scan(key, params, run.table, jnp.asarray(run.cond), run.x_init, run.init_scale,
                     cfg=cfg, spec=den.spec, solver=run.solver, shape=run.shape, patch=patch,
                     mesh=mesh, lay=lay)


def _spec(cfg: dit.DiTConfig, prediction_type: str) -> DenoiserSpec:
  """The DenoiserSpec `dit_denoiser` would give (its `apply` unused here: the bands run the model)."""
  return DenoiserSpec(apply=_unused_apply, prediction_type=prediction_type,
                      learned_sigma=cfg.learn_sigma, sample_shape=cfg.sample_shape,
                      num_classes=cfg.num_classes, null_cond=cfg.null_class)


def _unused_apply(params, x_t, t, cond):
  raise NotImplementedError("patch-parallel sampling runs the DiT by bands, not through apply")


# --- bytes communicated ----------------------------------------------------------------------------

_ITEM = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
         "pred": 1, "s64": 8, "u64": 8}
_COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "all-to-all",
                "reduce-scatter")


def _shape_bytes(text: str) -> int:
  return sum(_ITEM[t] * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in re.findall(r"\b(f32|bf16|f16|f64|s32|u32|s8|u8|pred|s64|u64)\[([\d,]*)\]",
                                       text))


def _group_size(line: str) -> int:
  # replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the product of the listed axes' sizes
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", named.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if groups:
    return len([g for g in groups.group(1).split(",") if g])
  return 1


def hlo_collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of every collective in an HLO module's text (`compiled.as_text()`): per kind, the
  per-device operand bytes, and `sent`: the bytes one device sends — an all-gather's operand to
  each of the other g - 1 devices of its group, a collective-permute's operand once, an all-reduce
  2 (g - 1) / g of its operand (ring), an all-to-all and reduce-scatter (g - 1) / g. Async pairs
  count once (the `-start`); ops inside a loop body count once (per iteration)."""
  out = {k: 0 for k in _COLLECTIVES}
  sent = 0.0
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(_COLLECTIVES)
                 + r")(-start)?\(", line)
    if not m:
      continue
    kind = m.group(2)
    g = _group_size(line)
    result = _shape_bytes(m.group(1))
    if m.group(3):  # async start: result is (operand, result[, ...]) — take the operand part
      operand = _shape_bytes(line[line.index(m.group(2) + "-start(") :].split(")", 1)[0])
      if operand == 0:
        operand = result // 2
    else:
      operand = result // g if kind == "all-gather" else (
          result * g if kind == "reduce-scatter" else result)
    out[kind] += operand
    sent += {"all-gather": operand * (g - 1), "collective-permute": operand,
             "all-reduce": 2 * operand * (g - 1) / g, "all-to-all": operand * (g - 1) / g,
             "reduce-scatter": operand * (g - 1) / g}[kind]
  out["sent"] = int(round(sent))
  out["total_operand"] = sum(out[k] for k in _COLLECTIVES)
  return out


def closed_form_communication(cfg: dit.DiTConfig, mesh: Mesh, patch: PatchParallel, batch: int,
                              *, stale: bool) -> dict[str, int]:
  """Per device and per step, from the shapes: an exact (or warm-up) step all-gathers the
  [2, Bl, L, H, Dh] K/V of every layer (operand 2 Bl L D bytes-per-element, sent to n - 1
  devices); a DistriFusion stale step the same (for the next step); a PCPP stale step sends two
  collective-permutes of [2, Bl, m, H, Dh] per layer. One device (n = 1): nothing."""
  lay = _check_layout_only(cfg, mesh, patch, batch)
  item = jnp.dtype(cfg.dtype).itemsize
  out = {k: 0 for k in _COLLECTIVES}
  if lay.n == 1:
    out.update(sent=0, total_operand=0)
    return out
  per_layer = 2 * lay.rows_per_device * cfg.hidden_size * item
  if stale and patch.mode == "pcpp":
    out["collective-permute"] = cfg.depth * 2 * per_layer * lay.neighbor
    out["sent"] = out["collective-permute"]
  else:
    out["all-gather"] = cfg.depth * per_layer * lay.band
    out["sent"] = out["all-gather"] * (lay.n - 1)
  out["total_operand"] = sum(out[k] for k in _COLLECTIVES)
  return out


def _check_layout_only(cfg, mesh, patch, batch):
  if not isinstance(patch, PatchParallel):
    raise TypeError(f"patch: expected a PatchParallel, got {type(patch).__name__}")
  return _layout(cfg, mesh, patch, batch)


def step_hlo(cfg: dit.DiTConfig, params, mesh: Mesh, patch: PatchParallel, batch: int, *,
             stale: bool) -> str:
  """The compiled HLO text of one model step on the bands (a warm-up/exact step, or with `stale`
  a DistriFusion/PCPP step): what `communication_per_step` counts."""
  lay = _check(cfg, params, mesh, patch, (batch, *cfg.sample_shape), None)
  if stale and patch.mode == "exact":
    raise ValueError("stale: the exact mode has no stale steps")
  kind = patch.mode if stale else "exact"
  graphdef, _ = _graph(cfg)
  axis, b_ax = patch.axis, lay.batch_axis
  tok_spec = P(b_ax, axis, None, None)
  kv_spec = P(None, None, b_ax)

  def body(params, x_tok, t, y, kv):
    model = nnx.merge(graphdef, params)
    return _band_forward(model, cfg, lay, axis, x_tok, t, y, kv, kind)

  has_kv = patch.mode != "exact"
  step = jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(P(), tok_spec, P(b_ax), P(b_ax),
                                         kv_spec if has_kv else None),
                               out_specs=(tok_spec, kv_spec if has_kv else None),
                               check_vma=False))
  p2, c = cfg.patch_size**2, cfg.in_channels
  kv = None
  if has_kv:
    shape = _kv_shape(cfg, lay, patch.mode)
    kv = jax.ShapeDtypeStruct((*shape[:2], batch, *shape[3:]), jnp.dtype(cfg.dtype))
  args = (abstract_tree(params), jax.ShapeDtypeStruct((batch, cfg.num_tokens, p2, c), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32),
          kv)
  return step.lower(*args).compile().as_text()


def communication_per_step(cfg: dit.DiTConfig, params, mesh: Mesh, patch: PatchParallel,
                           batch: int, *, stale: bool) -> dict[str, int]:
  """Bytes per device of one step's collectives, counted in the compiled HLO (`hlo_collective_bytes`
  of `step_hlo`); `closed_form_communication` predicts them."""
  return hlo_collective_bytes(step_hlo(cfg, params, mesh, patch, batch, stale=stale))
