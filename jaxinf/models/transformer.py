"""Softmax decoder LM — the baseline family: Llama's architecture with a per-row KV cache.

Pre-norm decoder blocks (Touvron et al. 2023, "LLaMA", §2.2): RMSNorm, grouped-query attention
(Ainslie et al. 2023) with rotary positions in the rotate-half layout, SwiGLU MLP, a final RMSNorm
and a tied or untied output head. The arithmetic is that of transformers' `LlamaForCausalLM`
(`modeling_llama.py`), so its weights convert by renaming and transposing only
(`jaxinf.checkpoints.transformers_lm`); the parity test holds the two together to 1e-4.

Two forms of one model (DESIGN.md, "every fast path has a slow twin"):

* `prefill` — the parallel form over right-padded prompts: `pallas_kernels.attention`, causal with
  per-row key lengths; keys/values of the valid positions are written to the cache.
* `step` — the cached form over k >= 1 new tokens: their keys/values go to slots
  `[length, length + k)`, and `pallas_kernels.attention_step` attends the k queries to the cache
  (k > 1 is speculative verification). `rollback` only moves the length pointer: slots past it are
  dead and the next step overwrites them, so undoing a step is exact.
* `tree_step` / `commit_path` — Medusa's tree attention (Cai et al. 2024, §2.1.2; SpecInfer's
  token tree, Miao et al. 2024): n candidate nodes verified in one call, each attending to the
  cached prefix and its own ancestors only, then the accepted root-to-node path compacted into
  contiguous slots. An XLA masked-attention path (the kernels take no arbitrary mask).

`return_hidden=True` on `__call__`, `prefill`, `step` and `tree_step` also returns the final hidden
state (after the final norm, before the head) `[B, T, C]` — what Medusa's heads read.

The KV cache is `{"k", "v": [L, B, S, Hkv, D], "length": [B], "last_k": [B]}` in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from jaxinf.models import layers
from jaxinf.models.functional import (SequenceModel, check_cache_batch, check_int, check_keep,
                                      check_prefill_lengths, check_token_ids, to_functional)
from pallas_kernels import dispatch

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static configuration. Field names follow the paper; `jaxinf.checkpoints.transformers_lm` maps
  transformers' `LlamaConfig` onto them."""

  vocab_size: int = 259
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_heads, as LlamaConfig
  mlp_hidden: int = 172
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_len: int = 2048  # the longest context (RoPE has no hard limit; the cache is sized by it)
  init_std: float = 0.02  # Llama's initializer_range: normal(0, init_std) for every matrix
  dtype: str = "float32"  # activations and KV cache; parameters are fp32, softmax and norms fp32

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "mlp_hidden", "max_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size "
                         f"{self.hidden_size}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2 \
        or self.head_dim % 2:
      raise ValueError(f"head_dim: expected an even int >= 2 (RoPE pairs channels), got "
                       f"{self.head_dim!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads} "
                       "(grouped-query attention)")
    for name in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")


# Named sizes. "-1m": ~1M parameters over the byte vocabulary (259 ids of
# `jaxinf.data.tokenizer.ByteTokenizer`), matched within 1% to `mamba.MAMBA_CONFIGS["mamba-1m"]`
# for the family comparison (956,160 vs 966,144 parameters).
TRANSFORMER_CONFIGS: dict[str, TransformerConfig] = {
    "transformer-1m": TransformerConfig(vocab_size=259, hidden_size=128, num_layers=5, num_heads=4,
                                        num_kv_heads=2, mlp_hidden=352, tie_embeddings=True,
                                        max_len=1024),
    # the speculative-decoding target (experiments.speculative): ~13x transformer-1m, whose
    # decode step at batch 1 costs ~9x as much on a 2-core CPU (1.8 ms against 0.2 ms)
    "transformer-12m": TransformerConfig(vocab_size=259, hidden_size=384, num_layers=8,
                                         num_heads=6, num_kv_heads=2, mlp_hidden=1024,
                                         tie_embeddings=True, max_len=1024),
    "transformer-tiny": TransformerConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                          num_kv_heads=2, mlp_hidden=64, max_len=64),
}


def transformer_config(name: str, **overrides: Any) -> TransformerConfig:
  """A named configuration, optionally with fields replaced."""
  if name not in TRANSFORMER_CONFIGS:
    raise ValueError(f"name: unknown transformer config {name!r}; known: "
                     f"{sorted(TRANSFORMER_CONFIGS)}")
  return dataclasses.replace(TRANSFORMER_CONFIGS[name], **overrides)


class Attention(nnx.Module):
  """Projections of grouped-query attention; the attention itself is the kernel's, called by
  `Transformer` with the form (prefill or cached step) it needs."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                               kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.q_proj = linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    self.k_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    self.v_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    self.o_proj = linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)

  def qkv(self, h: jax.Array, positions: jax.Array):
    """h [B, T, C] (normed) -> q [B, T, H, D], k, v [B, T, Hkv, D], RoPE applied to q and k."""
    b, t, _ = h.shape
    cfg = self.cfg
    q = self.q_proj(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    return (layers.apply_rope(q, positions, cfg.rope_theta),
            layers.apply_rope(k, positions, cfg.rope_theta), v)

  def out(self, o: jax.Array) -> jax.Array:
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, -1))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), transformers' `LlamaMLP`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                               kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.mlp_hidden)
    self.up_proj = linear(cfg.hidden_size, cfg.mlp_hidden)
    self.down_proj = linear(cfg.mlp_hidden, cfg.hidden_size)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.down_proj(layers.swiglu(self.gate_proj(h), self.up_proj(h)))


class DecoderBlock(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); split at the attention so that prefill and step
  can each call their own kernel between `attention_inputs` and `finish`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def attention_inputs(self, x: jax.Array, positions: jax.Array):
    return self.self_attn.qkv(self.input_layernorm(x), positions)

  def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
    # The residual stream stays fp32 (DESIGN.md, numerics); the branches run in the compute dtype.
    x = x + self.self_attn.out(attn).astype(jnp.float32)
    return x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32)


class Transformer(nnx.Module):
  """The decoder LM. `__call__` is the cache-free causal forward (training); `prefill` and `step`
  are the two halves of the SequenceModel contract (see `TransformerLM`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                  embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.layers = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                dtype=jnp.dtype(cfg.dtype),
                                kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

  def _final_hidden(self, x: jax.Array) -> jax.Array:
    """The last hidden state: the final norm of the residual stream, in the compute dtype."""
    return self.norm(x).astype(jnp.dtype(self.cfg.dtype))

  def _head(self, h: jax.Array) -> jax.Array:
    if self.cfg.tie_embeddings:
      logits = h @ self.embed_tokens.embedding[...].astype(h.dtype).T
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)

  def _logits(self, x: jax.Array) -> jax.Array:
    return self._head(self._final_hidden(x))

  def _outputs(self, x: jax.Array, return_hidden: bool):
    """(logits,) or (logits, hidden) from the residual stream."""
    h = self._final_hidden(x)
    return (self._head(h), h) if return_hidden else (self._head(h),)

  def __call__(self, tokens: jax.Array, *, impl: str = "auto", interpret: bool = False,
               return_hidden: bool = False):
    """Causal logits `[B, T, V]` of full sequences `[B, T]`, no cache (and the final hidden state
    `[B, T, C]` with `return_hidden`)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens).astype(jnp.float32)
    for block in self.layers:
      q, k, v = block.attention_inputs(x, positions)
      o = pallas_kernels.attention(q, k, v, causal=True, impl=impl, interpret=interpret)
      x = block.finish(x, o)
    out = self._outputs(x, return_hidden)
    return out if return_hidden else out[0]

  def prefill(self, tokens, cache, lengths, *, impl: str = "auto", interpret: bool = False,
              return_hidden: bool = False):
    b, t = tokens.shape
    lengths = lengths.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # Slots of padded positions keep their old contents: the contract says they leave the cache
    # untouched (they are past `length`, so no later step would read them anyway).
    keep_new = (positions < lengths[:, None])[:, :, None, None]
    ks, vs = cache["k"], cache["v"]
    x = self.embed_tokens(tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      q, k, v = block.attention_inputs(x, positions)
      o = pallas_kernels.attention(q, k, v, causal=True, kv_lengths=lengths, impl=impl,
                                   interpret=interpret)
      ks = ks.at[i, :, :t].set(jnp.where(keep_new, k, ks[i, :, :t]))
      vs = vs.at[i, :, :t].set(jnp.where(keep_new, v, vs[i, :, :t]))
      x = block.finish(x, o)
    cache = dict(cache, k=ks, v=vs, length=lengths, last_k=jnp.zeros_like(lengths))
    return (*self._outputs(x, return_hidden), cache)

  def step(self, tokens, cache, *, impl: str = "auto", interpret: bool = False,
           return_hidden: bool = False):
    b, k_new = tokens.shape
    start = cache["length"]
    positions = start[:, None] + jnp.arange(k_new, dtype=jnp.int32)[None]
    rows = jnp.arange(b)[:, None]
    new_length = start + k_new
    ks, vs = cache["k"], cache["v"]
    x = self.embed_tokens(tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      q, k, v = block.attention_inputs(x, positions)
      ks = ks.at[i, rows, positions].set(k)
      vs = vs.at[i, rows, positions].set(v)
      o = pallas_kernels.attention_step(q, ks[i], vs[i], new_length, impl=impl,
                                        interpret=interpret)
      x = block.finish(x, o)
    cache = dict(cache, k=ks, v=vs, length=new_length,
                 last_k=jnp.full_like(start, k_new))
    return (*self._outputs(x, return_hidden), cache)

  def tree_step(self, tokens, cache, parents: tuple[int, ...], *, return_hidden: bool = False):
    """Tree attention over n candidate nodes `tokens` `[B, n]` (node i's parent is parents[i];
    node 0 is the root, parents[0] = -1, parents[i] < i).

    Node i's key/value go to slot length + i, its RoPE position is length + depth(i), and it
    attends to the cached prefix (slots < length) and to its ancestors and itself — so its logits
    are those of stepping its root-to-node path one token at a time (Medusa, Cai et al. 2024,
    §2.1.2, Fig. 2's tree mask). `length` does not move: the nodes are tentative until
    `commit_path`.
    """
    b, n = tokens.shape
    depths, ancestors = tree_structure(parents)
    start = cache["length"]
    positions = start[:, None] + jnp.asarray(depths)[None]
    slots = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    rows = jnp.arange(b)[:, None]
    size = cache["k"].shape[2]
    # visible[b, i, s]: slot s is in row b's prefix, or holds an ancestor of node i (or i itself)
    rel = jnp.arange(size, dtype=jnp.int32)[None] - start[:, None]  # [B, S]
    in_tree = (rel >= 0) & (rel < n)
    anc = jnp.asarray(ancestors)[:, jnp.clip(rel, 0, n - 1)]  # [n, B, S]
    visible = (rel < 0)[:, None, :] | (in_tree[:, None, :] & jnp.moveaxis(anc, 0, 1))
    ks, vs = cache["k"], cache["v"]
    x = self.embed_tokens(tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      q, k, v = block.attention_inputs(x, positions)
      ks = ks.at[i, rows, slots].set(k)
      vs = vs.at[i, rows, slots].set(v)
      x = block.finish(x, masked_attention(q, ks[i], vs[i], visible))
    cache = dict(cache, k=ks, v=vs, last_k=jnp.zeros_like(start))
    return (*self._outputs(x, return_hidden), cache)


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


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v over the keys `visible` `[B, Tq, S]` marks (Vaswani et al. 2017,
  eq. 1) with grouped-query heads; q `[B, Tq, H, D]`, k/v `[B, S, Hkv, D]`; fp32 softmax. Every
  query must see at least one key."""
  b, tq, h, d = q.shape
  groups = h // k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, tq, k.shape[2], groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * d ** -0.5
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", w, v.astype(jnp.float32))
  return o.reshape(b, tq, h, d).astype(q.dtype)


def commit_path_cache(cache: dict, node_indices: jax.Array, n_accept: jax.Array) -> dict:
  """After `tree_step`: moves row b's nodes node_indices[b, :n_accept[b]] (slots length + index)
  to slots [length, length + n_accept) and advances the length by n_accept — the cache sequential
  decoding of that path would hold. Slots past the new length are dead (as after `rollback`)."""
  b, d = node_indices.shape
  start = cache["length"]
  rows = jnp.arange(b)[:, None]
  src = start[:, None] + node_indices.astype(jnp.int32)
  dst = start[:, None] + jnp.arange(d, dtype=jnp.int32)[None]
  keep = (jnp.arange(d)[None] < n_accept[:, None])[None, :, :, None, None]

  def move(buf):  # [L, B, S, Hkv, D]; gather everything first, so overlaps cannot clobber
    moved = buf[:, rows, src]
    return buf.at[:, rows, dst].set(jnp.where(keep, moved, buf[:, rows, dst]))

  n_accept = n_accept.astype(jnp.int32)
  return dict(cache, k=move(cache["k"]), v=move(cache["v"]), length=start + n_accept,
              last_k=n_accept)


@functools.cache
def _functional(cfg: TransformerConfig) -> dict[str, Callable[..., Any]]:
  """The module's methods as pure functions of (params, ...), built once per config from an
  abstract module (no weights are allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return {m: to_functional(abstract, m)[0] for m in ("__call__", "prefill", "step", "tree_step")}


@dataclasses.dataclass(frozen=True)
class TransformerLM(SequenceModel):
  """`Transformer` under the SequenceModel contract (`jaxinf.models.functional`).

  Hashable by value, so it is a static argument of jit (`generate`). `impl`/`interpret` choose the
  attention kernels' implementation ("auto": Pallas on GPU, the chunked XLA form on CPU).
  """

  config: TransformerConfig
  impl: str = "auto"
  interpret: bool = False

  def __post_init__(self):
    if not isinstance(self.config, TransformerConfig):
      raise TypeError(f"config: expected a TransformerConfig, got {type(self.config).__name__}")
    dispatch.resolve_impl(self.impl, self.interpret)  # validates both

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_len(self) -> int:
    return self.config.max_len

  def init_params(self, seed: int = 0) -> dict:
    """Random parameters as a nested dict of fp32 arrays (Llama's normal(0, init_std), norms 1)."""
    return nnx.to_pure_dict(nnx.state(Transformer(self.config, rngs=nnx.Rngs(seed))))

  def abstract_params(self) -> dict:
    """The parameter tree's shapes (`jax.ShapeDtypeStruct`), for key checks without weights."""
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(self.config, rngs=nnx.Rngs(0)))))

  def init_cache(self, batch: int, max_len: int) -> dict:
    check_int("batch", batch)
    check_int("max_len", max_len)
    if max_len > self.config.max_len:
      raise ValueError(f"max_len: {max_len} exceeds the model's context of {self.config.max_len}")
    cfg = self.config
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return {"k": zeros, "v": zeros, "length": jnp.zeros((batch,), jnp.int32),
            "last_k": jnp.zeros((batch,), jnp.int32)}

  def __call__(self, params: dict, tokens, *, return_hidden: bool = False):
    """Cache-free causal logits `[B, T, V]` (training and scoring); with `return_hidden`,
    (logits, final hidden state `[B, T, C]`)."""
    check_token_ids("tokens", tokens, self.vocab_size)
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: {tokens.shape[1]} positions exceed the model's context of "
                       f"{self.max_len}")
    _check_flag("return_hidden", return_hidden)
    return _forward_jit(self, params, tokens, return_hidden)

  def prefill(self, params: dict, tokens, cache: dict, lengths, *, return_hidden: bool = False):
    """Parallel form over right-padded prompts `[B, T]` into a fresh cache (length 0). Returns
    (logits, cache), or (logits, hidden `[B, T, C]`, cache) with `return_hidden`."""
    check_token_ids("tokens", tokens, self.vocab_size, lengths)
    b, t = tokens.shape
    check_cache_batch(cache, b)
    check_prefill_lengths(lengths, b, t)
    if t > cache["k"].shape[2]:
      raise ValueError(f"tokens: a prompt of {t} positions does not fit the cache of "
                       f"{cache['k'].shape[2]} (init_cache(batch, max_len >= {t}))")
    _check_flag("return_hidden", return_hidden)
    return _prefill_jit(self, params, tokens, cache, lengths, return_hidden)

  def _check_append(self, tokens, cache):
    check_token_ids("tokens", tokens, self.vocab_size)
    b, k = tokens.shape
    check_cache_batch(cache, b)
    size = cache["k"].shape[2]
    length = dispatch.concrete_value(cache["length"])
    if k > size or (length is not None and (length + k > size).any()):
      raise ValueError(f"tokens: {k} more tokens overflow the cache of {size} positions (rows "
                       f"hold {None if length is None else length.tolist()})")

  def step(self, params: dict, tokens, cache: dict, *, return_hidden: bool = False):
    """Cached form: appends `tokens` `[B, k]` (k >= 1) to every row. Returns (logits, cache), or
    (logits, hidden `[B, k, C]`, cache) with `return_hidden`."""
    self._check_append(tokens, cache)
    _check_flag("return_hidden", return_hidden)
    return _step_jit(self, params, tokens, cache, return_hidden)

  def tree_step(self, params: dict, tokens, cache: dict, parents: tuple[int, ...], *,
                return_hidden: bool = False):
    """Tree attention (Medusa, Cai et al. 2024, §2.1.2): verifies the n nodes `tokens` `[B, n]`
    of a static tree (`parents`, a tuple: parents[0] = -1, 0 <= parents[i] < i) in one call.

    Node i is written to slot length + i at RoPE position length + depth(i) and attends to the
    prefix and its ancestors only, so logits[:, i] are those of stepping node i's root-to-node
    path token by token. The length does not move; follow with `commit_path`. Returns
    (logits `[B, n, V]`, cache), or (logits, hidden `[B, n, C]`, cache) with `return_hidden`.
    """
    check_tree_parents(parents)
    self._check_append(tokens, cache)
    if tokens.shape[1] != len(parents):
      raise ValueError(f"tokens: {tokens.shape[1]} nodes, but parents describes a tree of "
                       f"{len(parents)}")
    _check_flag("return_hidden", return_hidden)
    return _tree_step_jit(self, params, tokens, cache, tuple(int(p) for p in parents),
                          return_hidden)

  def commit_path(self, cache: dict, node_indices, n_accept) -> dict:
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
    size = cache["k"].shape[2]
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

  def cache_batch_axes(self, cache: dict) -> dict:
    return {"k": 1, "v": 1, "length": 0, "last_k": 0}

  def rollback(self, cache: dict, keep) -> dict:
    """Keeps the first keep[b] tokens of the last step: the KV slots past the new length are dead
    and get overwritten by the next step, so this is exact."""
    check_keep(keep, cache)
    keep = jnp.asarray(keep, jnp.int32)
    return dict(cache, length=cache["length"] - cache["last_k"] + keep, last_k=keep)


def _check_flag(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_jit(model: TransformerLM, params, tokens, return_hidden=False):
  return _functional(model.config)["__call__"](params, tokens, impl=model.impl,
                                               interpret=model.interpret,
                                               return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_jit(model: TransformerLM, params, tokens, cache, lengths, return_hidden=False):
  return _functional(model.config)["prefill"](params, tokens, cache, lengths, impl=model.impl,
                                              interpret=model.interpret,
                                              return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _step_jit(model: TransformerLM, params, tokens, cache, return_hidden=False):
  return _functional(model.config)["step"](params, tokens, cache, impl=model.impl,
                                           interpret=model.interpret, return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _tree_step_jit(model: TransformerLM, params, tokens, cache, parents, return_hidden):
  return _functional(model.config)["tree_step"](params, tokens, cache, parents,
                                                return_hidden=return_hidden)


_commit_jit = jax.jit(commit_path_cache)
