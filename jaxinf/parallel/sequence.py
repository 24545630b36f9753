"""Sequence parallelism for prefill: each device holds one contiguous chunk of the positions.

* `lasp2_lightning_attention`: linear attention with decay (TransNormerLLM's lightning attention)
  by LASP-2 (Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for Linear Attention",
  Algorithm 1). Each device runs `pallas_kernels.lightning_attention` on its chunk from a zero
  state, giving its intra-chunk outputs and its chunk's [Dk, Dv] state; one AllGather shares the
  states; each device sums the earlier chunks' states, decayed, into its incoming prefix state and
  adds the inter-chunk term lambda^{t+1} q_t S_prefix (t local) to its outputs.
* `ring_attention`: softmax attention by Ring Attention (Liu et al. 2023, "Ring Attention with
  Blockwise Transformers"): K/V blocks rotate around the `sequence` axis by `lax.ppermute`; each
  device folds every block into its queries' outputs with the online softmax (running max and sum
  in fp32, FlashAttention-2, Dao 2023, Algorithm 1), masking causally by global positions.
  `pallas_kernels.attention` does not return its log-sum-exp, so the block is plain jnp.

Both take the mesh explicitly and split batch rows (rule "batch") and heads (rule "heads") over
their mesh axes too where those divide, like `jaxinf.parallel.kernels`. Outputs come back sharded
on the sequence axis. They are exact against one device up to fp32 summation order.

Use (a model's prefill): call them in place of the one-device op when the mesh has a `sequence`
axis > 1 dividing T; decoding after prefill reads the returned final state (LASP-2) or the full
K/V (ring attention) as before. The models do not call them themselves yet;
tests/parallel/test_sequence_parallel.py builds whole TransNormerLLM and transformer prefills from
them (in place of the models' attention op) and checks they equal the models' own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxinf.parallel import rules

_HIGHEST = lax.Precision.HIGHEST


def _sequence_size(mesh, axis: str, t_len: int, what: str) -> int:
  """Size of mesh axis `axis`; ValueError if it is missing or does not divide `t_len`."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  if not isinstance(axis, str) or axis not in mesh.axis_names:
    raise ValueError(f"axis: expected a mesh axis name among {tuple(mesh.axis_names)}, "
                     f"got {axis!r}")
  n = dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]
  if t_len % n:
    raise ValueError(f"{what}: the length T={t_len} must be divisible by the {axis!r} mesh axis "
                     f"(size {n})")
  return n


def _split(mesh, name: str, sizes, exclude: str) -> tuple[str, ...]:
  """Mesh axes (size > 1, other than `exclude`) of logical axis `name` if their product divides
  every size in `sizes`, else () (that dimension stays whole on every device)."""
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  axes = tuple(a for a in rules.rule_axes(dict(rules.DEFAULT_RULES)[name])
               if a != exclude and shape.get(a, 1) > 1)
  n = math.prod(shape[a] for a in axes)
  return axes if axes and all(s % n == 0 for s in sizes) else ()


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def lasp2_lightning_attention(q, k, v, decay, *, mesh: Mesh, axis: str = "sequence",
                              initial_state=None, impl: str = "auto", interpret: bool = False):
  """Lightning attention over a sequence-sharded prefill by LASP-2 (Sun et al. 2025, Alg. 1).

  With n devices on `axis`, chunk length L = T / n and chunk states s_j (each chunk run from a
  zero state), device i's incoming state is
      S_i = lambda^{L i} S_0 + sum_{j<i} lambda^{L (i-1-j)} s_j,
  and o_t = o_t^{intra} + lambda^{t+1} q_t S_i for local t in [0, L) (the convention of
  `pallas_kernels.reference.lightning_attention`). The final state is
  lambda^{T} S_0 + sum_j lambda^{L (n-1-j)} s_j.

  Args:
    q, k: [B, T, H, Dk].  v: [B, T, H, Dv].  decay: [H] in (0, 1].
    mesh: a mesh with axis `axis`, whose size divides T.
    initial_state: [B, H, Dk, Dv] (fp32), default zeros.
    impl, interpret: passed to `pallas_kernels.lightning_attention` per chunk.
  Returns:
    (o [B, T, H, Dv] in q's dtype, sharded on `axis` along T; final state [B, H, Dk, Dv] fp32).
  """
  for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("decay", decay, 1)):
    if not hasattr(x, "shape") or x.ndim != nd:
      raise ValueError(f"{name}: expected a {nd}-d array, got {getattr(x, 'shape', type(x))}")
  n = _sequence_size(mesh, axis, q.shape[1], "q")
  batch, t_len, heads, dk = q.shape
  if k.shape != q.shape or v.shape[:3] != q.shape[:3] or decay.shape != (heads,):
    raise ValueError(f"q, k, v, decay: expected q, k [B, T, H, Dk], v [B, T, H, Dv], decay [H], "
                     f"got {q.shape}, {k.shape}, {v.shape}, {decay.shape}")
  if initial_state is not None and initial_state.shape != (batch, heads, dk, v.shape[3]):
    raise ValueError(f"initial_state: expected shape {(batch, heads, dk, v.shape[3])}, "
                     f"got {initial_state.shape}")
  chunk = t_len // n
  b_axes = _split(mesh, "batch", (batch,), axis)
  h_axes = _split(mesh, "heads", (heads,), axis)
  b, h = _entry(b_axes), _entry(h_axes)
  seq_spec = P(b, axis, h, None)
  state_spec = P(b, h, None, None)
  state0 = (jnp.zeros((batch, heads, dk, v.shape[3]), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))

  def body(q, k, v, decay, state0):
    out, local = pallas_kernels.lightning_attention(
        q, k, v, decay, return_final_state=True, impl=impl, interpret=interpret)
    states = lax.all_gather(local, axis)  # [n, B, H, Dk, Dv]: LASP-2's one AllGather
    i = lax.axis_index(axis)
    log_decay = jnp.log(decay.astype(jnp.float32))  # [H]
    j = jnp.arange(n)
    # lambda^{L (i-1-j)} for j < i, masked in the exponent so no inf * 0 appears
    lag = jnp.where(j < i, i - 1 - j, 0)
    weight = jnp.where((j < i)[:, None], jnp.exp((chunk * lag)[:, None] * log_decay), 0.0)
    prefix = (jnp.exp(chunk * i * log_decay)[None, :, None, None] * state0
              + jnp.einsum("nh,nbhde->bhde", weight, states, precision=_HIGHEST))
    t = jnp.arange(chunk)
    from_prefix = jnp.exp((t[:, None] + 1) * log_decay[None])  # lambda^{t+1}, [L, H]
    inter = jnp.einsum("bthd,bhde->bthe", q.astype(jnp.float32), prefix, precision=_HIGHEST)
    out = (out.astype(jnp.float32) + inter * from_prefix[None, :, :, None]).astype(q.dtype)
    to_end = jnp.exp((chunk * (n - 1 - j))[:, None] * log_decay)  # lambda^{L (n-1-j)}, [n, H]
    final = (jnp.exp(t_len * log_decay)[None, :, None, None] * state0
             + jnp.einsum("nh,nbhde->bhde", to_end, states, precision=_HIGHEST))
    return out, final

  return jax.shard_map(body, mesh=mesh,
                       in_specs=(seq_spec, seq_spec, seq_spec, P(h), state_spec),
                       out_specs=(seq_spec, state_spec), check_vma=False)(q, k, v, decay, state0)


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "sequence", causal: bool = True,
                   scale: float | None = None):
  """Softmax attention over a sequence-sharded prefill by Ring Attention (Liu et al. 2023).

  Device i holds queries, keys and values of positions [i L, (i+1) L). For n steps it folds the
  K/V block it holds into running (max m, sum l, accumulator) in fp32 and passes the block to
  device i+1 by `lax.ppermute`; the block held at step s came from device (i - s) mod n, which
  gives the keys' global positions for the causal mask (key s visible to query t iff s <= t).
  o = acc / l (FlashAttention-2, Dao 2023, Algorithm 1, per block).

  Args:
    q: [B, T, H, D].  k: [B, T, Hkv, D], v: [B, T, Hkv, Dv], H % Hkv == 0 (query head h reads
      key head h // (H // Hkv), as `pallas_kernels.attention`).
    mesh: a mesh with axis `axis`, whose size divides T.  causal: mask keys after each query.
    scale: logit scale, default D ** -0.5.
  Returns:
    [B, T, H, Dv] in q's dtype, sharded on `axis` along T.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(f"{name}: expected a 4-d array [B, T, H, D], got "
                       f"{getattr(x, 'shape', type(x))}")
  if not isinstance(causal, bool):
    raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
    raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
  n = _sequence_size(mesh, axis, q.shape[1], "q")
  batch, t_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  if (k.shape[:2] != (batch, t_len) or k.shape[3] != dim or v.shape[:3] != k.shape[:3]
      or heads % kv_heads):
    raise ValueError(f"q, k, v: expected q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with "
                     f"H % Hkv == 0, got {q.shape}, {k.shape}, {v.shape}")
  scale = float(dim ** -0.5 if scale is None else scale)
  groups = heads // kv_heads
  chunk = t_len // n
  b = _entry(_split(mesh, "batch", (batch,), axis))
  h = _entry(_split(mesh, "heads", (heads, kv_heads), axis))
  spec = P(b, axis, h, None)
  perm = [(src, (src + 1) % n) for src in range(n)]

  def body(q, k, v):
    i = lax.axis_index(axis)
    bl, tl, hl, _ = q.shape
    qg = q.astype(jnp.float32).reshape(bl, tl, hl // groups, groups, dim)  # [B, L, Hkv, G, D]
    q_pos = i * chunk + jnp.arange(chunk)
    m = jnp.full((bl, hl // groups, groups, tl), -jnp.inf, jnp.float32)
    l = jnp.zeros_like(m)
    acc = jnp.zeros((bl, hl // groups, groups, tl, v.shape[3]), jnp.float32)
    for s in range(n):
      scores = scale * jnp.einsum("blhgd,bshd->bhgls", qg, k.astype(jnp.float32),
                                  precision=_HIGHEST)
      if causal:
        k_pos = ((i - s) % n) * chunk + jnp.arange(chunk)
        scores = jnp.where(k_pos[None, :] <= q_pos[:, None], scores, -jnp.inf)
      m_new = jnp.maximum(m, scores.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with no visible key yet
      p = jnp.exp(scores - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = correction * l + p.sum(-1)
      acc = correction[..., None] * acc + jnp.einsum("bhgls,bshe->bhgle", p,
                                                     v.astype(jnp.float32), precision=_HIGHEST)
      m = m_new
      if s < n - 1:
        k, v = lax.ppermute((k, v), axis, perm)
    # every query sees at least its own position (causal) or every key, so l > 0
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(bl, tl, hl, v.shape[3])
    return out.astype(q.dtype)

  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
