"""TransNormerLLM (Qin et al. 2023, "TransNormerLLM: A Faster and Better Large Language Model with
Improved TransNormer"; Lightning Attention-2, Qin et al. 2024), as in its authors' released model
code (OpenNLPLab, `modeling_transnormer.py` shipped with the TransNormerLLM-385M/1B/7B weights):

  x = embed_scale * E[tokens]                      embed_scale = sqrt(d) unless no_scale_embedding
  per layer l:  x = x + TokenMixer(SRMSNorm(x));   x = x + SGLU(SRMSNorm(x))
  logits = SRMSNorm(x) lm_head

SRMSNorm(x) = x rsqrt(mean(x^2) + eps), no weight (`SimpleRMSNorm`, eps 1e-6).
TokenMixer (`NormLinearAttention`): q, k, v, u = chunk4(x W_qkvu); q, k = SiLU(q), SiLU(k) (v and u
  stay linear); optional LRPE (per layer, `linear_use_lrpe_list`):
  q -> [q cos(theta t), q sin(theta t)], the same for k, with a learned theta [H, D];
  o_t = sum_{s<=t} lambda_h^{t-s} (q_t . k_s) v_s with no 1/sqrt(d) scale and no normaliser;
  out = (SRMSNorm(o) * u) W_out.
Decay: ALiBi's slopes m_h (`_build_slope_tensor`: 2^(-8(h+1)/H) for a power-of-two H, the ALiBi
  interleave otherwise), scaled per layer by (1 - l/(L-1) + 1e-5), and lambda_h = exp(-m_h).
SGLU (`GLU`): l3(l1(x) * l2(x)), no activation.

The parallel form is `pallas_kernels.lightning_attention`, the step `lightning_attention_step`. The
decay is one number per head, so padding cannot be made a no-op inside the recurrence (the state
would still decay over the padded positions); prefill therefore takes each row's state at its own
length in closed form, S_{L-1} = lambda^L S_0 + sum_{s<L} lambda^{L-1-s} k_s^T v_s, while the
outputs (causal, so unaffected by later padding) come from the kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.config import check_fields
from jaxinf.models.functional import FamilyLM, check_keep, check_prefill_lengths
from jaxinf.parallel.kernels import lightning_attention  # shard_map on a mesh
# The contract's argument checks and row gather are shared with the other recurrent family.
from pallas_kernels import lightning_attention_step

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TransNormerConfig:
  """Static shape of a TransNormerLLM. Names of the release's `TransnormerConfig`:
  d_model = decoder_embed_dim, n_layers = decoder_layers, n_heads = decoder_attention_heads,
  hidden_dim (the token mixer's width, default d_model), glu_dim (default d_model, as the release's
  glu_dim=-1), lrpe = linear_use_lrpe_list (one flag per layer; () means none), scale_embedding =
  not no_scale_embedding. `max_len` as in `RWKV7Config`; the kernel choice (`impl`) and the
  rollback window (`max_step`) are fields of `TransNormerLM`.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  hidden_dim: int | None = None
  glu_dim: int | None = None
  lrpe: tuple[bool, ...] = ()
  scale_embedding: bool = False
  norm_eps: float = 1e-6
  max_len: int | None = None

  def __post_init__(self):
    check_fields(self, positive=("norm_eps",))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if self.n_layers < 2:
      # the release divides by L - 1 in the per-layer decay scale
      raise ValueError(f"n_layers: the decay scale 1 - l/(L-1) needs L >= 2, got {self.n_layers}")
    if self.hidden % self.n_heads:
      raise ValueError(f"hidden_dim: {self.hidden} is not a multiple of n_heads {self.n_heads}")
    if not isinstance(self.lrpe, tuple) or (self.lrpe and len(self.lrpe) != self.n_layers):
      raise ValueError(f"lrpe: expected a tuple of {self.n_layers} bools or (), got {self.lrpe!r}")
    if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
      raise ValueError(f"max_len: expected a positive int or None, got {self.max_len!r}")

  @property
  def hidden(self) -> int:
    return self.hidden_dim if self.hidden_dim is not None else self.d_model

  @property
  def glu(self) -> int:
    return self.glu_dim if self.glu_dim is not None else self.d_model

  @property
  def head_dim(self) -> int:
    return self.hidden // self.n_heads

  def use_lrpe(self, layer: int) -> bool:
    return bool(self.lrpe[layer]) if self.lrpe else False


# ~0.97M parameters on the byte vocabulary (ByteTokenizer: 259 ids); matched in size with
# `rwkv.RWKV7_1M` (~0.93M). LRPE in the first layer only, as the release's configs.
TRANSNORMER_1M = TransNormerConfig(vocab_size=259, d_model=128, n_layers=5, n_heads=4, glu_dim=256,
                                   lrpe=(True, False, False, False, False))

# Named sizes (`jaxinf.models.families` registers them): "-tiny" is the smoke-test size.
TRANSNORMER_CONFIGS: dict[str, TransNormerConfig] = {
    "transnormer-1m": TRANSNORMER_1M,
    "transnormer-tiny": TransNormerConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2,
                                          glu_dim=64, lrpe=(True, False)),
}


# ------------------------------------------------------------------------------------------------
# Family-specific pieces.


def alibi_slopes(n_heads: int) -> np.ndarray:
  """ALiBi's head slopes (Press et al. 2022), as the release's `_build_slope_tensor`: for H a power
  of two, 2^(-8/H) ... 2^(-8); otherwise the nearest lower power's slopes followed by every other
  slope of twice that many heads."""
  def power_of_2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  def slopes(n):
    if math.log2(n).is_integer():
      return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + slopes(2 * closest)[0::2][:n - closest]

  return np.asarray(slopes(n_heads), np.float64)


def layer_slopes(n_heads: int, layer: int, n_layers: int) -> np.ndarray:
  """TransNormerLLM's per-layer slope m_h (1 - l/(L-1) + 1e-5): the first layer decays fastest."""
  return alibi_slopes(n_heads) * (1 - layer / (n_layers - 1) + 1e-5)


def layer_decay(n_heads: int, layer: int, n_layers: int) -> np.ndarray:
  """lambda_h = exp(-m_h), fp32 [H]: the `decay` of `lightning_attention`."""
  return np.exp(-layer_slopes(n_heads, layer, n_layers)).astype(np.float32)


def srms_norm(x: jax.Array, eps: float) -> jax.Array:
  """SimpleRMSNorm: x rsqrt(mean(x^2) + eps), statistics in fp32, no weight."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)).astype(x.dtype)


def lrpe(x: jax.Array, theta: jax.Array, positions: jax.Array) -> jax.Array:
  """Linearized relative positional encoding (Qin et al. 2023, TMLR; the release's `Lrpe`):
  [x cos(theta t), x sin(theta t)], so q_t . k_s = sum_i q_i k_i cos(theta_i (t - s)).
  x: [B, T, H, D]; theta: [H, D]; positions: [B, T] absolute positions. Returns [B, T, H, 2D]."""
  angle = positions[:, :, None, None].astype(jnp.float32) * theta[None, None]
  return jnp.concatenate([x * jnp.cos(angle), x * jnp.sin(angle)], axis=-1).astype(x.dtype)


def lightning_prefill(q, k, v, decay, state, lengths, impl: str = "auto",
                      interpret: bool = False):
  """Causal decayed linear attention over right-padded rows, and each row's state at its length.

  q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; decay: [H]; state: [B, H, Dk, Dv] (the state before the
  first token); lengths: [B]. Returns (o [B, T, H, Dv], state [B, H, Dk, Dv] fp32) where the state
  is S_{L_b - 1} of row b alone (see the module docstring for why it is not the kernel's)."""
  o = lightning_attention(q, k, v, decay, initial_state=state, impl=impl, interpret=interpret)
  t = q.shape[1]
  log_decay = jnp.log(jnp.asarray(decay, jnp.float32))                       # [H]
  age = lengths[:, None] - 1 - jnp.arange(t)[None]                           # [B, T]: L-1-s
  weight = jnp.where((age >= 0)[..., None], jnp.exp(jnp.maximum(age, 0)[..., None] * log_decay),
                     0.0)                                                    # [B, T, H]
  kv = jnp.einsum("bth,bthk,bthv->bhkv", weight, k.astype(jnp.float32), v.astype(jnp.float32),
                  precision=_HIGHEST)
  carried = jnp.exp(lengths[:, None].astype(jnp.float32) * log_decay)       # lambda^L [B, H]
  return o, carried[..., None, None] * state.astype(jnp.float32) + kv


def lightning_steps(q, k, v, decay, state):
  """`lightning_attention_step` over T positions: (o [B, T, H, Dv], the state after each token
  [T, B, H, Dk, Dv])."""
  def body(s, xs):
    o, s = lightning_attention_step(*xs, decay, s)
    return s, (o, s)

  time_major = lambda x: jnp.swapaxes(x, 0, 1)
  _, (o, states) = jax.lax.scan(body, state.astype(jnp.float32),
                                tuple(time_major(x) for x in (q, k, v)))
  return time_major(o), states


# ------------------------------------------------------------------------------------------------
# Modules (kernels stored [in, out], the release's Linear weights transposed).


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class TokenMixer(nnx.Module):
  """`NormLinearAttention`: q, k, v, u from one projection; SiLU on q, k; lightning attention with
  this layer's decay; SRMSNorm; times u; out projection."""

  def __init__(self, cfg: TransNormerConfig, layer: int, *, rngs: nnx.Rngs):
    d, hid, h = cfg.d_model, cfg.hidden, cfg.n_heads
    self.n_heads, self.eps = h, cfg.norm_eps
    self.decay = tuple(float(x) for x in layer_decay(h, layer, cfg.n_layers))  # static
    self.qkvu_proj = _normal(rngs, (d, 4 * hid), d ** -0.5)
    self.out_proj = _normal(rngs, (hid, d), hid ** -0.5)
    self.use_lrpe = cfg.use_lrpe(layer)
    if self.use_lrpe:
      # the release's initial theta: 10000^(-2 i / (H D)) over all H*D channels, learned after
      self.theta = nnx.Param(jnp.asarray(
          10000.0 ** (-2.0 / hid * np.arange(hid)), jnp.float32).reshape(h, cfg.head_dim))

  def qkvu(self, x, positions):
    q, k, v, u = jnp.split(x @ self.qkvu_proj[...], 4, axis=-1)
    heads = lambda t: t.reshape(*t.shape[:-1], self.n_heads, -1)
    q, k, v = jax.nn.silu(heads(q)), jax.nn.silu(heads(k)), heads(v)
    if self.use_lrpe:
      q, k = lrpe(q, self.theta[...], positions), lrpe(k, self.theta[...], positions)
    return q, k, v, u

  def finish(self, o, u):
    o = srms_norm(o.reshape(*o.shape[:-2], -1), self.eps)
    return (o * u) @ self.out_proj[...]


class SGLU(nnx.Module):
  """The release's `GLU`: l3(l1(x) * l2(x)), no activation."""

  def __init__(self, cfg: TransNormerConfig, *, rngs: nnx.Rngs):
    d, g = cfg.d_model, cfg.glu
    self.l1 = _normal(rngs, (d, g), d ** -0.5)
    self.l2 = _normal(rngs, (d, g), d ** -0.5)
    self.l3 = _normal(rngs, (g, d), g ** -0.5)

  def __call__(self, x):
    return ((x @ self.l1[...]) * (x @ self.l2[...])) @ self.l3[...]


class Layer(nnx.Module):

  def __init__(self, cfg: TransNormerConfig, layer: int, *, rngs: nnx.Rngs):
    self.token_mixer = TokenMixer(cfg, layer, rngs=rngs)
    self.channel_mixer = SGLU(cfg, rngs=rngs)


class TransNormerLLM(nnx.Module):
  """`__call__(tokens, positions, kv, lengths=None, keep_history=False, impl=..., interpret=...)`:
  logits [B, T, V] and the list of per-layer lightning states — [B, H, Dk, Dv] at each row's
  length (parallel form, `lightning_attention` with kernel implementation `impl`), or
  [T, B, H, Dk, Dv] after every token (`keep_history`, token by token)."""

  def __init__(self, cfg: TransNormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = _normal(rngs, (cfg.vocab_size, cfg.d_model),
                                cfg.d_model ** -0.5 if cfg.scale_embedding else 1.0)
    self.layers = nnx.List([Layer(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.lm_head = _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5)

  def __call__(self, tokens, positions, kv, lengths=None, keep_history: bool = False, *,
               impl: str = "auto", interpret: bool = False):
    cfg = self.cfg
    x = self.embed_tokens[...][tokens]
    if cfg.scale_embedding:
      x = x * math.sqrt(cfg.d_model)
    states = []
    for i, layer in enumerate(self.layers):
      mixer = layer.token_mixer
      q, k, v, u = mixer.qkvu(srms_norm(x, cfg.norm_eps), positions)
      decay = jnp.asarray(mixer.decay, jnp.float32)
      if keep_history:
        o, s = lightning_steps(q, k, v, decay, kv[i])
      else:
        o, s = lightning_prefill(q, k, v, decay, kv[i], lengths, impl=impl, interpret=interpret)
      states.append(s)
      x = x + mixer.finish(o, u)
      x = x + layer.channel_mixer(srms_norm(x, cfg.norm_eps))
    return srms_norm(x, cfg.norm_eps) @ self.lm_head[...], states


# ------------------------------------------------------------------------------------------------
# The SequenceModel.


@dataclasses.dataclass(frozen=True)
class TransNormerLM(FamilyLM):
  """TransNormerLLM behind the SequenceModel contract (`jaxinf.models.functional.FamilyLM`).

  Cache: {"length" [B], "state": {"kv": per layer [B, H, Dk, Dv]}, "history": {"kv": per layer
  [max_step + 1, B, H, Dk, Dv]} (index j: the state after j tokens of the last step), "last_k" [B]}.
  Dk is 2 D in layers with LRPE (the release uses it in some layers only, hence a list, not one
  stacked array). The LRPE position of a token is its row's length before it.
  """
  max_step: int = 8

  config_type: ClassVar[type] = TransNormerConfig
  module_type: ClassVar[type] = TransNormerLLM
  rollback_keys: ClassVar[tuple[str, ...]] = ("history", "last_k")

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    cfg = self.config
    self.check_cache_request(batch, max_len)
    d = cfg.head_dim
    kv = [jnp.zeros((batch, cfg.n_heads, 2 * d if cfg.use_lrpe(i) else d, d), jnp.float32)
          for i in range(cfg.n_layers)]
    return self.constrain_cache({
        "length": jnp.zeros((batch,), jnp.int32), "state": {"kv": kv},
        "history": {"kv": [jnp.zeros((self.max_step + 1,) + s.shape, jnp.float32) for s in kv]},
        "last_k": jnp.zeros((batch,), jnp.int32)})

  def _positions(self, cache, t):
    return cache["length"][:, None] + jnp.arange(t)[None]

  def prefill(self, params, tokens, cache, lengths):
    """Parallel form over right-padded tokens [B, T]; row b's state is taken at lengths[b]."""
    self.check_params(params)
    self.check_tokens(tokens, cache)
    check_prefill_lengths(lengths, *tokens.shape)
    lengths = jnp.asarray(lengths, jnp.int32)
    logits, kv = self.module(params)(tokens, self._positions(cache, tokens.shape[1]),
                                     cache["state"]["kv"], lengths, impl=self.impl,
                                     interpret=self.interpret)
    return logits, dict(cache, state={"kv": kv}, length=cache["length"] + lengths)

  def step(self, params, tokens, cache):
    """Recurrent form over k tokens [B, k] (k <= max_step); keeps the per-token states."""
    self.check_params(params)
    self.check_tokens(tokens, cache, step=True)
    k = tokens.shape[1]
    prev = cache["state"]["kv"]
    logits, hist = self.module(params)(tokens, self._positions(cache, k), prev,
                                       keep_history=True)
    history = [old.at[0].set(p).at[1:k + 1].set(h)
               for old, p, h in zip(cache["history"]["kv"], prev, hist)]
    return logits, dict(cache, state={"kv": [h[-1] for h in hist]}, history={"kv": history},
                        length=cache["length"] + k, last_k=jnp.full_like(cache["last_k"], k))

  def cache_batch_axes(self, cache):
    """Per-layer states are [B, H, Dk, Dv]; their history [max_step + 1, B, H, Dk, Dv]."""
    return {"length": 0, "last_k": 0, "state": {"kv": [0] * len(cache["state"]["kv"])},
            "history": {"kv": [1] * len(cache["history"]["kv"])}}

  def rollback(self, cache, keep):
    """Undoes the last step but its first keep[b] tokens: the state after them, exactly. last_k
    becomes keep, so a later rollback may undo further, back to the state before the step."""
    check_keep(keep, cache)
    b = cache["length"].shape[0]
    keep = jnp.asarray(keep, jnp.int32)
    rows = jnp.arange(b)
    return dict(cache, state={"kv": [h[keep, rows] for h in cache["history"]["kv"]]},
                length=cache["length"] - cache["last_k"] + keep,
                last_k=keep)
