"""Medusa's tree attention over the transformer's KV cache (Cai et al. 2024, "Medusa", §2.1.2;
SpecInfer's token tree, Miao et al. 2024).

n candidate nodes of a static tree (`parents`: parents[0] = -1, 0 <= parents[i] < i) are verified
in one call: node i's key/value go to slot length + i, its RoPE position is length + depth(i), and
it attends to the cached prefix and to its own ancestors only (Fig. 2's tree mask), so its logits
are those of stepping its root-to-node path one token at a time. `commit_path` then compacts each
row's accepted path into contiguous slots and advances the length, which leaves exactly the cache
sequential decoding of that path would hold. The attention is an XLA masked form (the kernels take
no arbitrary mask).

The functions take a `jaxinf.models.transformer.TransformerLM` (duck-typed: its merged module
exposes `embed_tokens`, `layers[i].attention_inputs / finish` and `_outputs`); this module does not
import the transformer, which delegates its `tree_step` / `commit_path` methods here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.config import check_flag
from jaxinf.models import layers
from jaxinf.models.functional import check_cache_batch
from pallas_kernels import dispatch


def tree_structure(parents: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(depth [n] int32, ancestors [n, n] bool with ancestors[i, j] iff j is i or an ancestor of i)
  of a tree given by parent indices (parents[0] = -1, 0 <= parents[i] < i)."""
  check_tree_parents(parents)
  n = len(parents)
  depth = np.zeros(n, np.int32)
  ancestors = np.eye(n, dtype=bool)
  for i in range(1, n):
    depth[i] = depth[parents[i]] + 1
    ancestors[i] |= ancestors[parents[i]]
  return depth, ancestors


def check_tree_parents(parents) -> None:
  if not isinstance(parents, tuple) or not parents or any(
      isinstance(p, bool) or not isinstance(p, (int, np.integer)) for p in parents):
    raise TypeError(f"parents: expected a non-empty tuple of ints (static), got {parents!r}")
  if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
    raise ValueError(f"parents: expected parents[0] == -1 and 0 <= parents[i] < i (nodes in "
                     f"topological order), got {parents}")


def tree_mask(parents: tuple[int, ...], start: jax.Array, size: int) -> jax.Array:
  """visible `[B, n, S]`: slot s is in row b's prefix (s < start[b]), or holds node i itself or
  one of its ancestors (nodes sit in slots start[b] + index)."""
  n = len(parents)
  _, ancestors = tree_structure(parents)
  rel = jnp.arange(size, dtype=jnp.int32)[None] - start[:, None]  # [B, S]
  in_tree = (rel >= 0) & (rel < n)
  anc = jnp.asarray(ancestors)[:, jnp.clip(rel, 0, n - 1)]  # [n, B, S]
  return (rel < 0)[:, None, :] | (in_tree[:, None, :] & jnp.moveaxis(anc, 0, 1))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v over the keys `visible` `[B, Tq, S]` marks (Vaswani et al. 2017,
  eq. 1) with grouped-query heads; q `[B, Tq, H, D]`, k/v head-major `[B, Hkv, S, D]` (the
  transformer's cache layout); fp32 softmax. Every query must see at least one key."""
  b, tq, h, d = q.shape
  groups = h // k.shape[1]
  qg = q.astype(jnp.float32).reshape(b, tq, k.shape[1], groups, d)
  logits = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(jnp.float32)) * d ** -0.5
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bkgts,bksd->btkgd", w, v.astype(jnp.float32))
  return o.reshape(b, tq, h, d).astype(q.dtype)


def tree_forward(module, tokens, cache, parents: tuple[int, ...], *, return_hidden: bool = False):
  """The transformer module's layers over the tree's nodes `tokens` `[B, n]` (see the module
  docstring). `length` does not move: the nodes are tentative until `commit_path`."""
  b, n = tokens.shape
  depths, _ = tree_structure(parents)
  start = cache["length"]
  positions = start[:, None] + jnp.asarray(depths)[None]
  slots = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  rows = jnp.arange(b)[:, None]
  visible = tree_mask(parents, start, cache["k"].shape[3])
  ks, vs = cache["k"], cache["v"]
  x = layers.embed(module.embed_tokens, tokens).astype(jnp.float32)
  for i, block in enumerate(module.layers):
    q, k, v = block.attention_inputs(x, positions)
    # [B, n, Hkv, D] into [L, B, Hkv, S, D]
    ks = ks.at[i, rows, :, slots].set(k.astype(ks.dtype))
    vs = vs.at[i, rows, :, slots].set(v.astype(vs.dtype))
    x = block.finish(x, masked_attention(q, ks[i].astype(q.dtype), vs[i].astype(q.dtype),
                                         visible))
  cache = dict(cache, k=ks, v=vs, last_k=jnp.zeros_like(start))
  return (*module._outputs(x, return_hidden), cache)


def tree_step(model, params: dict, tokens, cache: dict, parents: tuple[int, ...], *,
              return_hidden: bool = False):
  """Verifies the n nodes `tokens` `[B, n]` of the static tree `parents` (a tuple) in one call
  against `model`'s cache. Returns (logits `[B, n, V]`, cache), or (logits, hidden `[B, n, C]`,
  cache) with `return_hidden`; follow with `commit_path`."""
  check_tree_parents(parents)
  model.check_append(tokens, cache)
  if tokens.shape[1] != len(parents):
    raise ValueError(f"tokens: {tokens.shape[1]} nodes, but parents describes a tree of "
                     f"{len(parents)}")
  check_flag("return_hidden", return_hidden)
  return _tree_step_jit(model, params, tokens, cache, tuple(int(p) for p in parents),
                        return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _tree_step_jit(model, params, tokens, cache, parents, return_hidden):
  return tree_forward(model.module(params), tokens, cache, parents, return_hidden=return_hidden)


def commit_path(cache: dict, node_indices, n_accept) -> dict:
  """After `tree_step`: row b keeps its nodes node_indices[b, :n_accept[b]] `[B, d]` (a root-to-
  node path, root first), compacted into slots [length, length + n_accept), and the length
  advances by n_accept — exactly the cache of stepping that path one token at a time."""
  check_cache_batch(cache, cache["length"].shape[0])
  b = cache["length"].shape[0]
  if not hasattr(node_indices, "shape") or node_indices.ndim != 2 \
      or node_indices.shape[0] != b or not jnp.issubdtype(node_indices.dtype, jnp.integer):
    raise ValueError(f"node_indices: expected integer [B={b}, d], got "
                     f"{getattr(node_indices, 'dtype', type(node_indices).__name__)} "
                     f"{tuple(getattr(node_indices, 'shape', ()))}")
  d = node_indices.shape[1]
  dispatch.check_lengths("n_accept", n_accept, b)
  size = cache["k"].shape[3]
  idx, n, length = (dispatch.concrete_value(x) for x in (node_indices, n_accept,
                                                        cache["length"]))
  if n is not None and ((n < 0) | (n > d)).any():
    raise ValueError(f"n_accept: expected values in [0, {d}], got {n.tolist()}")
  if idx is not None and (idx < 0).any():
    raise ValueError(f"node_indices: expected non-negative node indices, got {idx.tolist()}")
  if idx is not None and length is not None and (length[:, None] + idx >= size).any():
    raise ValueError(f"node_indices: slots length + index overflow the cache of {size}")
  return _commit_jit(cache, jnp.asarray(node_indices, jnp.int32),
                     jnp.asarray(n_accept, jnp.int32))


@jax.jit
def _commit_jit(cache: dict, node_indices: jax.Array, n_accept: jax.Array) -> dict:
  b, d = node_indices.shape
  start = cache["length"]
  rows = jnp.arange(b)[:, None]
  src = start[:, None] + node_indices.astype(jnp.int32)
  dst = start[:, None] + jnp.arange(d, dtype=jnp.int32)[None]
  keep = (jnp.arange(d)[None] < n_accept[:, None])[:, :, None, None, None]

  def move(buf):  # [L, B, Hkv, S, D]; gather everything first, so overlaps cannot clobber
    # numpy's rule: the indexed dims (rows, slots) come first, [B, d, L, Hkv, D]
    moved = buf[:, rows, :, src]
    return buf.at[:, rows, :, dst].set(jnp.where(keep, moved, buf[:, rows, :, dst]))

  n_accept = n_accept.astype(jnp.int32)
  return dict(cache, k=move(cache["k"]), v=move(cache["v"]), length=start + n_accept,
              last_k=n_accept)
