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
* `tree_step` / `commit_path` — Medusa's tree attention over this cache, in
  `jaxinf.models.tree_attention`.

`return_hidden=True` on `__call__`, `prefill`, `step` and `tree_step` also returns the final hidden
state (after the final norm, before the head) `[B, T, C]` — what Medusa's heads read.

The KV cache is `{"k", "v": [L, B, Hkv, S, D], "length": [B], "last_k": [B]}` in `cache_dtype`
(None, the default: the compute dtype; "float16" halves the bytes a decode step streams, as
llama.cpp's default F16 cache does, and the CPU attention kernel reads it in place):
head-major, so each head's slots are contiguous and the decode step's products over the cache are
plain batched matmuls over (B, Hkv), with no transpose of the cache per step (on a 2-core CPU the
[L, B, S, Hkv, D] layout made attention 5-9x the cost of streaming the cache). `step` donates its
cache (the caller's arrays are consumed; use the returned cache), so a step called from Python
updates the cache in place instead of copying it.
`TransformerLM(..., kv_policy=KVPolicy(...))` compresses it (fixed-size caches with StreamingLLM,
H2O, SnapKV or D2O eviction; int8 / fp8 storage): `jaxinf.models.kv_policies`, which runs both
forms for it; `kv_policy=None` (the default) is the cache above, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.config import check_fields, check_flag
from jaxinf.models import cpu_attention, kv_policies, layers, tree_attention
from jaxinf.models.functional import (FamilyLM, check_cache_batch, check_keep,
                                      check_prefill_lengths, check_token_ids)
from jaxinf.parallel import kernels as mesh_kernels
from jaxinf.parallel.rules import constrain
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
  cache_dtype: str | None = None  # the KV cache's dtype (None: `dtype`); keys/values are rounded
  # to it when written and later steps read them back in the compute dtype (a prompt's own
  # attention in `prefill` uses them before rounding)

  def __post_init__(self):
    check_fields(self, positive=("rope_theta", "norm_eps", "init_std"))
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
    if self.cache_dtype is not None and self.cache_dtype not in _DTYPES:
      raise ValueError(f"cache_dtype: expected None or one of {_DTYPES}, got "
                       f"{self.cache_dtype!r}")

  @property
  def kv_dtype(self) -> jnp.dtype:
    """The KV cache's dtype: `cache_dtype`, else the compute dtype."""
    return jnp.dtype(self.cache_dtype or self.dtype)


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
    linear = functools.partial(layers.Linear, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                               kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.q_proj = linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    self.k_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    self.v_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    self.o_proj = linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)

  def qkv(self, h: jax.Array, positions: jax.Array):
    """h [B, T, C] (normed) -> q [B, T, H, D], k, v [B, T, Hkv, D], RoPE applied to q and k."""
    b, t, _ = h.shape
    cfg = self.cfg
    q, k, v = layers.project(h, self.q_proj, self.k_proj, self.v_proj)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    # Megatron (Shoeybi et al. 2019, §3): whole heads per tensor shard (a no-op without a mesh)
    q, k, v = (constrain(a, ("batch", None, "head_count", None)) for a in (q, k, v))
    return (layers.apply_rope(q, positions, cfg.rope_theta),
            layers.apply_rope(k, positions, cfg.rope_theta), v)

  def out(self, o: jax.Array) -> jax.Array:
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, -1))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), transformers' `LlamaMLP`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    linear = functools.partial(layers.Linear, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                               kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.mlp_hidden)
    self.up_proj = linear(cfg.hidden_size, cfg.mlp_hidden)
    self.down_proj = linear(cfg.mlp_hidden, cfg.hidden_size)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.down_proj(layers.swiglu(*layers.project(h, self.gate_proj, self.up_proj)))


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
      self.lm_head = layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
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
    x = layers.embed(self.embed_tokens, tokens).astype(jnp.float32)
    for block in self.layers:
      q, k, v = block.attention_inputs(x, positions)
      o = mesh_kernels.attention(q, k, v, causal=True, impl=impl, interpret=interpret)
      x = block.finish(x, o)
    out = self._outputs(x, return_hidden)
    return out if return_hidden else out[0]

  def prefill(self, tokens, cache, lengths, *, impl: str = "auto", interpret: bool = False,
              return_hidden: bool = False, kv_policy: kv_policies.KVPolicy | None = None):
    if kv_policy is not None:
      return kv_policies.prefill(self, kv_policy, tokens, cache, lengths, impl=impl,
                                 interpret=interpret, return_hidden=return_hidden)
    b, t = tokens.shape
    lengths = lengths.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # Slots of padded positions keep their old contents: the contract says they leave the cache
    # untouched (they are past `length`, so no later step would read them anyway).
    keep_new = (positions < lengths[:, None])[:, None, :, None]  # [B, 1, T, 1]
    ks, vs = cache["k"], cache["v"]
    x = layers.embed(self.embed_tokens, tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      q, k, v = block.attention_inputs(x, positions)
      o = mesh_kernels.attention(q, k, v, causal=True, kv_lengths=lengths, impl=impl,
                                   interpret=interpret)
      # the prompt's keys/values [B, T, Hkv, D] into the head-major cache [B, Hkv, S, D]
      k, v = jnp.swapaxes(k, 1, 2).astype(ks.dtype), jnp.swapaxes(v, 1, 2).astype(vs.dtype)
      ks = ks.at[i, :, :, :t].set(jnp.where(keep_new, k, ks[i, :, :, :t]))
      vs = vs.at[i, :, :, :t].set(jnp.where(keep_new, v, vs[i, :, :, :t]))
      x = block.finish(x, o)
    cache = dict(cache, k=ks, v=vs, length=lengths, last_k=jnp.zeros_like(lengths))
    return (*self._outputs(x, return_hidden), cache)

  def step(self, tokens, cache, *, impl: str = "auto", interpret: bool = False,
           return_hidden: bool = False, kv_policy: kv_policies.KVPolicy | None = None):
    if kv_policy is not None:
      return kv_policies.step(self, kv_policy, tokens, cache, impl=impl, interpret=interpret,
                              return_hidden=return_hidden)
    b, k_new = tokens.shape
    start = cache["length"]
    positions = start[:, None] + jnp.arange(k_new, dtype=jnp.int32)[None]
    rows = jnp.arange(b)[:, None]
    new_length = start + k_new
    ks, vs = cache["k"], cache["v"]
    in_place = cpu_attention.use_cpu_attention(impl, interpret, ks.dtype)
    x = layers.embed(self.embed_tokens, tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      q, k, v = block.attention_inputs(x, positions)
      # k, v [B, k, Hkv, D] to slots `positions` of [B, Hkv, S, D] (numpy's rule: the indexed
      # dims (rows, positions) come first, so the update is [B, k, Hkv, D] as it is)
      ks = ks.at[i, rows, :, positions].set(k.astype(ks.dtype))
      vs = vs.at[i, rows, :, positions].set(v.astype(vs.dtype))
      if in_place:  # XLA:CPU: layer i read inside the stack, valid slots only (cpu_attention)
        o = cpu_attention.attention_step(q.astype(jnp.float32), ks, vs, new_length, i)
        o = o.astype(q.dtype)
      else:
        o = mesh_kernels.attention_step(q, ks[i].astype(q.dtype), vs[i].astype(q.dtype),
                                        new_length, impl=impl, interpret=interpret,
                                        layout="bhsd")
      x = block.finish(x, o)
    cache = dict(cache, k=ks, v=vs, length=new_length,
                 last_k=jnp.full_like(start, k_new))
    return (*self._outputs(x, return_hidden), cache)


@dataclasses.dataclass(frozen=True)
class TransformerLM(FamilyLM):
  """`Transformer` under the SequenceModel contract (`jaxinf.models.functional.FamilyLM`).

  Hashable by value, so it is a static argument of jit (`generate`). `impl`/`interpret` choose the
  attention kernels' implementation ("auto": Pallas on GPU, the chunked XLA form on CPU).
  `kv_policy`: KV-cache compression (`jaxinf.models.kv_policies.KVPolicy`; None: the full cache).
  An evicting policy's cache holds a fixed number of slots whatever `max_len`, attends through the
  XLA reference path (it needs the probabilities) and refuses `rollback`, `tree_step` and
  `commit_path` by name.
  """

  kv_policy: kv_policies.KVPolicy | None = None

  config_type: ClassVar[type] = TransformerConfig
  module_type: ClassVar[type] = Transformer

  def __post_init__(self):
    super().__post_init__()
    if self.kv_policy is not None:
      if not isinstance(self.kv_policy, kv_policies.KVPolicy):
        raise TypeError(f"kv_policy: expected a KVPolicy or None, got "
                        f"{type(self.kv_policy).__name__}")
      self.kv_policy.check_cache(self.config.max_len, "the model's context")
      if self.config.cache_dtype not in (None, self.config.dtype):
        raise ValueError(f"cache_dtype: {self.config.cache_dtype!r} with a kv_policy; the policy "
                         "stores keys/values by its own `storage` (native, int8, float8_e4m3fn)")

  def _refuse_evicting(self, what: str) -> None:
    if self.kv_policy is not None and self.kv_policy.evicts:
      raise ValueError(f"kv_policy: {what} is not possible with the evicting KV policy "
                       f"{self.kv_policy.policy!r} (evicted and merged entries cannot be restored);"
                       " use kv_policy=None or policy 'none'")

  def init_cache(self, batch: int, max_len: int) -> dict:
    self.check_cache_request(batch, max_len)
    cfg = self.config
    if self.kv_policy is not None:
      return self.constrain_cache(kv_policies.init_cache(self.kv_policy, cfg, batch, max_len))
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    # k and v separate buffers: `step` donates the cache, and one buffer cannot be donated twice
    zeros = lambda: jnp.zeros(shape, cfg.kv_dtype)
    return self.constrain_cache({"k": zeros(), "v": zeros(),
                                 "length": jnp.zeros((batch,), jnp.int32),
                                 "last_k": jnp.zeros((batch,), jnp.int32)})

  def __call__(self, params: dict, tokens, *, return_hidden: bool = False):
    """Cache-free causal logits `[B, T, V]` (training and scoring); with `return_hidden`,
    (logits, final hidden state `[B, T, C]`)."""
    self.check_params(params)
    check_token_ids("tokens", tokens, self.vocab_size)
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: {tokens.shape[1]} positions exceed the model's context of "
                       f"{self.max_len}")
    check_flag("return_hidden", return_hidden)
    return _forward_jit(self, params, tokens, return_hidden)

  def prefill(self, params: dict, tokens, cache: dict, lengths, *, return_hidden: bool = False):
    """Parallel form over right-padded prompts `[B, T]` into a fresh cache (length 0). Returns
    (logits, cache), or (logits, hidden `[B, T, C]`, cache) with `return_hidden`."""
    self.check_params(params)
    check_token_ids("tokens", tokens, self.vocab_size, lengths)
    b, t = tokens.shape
    check_cache_batch(cache, b)
    check_prefill_lengths(lengths, b, t)
    compressed = self.kv_policy is not None and self.kv_policy.evicts
    if compressed and t > self.max_len:
      raise ValueError(f"tokens: {t} positions exceed the model's context of {self.max_len}")
    if not compressed and t > cache_size(cache):
      raise ValueError(f"tokens: a prompt of {t} positions does not fit the cache of "
                       f"{cache_size(cache)} (init_cache(batch, max_len >= {t}))")
    check_flag("return_hidden", return_hidden)
    return _prefill_jit(self, params, tokens, cache, lengths, return_hidden)

  def check_append(self, tokens, cache):
    """`tokens` `[B, k]` valid ids that fit the cache after every row's length."""
    check_token_ids("tokens", tokens, self.vocab_size)
    b, k = tokens.shape
    check_cache_batch(cache, b)
    # an evicting cache absorbs any number of tokens; positions stay within the model's context
    size = self.max_len if self.kv_policy is not None and self.kv_policy.evicts \
        else cache_size(cache)
    length = dispatch.concrete_value(cache["length"])
    if k > size or (length is not None and (length + k > size).any()):
      raise ValueError(f"tokens: {k} more tokens overflow the cache of {size} positions (rows "
                       f"hold {None if length is None else length.tolist()})")

  def step(self, params: dict, tokens, cache: dict, *, return_hidden: bool = False):
    """Cached form: appends `tokens` `[B, k]` (k >= 1) to every row. Returns (logits, cache), or
    (logits, hidden `[B, k, C]`, cache) with `return_hidden`. The cache is donated: its arrays
    are updated in place and must not be used after the call (keep a copy,
    `jax.tree.map(jnp.copy, cache)`, to step from the same cache twice)."""
    self.check_params(params)
    self.check_append(tokens, cache)
    check_flag("return_hidden", return_hidden)
    return _step_jit(self, params, tokens, cache, return_hidden)

  def tree_step(self, params: dict, tokens, cache: dict, parents: tuple[int, ...], *,
                return_hidden: bool = False):
    """Medusa's tree attention over the nodes `tokens` `[B, n]` of the static tree `parents`:
    `jaxinf.models.tree_attention.tree_step`."""
    if self.kv_policy is not None:
      raise ValueError("kv_policy: tree_step reads the uncompressed cache; build the model with "
                       "kv_policy=None")
    return tree_attention.tree_step(self, params, tokens, cache, parents,
                                    return_hidden=return_hidden)

  def commit_path(self, cache: dict, node_indices, n_accept) -> dict:
    """After `tree_step`, keeps each row's accepted root-to-node path:
    `jaxinf.models.tree_attention.commit_path`."""
    if self.kv_policy is not None:
      raise ValueError("kv_policy: commit_path moves entries of the uncompressed cache; build the "
                       "model with kv_policy=None")
    return tree_attention.commit_path(cache, node_indices, n_accept)

  def cache_batch_axes(self, cache: dict) -> dict:
    if self.kv_policy is not None:
      return kv_policies.cache_batch_axes(cache)
    return {"k": 1, "v": 1, "length": 0, "last_k": 0}

  def rollback(self, cache: dict, keep) -> dict:
    """Keeps the first keep[b] tokens of the last step: the KV slots past the new length are dead
    and get overwritten by the next step, so this is exact (also for the int8 / fp8 storage of
    policy 'none'); an evicting `kv_policy` refuses it (ValueError naming it)."""
    self._refuse_evicting("rollback")
    check_keep(keep, cache)
    keep = jnp.asarray(keep, jnp.int32)
    return dict(cache, length=cache["length"] - cache["last_k"] + keep, last_k=keep)

  def mark(self, cache: dict) -> dict:
    """The lengths alone: later steps write only slots past them, so `restore` is exact by
    pointer, as `rollback` is (an evicting `kv_policy` moves kept entries: a copy of the whole
    cache, `SequenceModel.mark`)."""
    if self.kv_policy is not None and self.kv_policy.evicts:
      return super().mark(cache)
    # copies: `step` donates the cache, lengths included
    return {"length": jnp.copy(cache["length"]), "last_k": jnp.copy(cache["last_k"])}

  def restore(self, cache: dict, mark: dict) -> dict:
    if self.kv_policy is not None and self.kv_policy.evicts:
      return super().restore(cache, mark)
    return dict(cache, length=mark["length"], last_k=mark["last_k"])


def cache_size(cache: dict) -> int:
  """Slots per row, layer and KV head of a transformer cache (`[L, B, Hkv, S, D]`)."""
  return cache["k"].shape[3]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_jit(model: TransformerLM, params, tokens, return_hidden=False):
  return model.pure("__call__")(params, tokens, impl=model.impl, interpret=model.interpret,
                                return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_jit(model: TransformerLM, params, tokens, cache, lengths, return_hidden=False):
  return model.pure("prefill")(params, tokens, cache, lengths, impl=model.impl,
                               interpret=model.interpret, return_hidden=return_hidden,
                               kv_policy=model.kv_policy)


# donate_argnums: the cache is updated in place (without it, every call from Python copies the
# whole cache); inside an outer jit (the decoders' loops) donation does not apply.
@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,))
def _step_jit(model: TransformerLM, params, tokens, cache, return_hidden=False):
  return model.pure("step")(params, tokens, cache, impl=model.impl, interpret=model.interpret,
                            return_hidden=return_hidden, kv_policy=model.kv_policy)
