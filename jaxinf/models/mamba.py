"""Mamba-1 language model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", §3.4 and Fig. 3), as mamba_ssm's `Mamba` block and transformers' `MambaMixer`.

Each block: x + mixer(RMSNorm(x)), where the mixer is
in_proj -> (x, z); x <- silu(causal depthwise conv1d(x) + bias); x_proj(x) -> (dt_low, B, C);
delta = softplus(dt_proj(dt_low) + dt_bias); y = selective_scan(x, delta, A = -exp(A_log), B, C, D)
* silu(z); out_proj(y). A final RMSNorm and a head tied to the embedding (by default) give logits.

Recurrent state per layer: the conv state (the last W - 1 conv inputs, `[B, W-1, Di]`) and the SSM
state (`[B, Di, N]`, fp32). Two forms:

* `prefill` — the parallel form, `pallas_kernels.selective_scan` over right-padded prompts.
  Padded positions get delta = 0 (their pre-softplus delta is -inf, and softplus(-inf) = 0), so
  exp(0 A) = 1 and delta u B = 0 leave the SSM state as it was at the row's last real token; the
  conv state is read at each row's own length.
* `step` — the recurrent form over k >= 1 tokens, `pallas_kernels.selective_scan_step` per token.
  It keeps the state after every one of the k tokens (`ssm_history`) and the conv window they
  slid over (`conv_window`), so `rollback` to any of the k positions restores the states exactly,
  without recomputation — what speculative verification needs (DESIGN.md, SequenceModel).
  `MambaLM.max_step` bounds k so the cache keeps fixed shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

import pallas_kernels
from jaxinf.config import check_fields
from jaxinf.models import layers
from jaxinf.models.functional import (FamilyLM, check_cache_batch, check_keep,
                                      check_prefill_lengths, check_token_ids)
from jaxinf.parallel import kernels as mesh_kernels

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Static configuration; names as transformers' `MambaConfig` where they exist."""

  vocab_size: int = 259
  hidden_size: int = 64
  num_layers: int = 2
  state_size: int = 16
  expand: int = 2
  conv_kernel: int = 4
  dt_rank: int | None = None  # None: ceil(hidden_size / 16), mamba_ssm's "auto"
  norm_eps: float = 1e-5
  use_bias: bool = False  # in_proj / out_proj biases
  use_conv_bias: bool = True
  tie_embeddings: bool = True
  # mamba_ssm's initialisation: dt log-uniform in [dt_min, dt_max] through the inverse softplus of
  # dt_bias, A = -[1..N] per channel, D = 1; `init_std` for the embedding (its 0.02).
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  init_std: float = 0.02
  dtype: str = "float32"  # activations and the conv state; SSM states are always fp32

  def __post_init__(self):
    check_fields(self, positive=("norm_eps", "dt_min", "dt_max", "dt_init_floor", "init_std"))
    for name in ("vocab_size", "hidden_size", "num_layers", "state_size", "expand",
                 "conv_kernel"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.conv_kernel < 2:
      raise ValueError(f"conv_kernel: expected >= 2 (a causal conv with state), got "
                       f"{self.conv_kernel}")
    if self.dt_rank is None:
      object.__setattr__(self, "dt_rank", math.ceil(self.hidden_size / 16))
    if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 1:
      raise ValueError(f"dt_rank: expected a positive int or None, got {self.dt_rank!r}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {self.dt_min}, "
                       f"{self.dt_max}")
    for name in ("norm_eps", "init_std", "dt_init_floor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")

  @property
  def inner_size(self) -> int:
    return self.expand * self.hidden_size


# Named sizes. "-1m": ~1M parameters over the byte vocabulary (259 ids), matched within 1% to
# `transformer.TRANSFORMER_CONFIGS["transformer-1m"]` (966,144 vs 956,160 parameters).
MAMBA_CONFIGS: dict[str, MambaConfig] = {
    "mamba-1m": MambaConfig(vocab_size=259, hidden_size=128, num_layers=8, state_size=16),
    "mamba-tiny": MambaConfig(vocab_size=64, hidden_size=32, num_layers=2, state_size=8),
}


def mamba_config(name: str, **overrides: Any) -> MambaConfig:
  """A named configuration, optionally with fields replaced."""
  if name not in MAMBA_CONFIGS:
    raise ValueError(f"name: unknown Mamba config {name!r}; known: {sorted(MAMBA_CONFIGS)}")
  return dataclasses.replace(MAMBA_CONFIGS[name], **overrides)


class MambaMixer(nnx.Module):
  """The selective-SSM token mixer (mamba_ssm `Mamba`, transformers `MambaMixer`)."""

  def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    di, n, r, w = cfg.inner_size, cfg.state_size, cfg.dt_rank, cfg.conv_kernel
    dtype = jnp.dtype(cfg.dtype)
    self.in_proj = layers.Linear(cfg.hidden_size, 2 * di, use_bias=cfg.use_bias, dtype=dtype,
                                 rngs=rngs)
    # nn.Conv1d's default init: uniform(+-1/sqrt(fan_in)), fan_in = W for a depthwise conv.
    bound = 1.0 / math.sqrt(w)
    self.conv_weight = nnx.Param(
        jax.random.uniform(rngs.params(), (w, di), jnp.float32, -bound, bound))
    if cfg.use_conv_bias:
      self.conv_bias = nnx.Param(
          jax.random.uniform(rngs.params(), (di,), jnp.float32, -bound, bound))
    self.x_proj = layers.Linear(di, r + 2 * n, use_bias=False, dtype=dtype, rngs=rngs)
    dt_std = r ** -0.5  # mamba_ssm's dt_init="random": uniform(-dt_rank^-0.5, dt_rank^-0.5)
    self.dt_proj = layers.Linear(
        r, di, use_bias=False, dtype=dtype, rngs=rngs,
        kernel_init=lambda key, shape, dt: jax.random.uniform(key, shape, dt, -dt_std, dt_std))
    dt = jnp.exp(jax.random.uniform(rngs.params(), (di,), jnp.float32)
                 * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = jnp.maximum(dt, cfg.dt_init_floor)
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # inverse softplus
    self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(
        jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))))
    self.D = nnx.Param(jnp.ones((di,), jnp.float32))
    self.out_proj = layers.Linear(di, cfg.hidden_size, use_bias=cfg.use_bias, dtype=dtype,
                                  rngs=rngs)

  def _conv(self, x: jax.Array, conv_state: jax.Array):
    """silu(causal depthwise conv) of x [B, T, Di] continuing from conv_state [B, W-1, Di].
    Returns (out [B, T, Di], window [B, W-1+T, Di]: the state followed by x)."""
    window = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
    t, w = x.shape[1], self.cfg.conv_kernel
    weight = self.conv_weight[...].astype(x.dtype)
    out = sum(window[:, j:j + t] * weight[j] for j in range(w))
    if self.cfg.use_conv_bias:
      out = out + self.conv_bias[...].astype(x.dtype)
    return jax.nn.silu(out), window

  def _ssm_inputs(self, h: jax.Array, conv_state: jax.Array):
    cfg = self.cfg
    x, z = jnp.split(self.in_proj(h), 2, axis=-1)
    u, window = self._conv(x, conv_state)
    dt_low, B, C = jnp.split(self.x_proj(u), [cfg.dt_rank, cfg.dt_rank + cfg.state_size], axis=-1)
    # dt_bias is added inside the scan, before its fp32 softplus (mamba_ssm's delta_bias).
    delta = self.dt_proj(dt_low)
    A = -jnp.exp(self.A_log[...])
    return u, delta, A, B, C, z, window

  def prefill(self, h, conv_state, ssm_state, lengths, *, impl: str, interpret: bool):
    """h [B, T, C] (normed), right-padded. Returns (out [B, T, C], conv_state, ssm_state) with the
    states taken at each row's own length."""
    t, w = h.shape[1], self.cfg.conv_kernel
    u, delta, A, B, C, z, window = self._ssm_inputs(h, conv_state)
    valid = jnp.arange(t)[None, :, None] < lengths[:, None, None]
    delta = jnp.where(valid, delta, -jnp.inf)  # softplus(-inf + bias) = 0: state untouched
    y, ssm_state = mesh_kernels.selective_scan(
        u, delta, A, B, C, self.D[...], z, self.dt_bias[...], True, initial_state=ssm_state,
        return_final_state=True, impl=impl, interpret=interpret)
    # The window holds [state, x]; row b's last W-1 real inputs are window[len_b : len_b + W-1].
    idx = lengths[:, None] + jnp.arange(w - 1)[None]
    conv_state = jnp.take_along_axis(window, idx[:, :, None], axis=1)
    return self.out_proj(y), conv_state, ssm_state

  def step(self, h, conv_state, ssm_state):
    """h [B, k, C] (normed), every position real. Returns (out [B, k, C], window [B, W-1+k, Di],
    states [k, B, Di, N]: the SSM state after each token)."""
    u, delta, A, B, C, z, window = self._ssm_inputs(h, conv_state)
    D, dt_bias = self.D[...], self.dt_bias[...]

    def one_token(state, inputs):
      u_t, delta_t, B_t, C_t, z_t = inputs
      y_t, state = pallas_kernels.selective_scan_step(u_t, delta_t, A, B_t, C_t, D, z_t, dt_bias,
                                                      state, delta_softplus=True)
      return state, (y_t, state)

    time_major = lambda x: rearrange(x, "b t ... -> t b ...")
    _, (y, states) = jax.lax.scan(one_token, ssm_state,
                                  tuple(map(time_major, (u, delta, B, C, z))))
    return self.out_proj(rearrange(y, "t b d -> b t d")), window, states


class MambaBlock(nnx.Module):
  def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps)
    self.mixer = MambaMixer(cfg, rngs=rngs)


class Mamba(nnx.Module):
  """The Mamba LM. `__call__` is the stateless forward (training); `prefill` and `step` are the
  two halves of the SequenceModel contract (see `MambaLM`). The residual stream is fp32, as
  mamba_ssm's `residual_in_fp32`."""

  def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.layers = nnx.List([MambaBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm_f = layers.RMSNorm(cfg.hidden_size, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                   dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  def _logits(self, x: jax.Array) -> jax.Array:
    h = self.norm_f(x).astype(jnp.dtype(self.cfg.dtype))
    if self.cfg.tie_embeddings:
      logits = h @ self.embeddings.embedding[...].astype(h.dtype).T
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)

  def _normed(self, block: MambaBlock, x: jax.Array) -> jax.Array:
    return block.norm(x).astype(jnp.dtype(self.cfg.dtype))

  def __call__(self, tokens, *, impl: str = "auto", interpret: bool = False):
    """Logits `[B, T, V]` from zero states."""
    b, t = tokens.shape
    cfg = self.cfg
    lengths = jnp.full((b,), t, jnp.int32)
    conv = jnp.zeros((b, cfg.conv_kernel - 1, cfg.inner_size), jnp.dtype(cfg.dtype))
    ssm = jnp.zeros((b, cfg.inner_size, cfg.state_size), jnp.float32)
    x = layers.embed(self.embeddings, tokens).astype(jnp.float32)
    for block in self.layers:
      out, _, _ = block.mixer.prefill(self._normed(block, x), conv, ssm, lengths, impl=impl,
                                      interpret=interpret)
      x = x + out.astype(jnp.float32)
    return self._logits(x)

  def prefill(self, tokens, cache, lengths, *, impl: str = "auto", interpret: bool = False):
    lengths = lengths.astype(jnp.int32)
    conv, ssm, hist = cache["conv"], cache["ssm"], cache["ssm_history"]
    x = layers.embed(self.embeddings, tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      out, conv_i, ssm_i = block.mixer.prefill(self._normed(block, x), conv[i], ssm[i], lengths,
                                               impl=impl, interpret=interpret)
      conv, ssm = conv.at[i].set(conv_i), ssm.at[i].set(ssm_i)
      hist = hist.at[i, :, 0].set(ssm_i)
      x = x + out.astype(jnp.float32)
    w = self.cfg.conv_kernel
    cache = dict(cache, conv=conv, ssm=ssm, ssm_history=hist,
                 conv_window=cache["conv_window"].at[:, :, :w - 1].set(conv),
                 length=lengths, last_k=jnp.zeros_like(lengths))
    return self._logits(x), cache

  def step(self, tokens, cache):
    k = tokens.shape[1]
    w = self.cfg.conv_kernel
    conv, ssm = cache["conv"], cache["ssm"]
    window_buf, hist = cache["conv_window"], cache["ssm_history"]
    x = layers.embed(self.embeddings, tokens).astype(jnp.float32)
    for i, block in enumerate(self.layers):
      out, window, states = block.mixer.step(self._normed(block, x), conv[i], ssm[i])
      # History slot j holds the state after j of the k tokens (slot 0: before the step).
      hist = hist.at[i, :, 0].set(ssm[i])
      hist = hist.at[i, :, 1:k + 1].set(rearrange(states, "t b d n -> b t d n"))
      window_buf = window_buf.at[i, :, :w - 1 + k].set(window)
      conv, ssm = conv.at[i].set(window[:, k:]), ssm.at[i].set(states[-1])
      x = x + out.astype(jnp.float32)
    cache = dict(cache, conv=conv, ssm=ssm, conv_window=window_buf, ssm_history=hist,
                 length=cache["length"] + k, last_k=jnp.full_like(cache["last_k"], k))
    return self._logits(x), cache


def rollback_states(cache: dict, keep: jax.Array, conv_kernel: int) -> dict:
  """The states after the first keep[b] tokens of the last step, read from its kept history."""
  keep = keep.astype(jnp.int32)
  idx = keep[:, None] + jnp.arange(conv_kernel - 1)[None]  # [B, W-1]
  conv = jnp.take_along_axis(cache["conv_window"], idx[None, :, :, None], axis=2)
  ssm = jnp.take_along_axis(cache["ssm_history"], keep[None, :, None, None, None], axis=2)[:, :, 0]
  return dict(cache, conv=conv, ssm=ssm, length=cache["length"] - cache["last_k"] + keep,
              last_k=keep)


@dataclasses.dataclass(frozen=True)
class MambaLM(FamilyLM):
  """`Mamba` under the SequenceModel contract (`jaxinf.models.functional.FamilyLM`).

  Hashable by value (a static argument of jit). `max_step` is the most tokens one `step` may
  append (the speculation window): the cache keeps that many states per layer for `rollback`.
  `impl`/`interpret` choose the selective-scan implementation of `prefill`.
  """

  max_step: int = 8

  config_type: ClassVar[type] = MambaConfig
  module_type: ClassVar[type] = Mamba
  rollback_keys: ClassVar[tuple[str, ...]] = ("conv_window", "ssm_history", "last_k")

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """Fixed-size states; `max_len` is accepted for the contract and ignored (no context limit)."""
    self.check_cache_request(batch, max_len)
    cfg = self.config
    l, w, di, n, s = cfg.num_layers, cfg.conv_kernel, cfg.inner_size, cfg.state_size, self.max_step
    act = jnp.dtype(cfg.dtype)
    return self.constrain_cache({
        "conv": jnp.zeros((l, batch, w - 1, di), act),
        "ssm": jnp.zeros((l, batch, di, n), jnp.float32),
        "conv_window": jnp.zeros((l, batch, w - 1 + s, di), act),
        "ssm_history": jnp.zeros((l, batch, s + 1, di, n), jnp.float32),
        "length": jnp.zeros((batch,), jnp.int32),
        "last_k": jnp.zeros((batch,), jnp.int32),
    })

  def _check_cache(self, cache: dict, batch: int) -> None:
    check_cache_batch(cache, batch)
    expected = jax.eval_shape(functools.partial(self.init_cache, batch))
    shapes = {k: tuple(v.shape) for k, v in cache.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != want:
      raise ValueError(f"cache: expected shapes {want} (init_cache of this model), got {shapes}")

  def __call__(self, params: dict, tokens) -> jax.Array:
    self.check_params(params)
    check_token_ids("tokens", tokens, self.vocab_size)
    return _forward_jit(self, params, tokens)

  def prefill(self, params: dict, tokens, cache: dict, lengths):
    """Parallel form over right-padded prompts `[B, T]` from a fresh cache (length 0)."""
    self.check_params(params)
    check_token_ids("tokens", tokens, self.vocab_size, lengths)
    b, t = tokens.shape
    self._check_cache(cache, b)
    check_prefill_lengths(lengths, b, t)
    return _prefill_jit(self, params, tokens, cache, lengths)

  def step(self, params: dict, tokens, cache: dict):
    """Recurrent form: appends `tokens` `[B, k]`, 1 <= k <= max_step, to every row."""
    self.check_params(params)
    check_token_ids("tokens", tokens, self.vocab_size)
    b, k = tokens.shape
    self._check_cache(cache, b)
    if k > self.max_step:
      raise ValueError(f"tokens: {k} tokens in one step exceed max_step={self.max_step} (the "
                       "per-position state history kept for rollback); build the model with a "
                       "larger max_step")
    return _step_jit(self, params, tokens, cache)

  def cache_batch_axes(self, cache: dict) -> dict:
    return {name: 0 if name in ("length", "last_k") else 1 for name in cache}

  def rollback(self, cache: dict, keep) -> dict:
    check_keep(keep, cache)
    return _rollback_jit(cache, jnp.asarray(keep), self.config.conv_kernel)


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(model: MambaLM, params, tokens):
  return model.pure("__call__")(params, tokens, impl=model.impl, interpret=model.interpret)


@functools.partial(jax.jit, static_argnums=0)
def _prefill_jit(model: MambaLM, params, tokens, cache, lengths):
  return model.pure("prefill")(params, tokens, cache, lengths, impl=model.impl,
                               interpret=model.interpret)


@functools.partial(jax.jit, static_argnums=0)
def _step_jit(model: MambaLM, params, tokens, cache):
  return model.pure("step")(params, tokens, cache)


_rollback_jit = jax.jit(rollback_states, static_argnums=2)
