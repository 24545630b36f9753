"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution").

The arithmetic follows RWKV-LM's `RWKV-v7/rwkv_v7_demo.py` / `rwkv_v7_numpy.py` and the `rwkv`
pip package's `RWKV_x070` (x070 "rc4a", the final release); parameter names are RWKV-LM's:

time mix (`att`), with x the ln1 output and x_prev its token shift (the previous token's x):
  xr, xw, xk, xv, xa, xg = x + (x_prev - x) * x_{r,w,k,v,a,g}
  r = xr R,  k = xk K,  v = xv V
  w = exp(-e^{-0.5} sigmoid(w0 + tanh(xw w1) w2))        the per-channel decay, in (0, 1)
  a = sigmoid(a0 + (xa a1) a2)                             the in-context learning rate
  g = sigmoid(xg g1) g2                                    the output gate (LoRA)
  kk = normalize_per_head(k * k_k)                         the "removal key"
  k = k * (1 + (a - 1) * k_a)
  v = v + (v_first - v) * sigmoid(v0 + (xv v1) v2)         value residual to layer 0's v (l > 0)
  S_t = S_{t-1} (diag(w_t) - kk_t^T (kk_t a_t)) + v_t^T k_t,   y_t = S_t r_t
  out = ((GroupNorm_H(y) + sum_head(r * k * r_k) v) * g) O          GroupNorm eps 64e-5
channel mix (`ffn`): k = relu(xk K)^2 with xk = x + (x_prev - x) * x_k;  out = k V.
block: x = x + att(ln1(x)); x = x + ffn(ln2(x)); ln0 on the embeddings before block 0.

e^{-0.5} sigmoid(z) is RWKV-LM's exp(-softplus(-z) - 0.5) (the `rwkv` package writes the constant
as 0.606531). The WKV recurrence runs in `pallas_kernels.wkv7` (prefill) and `wkv7_step` (step)
with a = -kk, b = kk * a.

The recurrent state per layer is the two token-shift vectors (the last ln1 and ln2 outputs) and the
WKV state S [B, H, Dv, Dk]. `RWKV7LM.step` keeps, beside it, the state after each of its k tokens
so `rollback` restores any of them exactly (the SequenceModel contract).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.config import check_fields
from jaxinf.models.functional import FamilyLM, check_keep, check_prefill_lengths
from jaxinf.parallel.kernels import wkv7
from pallas_kernels import wkv7_step

_DECAY_SCALE = math.exp(-0.5)  # RWKV-LM: w = exp(-softplus(-z) - 0.5), i.e. e^{-0.5} sigmoid(z)


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
  """Static shape of an RWKV-7 model. LoRA ranks as in RWKV-LM's `RWKV_Tmix_x070`
  (`D_DECAY_LORA`, `D_AAA_LORA`, `D_MV_LORA`, `D_GATE_LORA`); `d_ffn` defaults to 4 d_model.

  `max_len` (None: unbounded, the recurrent state does not grow) caps prompt + generation if set.
  The kernel choice (`impl`) and the rollback window (`max_step`) are fields of `RWKV7LM`.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  head_size: int = 64
  d_ffn: int | None = None
  decay_lora: int = 64
  a_lora: int = 64
  v_lora: int = 32
  gate_lora: int = 128
  norm_eps: float = 1e-5
  ln_x_eps: float = 64e-5  # RWKV-LM: 1e-5 * head_size_divisor**2 with divisor 8
  max_len: int | None = None

  def __post_init__(self):
    check_fields(self, positive=("norm_eps", "ln_x_eps"))
    for name in ("vocab_size", "d_model", "n_layers", "head_size", "decay_lora", "a_lora",
                 "v_lora", "gate_lora"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.d_model % self.head_size:
      raise ValueError(f"d_model: {self.d_model} is not a multiple of head_size {self.head_size}")
    if self.d_ffn is not None and (not isinstance(self.d_ffn, int) or self.d_ffn < 1):
      raise ValueError(f"d_ffn: expected a positive int or None, got {self.d_ffn!r}")
    if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
      raise ValueError(f"max_len: expected a positive int or None, got {self.max_len!r}")

  @property
  def n_heads(self) -> int:
    return self.d_model // self.head_size

  @property
  def ffn_dim(self) -> int:
    return self.d_ffn if self.d_ffn is not None else 4 * self.d_model


# ~0.93M parameters on the byte vocabulary (ByteTokenizer: 259 ids); matched in size with
# `transnormer.TRANSNORMER_1M` (~0.97M) for the family comparison. LoRA ranks scaled down from
# RWKV-LM's (64/64/32/128 at C=768) roughly with C.
RWKV7_1M = RWKV7Config(vocab_size=259, d_model=128, n_layers=4, head_size=32, decay_lora=16,
                       a_lora=16, v_lora=8, gate_lora=32)

# Named sizes (`jaxinf.models.families` registers them): "-tiny" is the smoke-test size.
RWKV7_CONFIGS: dict[str, RWKV7Config] = {
    "rwkv7-1m": RWKV7_1M,
    "rwkv7-tiny": RWKV7Config(vocab_size=259, d_model=32, n_layers=2, head_size=16, decay_lora=4,
                              a_lora=4, v_lora=4, gate_lora=8),
}


# ------------------------------------------------------------------------------------------------
# Family-specific layers (fp32 statistics whatever the activation dtype).


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """torch.nn.functional.layer_norm over the last axis."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * weight + bias).astype(x.dtype)


def head_group_norm(y: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """RWKV's `ln_x`: GroupNorm with one group per head. y: [..., H, N]; weight, bias: [H * N]."""
  y32 = y.astype(jnp.float32)
  mean = y32.mean(-1, keepdims=True)
  var = jnp.square(y32 - mean).mean(-1, keepdims=True)
  out = (y32 - mean) * jax.lax.rsqrt(var + eps)
  return (out * weight.reshape(y.shape[-2:]) + bias.reshape(y.shape[-2:])).astype(y.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize(p=2): x / max(||x||, eps) over the last axis."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def token_shift(x: jax.Array, prev: jax.Array) -> jax.Array:
  """x_prev for every position: [prev, x_0, ..., x_{T-2}]. x: [B, T, C]; prev: [B, C]."""
  return jnp.concatenate([prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)


# ------------------------------------------------------------------------------------------------
# Modules.


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def _uniform(rngs: nnx.Rngs, shape, lo: float, hi: float) -> nnx.Param:
  return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, lo, hi))


class TimeMix(nnx.Module):
  """RWKV-7 time mix (`RWKV_Tmix_x070`). Matrices are stored [in, out] (RWKV-LM's Linear weights
  transposed); LoRA factors and mixes keep RWKV-LM's shapes with the (1, 1, C) ones squeezed."""

  def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
    c, h, n = cfg.d_model, cfg.n_heads, cfg.head_size
    self.layer_id = layer_id
    self.n_heads, self.head_size, self.ln_x_eps = h, n, cfg.ln_x_eps
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
      setattr(self, name, _uniform(rngs, (c,), 0.0, 1.0))
    std = c ** -0.5
    self.w0 = _uniform(rngs, (c,), -2.0, 1.0)
    self.w1 = _normal(rngs, (c, cfg.decay_lora), 0.1)
    self.w2 = _normal(rngs, (cfg.decay_lora, c), 0.1)
    self.a0 = _normal(rngs, (c,), 0.5)
    self.a1 = _normal(rngs, (c, cfg.a_lora), 0.1)
    self.a2 = _normal(rngs, (cfg.a_lora, c), 0.1)
    if layer_id > 0:  # layer 0's v is v_first itself: RWKV-LM's v0/v1/v2 there are unused
      self.v0 = _normal(rngs, (c,), 0.5)
      self.v1 = _normal(rngs, (c, cfg.v_lora), 0.1)
      self.v2 = _normal(rngs, (cfg.v_lora, c), 0.1)
    self.g1 = _normal(rngs, (c, cfg.gate_lora), 0.1)
    self.g2 = _normal(rngs, (cfg.gate_lora, c), 0.1)
    self.k_k = _uniform(rngs, (c,), 0.5, 1.5)
    self.k_a = _uniform(rngs, (c,), 0.5, 1.5)
    self.r_k = _normal(rngs, (h, n), 0.1)
    self.receptance = _normal(rngs, (c, c), std)
    self.key = _normal(rngs, (c, c), std)
    self.value = _normal(rngs, (c, c), std)
    self.output = _normal(rngs, (c, c), std)
    self.ln_x_w = nnx.Param(jnp.ones((c,), jnp.float32))
    self.ln_x_b = nnx.Param(jnp.zeros((c,), jnp.float32))

  def project(self, x, x_prev, v_first):
    """r, w, k, v, kk, a, g [B, T, H, N] (g [B, T, C]) and v_first from x, x_prev [B, T, C]."""
    split = lambda t: t.reshape(*t.shape[:-1], self.n_heads, self.head_size)
    xx = x_prev - x
    xr, xw, xk, xv, xa, xg = (x + xx * m[...] for m in
                              (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
    r = xr @ self.receptance[...]
    w = jnp.tanh(xw @ self.w1[...]) @ self.w2[...]
    k = xk @ self.key[...]
    v = xv @ self.value[...]
    a = jax.nn.sigmoid(self.a0[...] + (xa @ self.a1[...]) @ self.a2[...])
    g = jax.nn.sigmoid(xg @ self.g1[...]) @ self.g2[...]
    kk = l2_normalize(split(k * self.k_k[...]))
    k = k * (1 + (a - 1) * self.k_a[...])
    if self.layer_id == 0:
      v_first = v
    else:
      v = v + (v_first - v) * jax.nn.sigmoid(self.v0[...] + (xv @ self.v1[...]) @ self.v2[...])
    w = jnp.exp(-_DECAY_SCALE * jax.nn.sigmoid((self.w0[...] + w).astype(jnp.float32)))
    return split(r), split(w), split(k), split(v), kk, split(a), g, v_first

  def finish(self, y, r, k, v, g):
    """Output of the time mix from the WKV read-out y [B, T, H, N]."""
    y = head_group_norm(y, self.ln_x_w[...], self.ln_x_b[...], self.ln_x_eps)
    bonus = jnp.sum(r * k * self.r_k[...], axis=-1, keepdims=True) * v
    y = (y + bonus).reshape(*y.shape[:-2], -1)
    return (y * g) @ self.output[...]


class ChannelMix(nnx.Module):
  """RWKV-7 channel mix (`RWKV_CMix_x070`): relu(xk K)^2 V."""

  def __init__(self, cfg: RWKV7Config, *, rngs: nnx.Rngs):
    c, f = cfg.d_model, cfg.ffn_dim
    self.x_k = _uniform(rngs, (c,), 0.0, 1.0)
    self.key = _normal(rngs, (c, f), c ** -0.5)
    self.value = _normal(rngs, (f, c), f ** -0.5)

  def __call__(self, x, x_prev):
    k = x + (x_prev - x) * self.x_k[...]
    return jnp.square(jax.nn.relu(k @ self.key[...])) @ self.value[...]


class Block(nnx.Module):

  def __init__(self, cfg: RWKV7Config, layer_id: int, *, rngs: nnx.Rngs):
    c = cfg.d_model
    if layer_id == 0:
      self.ln0_w = nnx.Param(jnp.ones((c,), jnp.float32))
      self.ln0_b = nnx.Param(jnp.zeros((c,), jnp.float32))
    for name in ("ln1", "ln2"):
      setattr(self, name + "_w", nnx.Param(jnp.ones((c,), jnp.float32)))
      setattr(self, name + "_b", nnx.Param(jnp.zeros((c,), jnp.float32)))
    self.att = TimeMix(cfg, layer_id, rngs=rngs)
    self.ffn = ChannelMix(cfg, rngs=rngs)


class RWKV7(nnx.Module):
  """The RWKV-7 language model: emb -> ln0 -> blocks -> ln_out -> head.

  `__call__(tokens, state, valid=None, keep_history=False, impl=..., interpret=...)` runs T tokens
  from `state` (the dict of `RWKV7LM.init_cache`'s "state"): the parallel form (`wkv7` with kernel
  implementation `impl`) by default, or token by token (`wkv7_step`) with `keep_history`, which
  also returns the state after every token.
  """

  def __init__(self, cfg: RWKV7Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c = cfg.d_model
    self.emb = _normal(rngs, (cfg.vocab_size, c), 1.0)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.ln_out_w = nnx.Param(jnp.ones((c,), jnp.float32))
    self.ln_out_b = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.head = _normal(rngs, (c, cfg.vocab_size), c ** -0.5)

  def __call__(self, tokens, state, valid=None, keep_history: bool = False, *,
               impl: str = "auto", interpret: bool = False):
    cfg = self.cfg
    eps = cfg.norm_eps
    x = self.emb[...][tokens]
    b0 = self.blocks[0]
    x = layer_norm(x, b0.ln0_w[...], b0.ln0_b[...], eps)
    v_first = None
    new = {"att_shift": [], "ffn_shift": [], "wkv": []}
    for i, blk in enumerate(self.blocks):
      h = layer_norm(x, blk.ln1_w[...], blk.ln1_b[...], eps)
      r, w, k, v, kk, a, g, v_first = blk.att.project(h, token_shift(h, state["att_shift"][i]),
                                                      v_first)
      aa, bb = -kk, kk * a
      if valid is not None:
        # Padded positions leave S unchanged: S (diag(1) + 0) + v^T 0 = S.
        m = valid[:, :, None, None]
        w = jnp.where(m, w, 1.0)
        k_in = jnp.where(m, k, 0.0)
        bb = jnp.where(m, bb, 0.0)
      else:
        k_in = k
      if keep_history:
        y, wkv_hist = _wkv_token_by_token(r, w, k_in, v, aa, bb, state["wkv"][i])
        new["wkv"].append(wkv_hist)
      else:
        y, s = wkv7(r, w, k_in, v, aa, bb, initial_state=state["wkv"][i], return_final_state=True,
                    impl=impl, interpret=interpret)
        new["wkv"].append(s)
      x = x + blk.att.finish(y, r, k, v, g)
      h2 = layer_norm(x, blk.ln2_w[...], blk.ln2_b[...], eps)
      x = x + blk.ffn(h2, token_shift(h2, state["ffn_shift"][i]))
      new["att_shift"].append(h)
      new["ffn_shift"].append(h2)
    logits = layer_norm(x, self.ln_out_w[...], self.ln_out_b[...], eps) @ self.head[...]
    # att_shift / ffn_shift: [L, B, T, C] (every position's ln output); wkv: [L, B, H, N, N], or
    # [L, T, B, H, N, N] with keep_history.
    return logits, {name: jnp.stack(vals) for name, vals in new.items()}


def _wkv_token_by_token(r, w, k, v, a, b, state):
  """wkv7_step over the T positions: (y [B, T, H, N], the state after each token
  [T, B, H, N, N])."""
  def body(s, xs):
    y, s = wkv7_step(*xs, s)
    return s, (y, s)

  time_major = lambda t: jnp.swapaxes(t, 0, 1)
  _, (ys, states) = jax.lax.scan(body, state.astype(jnp.float32),
                                 tuple(time_major(t) for t in (r, w, k, v, a, b)))
  return time_major(ys), states


# ------------------------------------------------------------------------------------------------
# The SequenceModel.


def gather_rows(hist: jax.Array, index: jax.Array) -> jax.Array:
  """hist [L, S, B, ...] -> [L, B, ...] taking position index[b] for row b."""
  return hist[:, index, jnp.arange(hist.shape[2])]


@dataclasses.dataclass(frozen=True)
class RWKV7LM(FamilyLM):
  """RWKV-7 behind the SequenceModel contract (`jaxinf.models.functional.FamilyLM`).

  Cache: {"length" [B], "state": {"att_shift", "ffn_shift" [L, B, C], "wkv" [L, B, H, N, N]},
  "history": the same with a position axis of size max_step + 1 after L (index j: the state after
  j tokens of the last step), "last_k" [B]}. `max_step` is the most tokens one `step` may append.
  """

  max_step: int = 8

  config_type: ClassVar[type] = RWKV7Config
  module_type: ClassVar[type] = RWKV7
  rollback_keys: ClassVar[tuple[str, ...]] = ("history", "last_k")

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    cfg = self.config
    self.check_cache_request(batch, max_len)
    l, c, h, n = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_size
    state = {"att_shift": jnp.zeros((l, batch, c), jnp.float32),
             "ffn_shift": jnp.zeros((l, batch, c), jnp.float32),
             "wkv": jnp.zeros((l, batch, h, n, n), jnp.float32)}
    history = {k: jnp.zeros((v.shape[0], self.max_step + 1) + v.shape[1:], v.dtype)
               for k, v in state.items()}
    return self.constrain_cache({"length": jnp.zeros((batch,), jnp.int32), "state": state,
                                 "history": history, "last_k": jnp.zeros((batch,), jnp.int32)})

  def prefill(self, params, tokens, cache, lengths):
    """Parallel form over right-padded tokens [B, T]; positions >= lengths[b] leave row b's state
    untouched (w = 1, k = 0, b = 0 in the WKV; the shift states are read at lengths[b] - 1)."""
    self.check_params(params)
    self.check_tokens(tokens, cache)
    check_prefill_lengths(lengths, *tokens.shape)
    lengths = jnp.asarray(lengths, jnp.int32)
    t = tokens.shape[1]
    valid = jnp.arange(t)[None] < lengths[:, None]
    state = cache["state"]
    logits, new = self.module(params)(tokens, state, valid, impl=self.impl,
                                      interpret=self.interpret)
    last = jnp.maximum(lengths - 1, 0)
    out = {"wkv": new["wkv"]}
    for name in ("att_shift", "ffn_shift"):
      at_len = new[name][:, jnp.arange(tokens.shape[0]), last]           # [L, B, C]
      out[name] = jnp.where((lengths > 0)[None, :, None], at_len.astype(jnp.float32), state[name])
    return logits, dict(cache, state=out, length=cache["length"] + lengths)

  def step(self, params, tokens, cache):
    """Recurrent form over k tokens [B, k] (k <= max_step); keeps the per-token states."""
    self.check_params(params)
    self.check_tokens(tokens, cache, step=True)
    k = tokens.shape[1]
    state = cache["state"]
    logits, new = self.module(params)(tokens, state, keep_history=True)
    seq = {"att_shift": jnp.swapaxes(new["att_shift"], 1, 2).astype(jnp.float32),  # [L, k, B, C]
           "ffn_shift": jnp.swapaxes(new["ffn_shift"], 1, 2).astype(jnp.float32),
           "wkv": new["wkv"]}                                                      # [L, k, B, ...]
    history = {name: cache["history"][name].at[:, 0].set(state[name]).at[:, 1:k + 1].set(seq[name])
               for name in state}
    out = {name: seq[name][:, -1] for name in state}
    return logits, dict(cache, state=out, history=history, length=cache["length"] + k,
                        last_k=jnp.full_like(cache["last_k"], k))

  def cache_batch_axes(self, cache):
    """States are [L, B, ...]; their per-position history [L, max_step + 1, B, ...]."""
    return {"length": 0, "last_k": 0, "state": {k: 1 for k in cache["state"]},
            "history": {k: 2 for k in cache["history"]}}

  def rollback(self, cache, keep):
    """Undoes the last step but its first keep[b] tokens: the state after them, exactly. last_k
    becomes keep, so a later rollback may undo further, back to the state before the step."""
    check_keep(keep, cache)
    keep = jnp.asarray(keep, jnp.int32)
    state = {name: gather_rows(hist, keep) for name, hist in cache["history"].items()}
    return dict(cache, state=state, length=cache["length"] - cache["last_k"] + keep,
                last_k=keep)
