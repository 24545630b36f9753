"""Medusa heads: K extra decoding heads on a frozen target's last hidden state.

Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads", §2.1.1, eq. 1): head k (k = 1..K) reads the target's last hidden state h_t at
position t (after the final norm, the state the LM head reads) and predicts the token k + 1
positions after the next one, x_{t+k+1}, with one residual feed-forward block and a vocabulary
projection:

    p_t^(k) = softmax(W_2^(k) · (SiLU(W_1^(k) · h_t + b_1^(k)) + h_t))

W_1 is initialised to zero and W_2 to the target's LM head, so an untrained head starts out as the
target's own next-token prediction (the paper's initialisation, §2.1.1). `num_layers > 1` stacks
more residual blocks per head, as Medusa's `medusa_num_layers` option.

The K heads are one NNX module with stacked weights (`[K, ...]`), crossed into a pure function
`heads(head_params, hidden [..., C]) -> logits [..., K, V]` like every model here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.config import check_fields
from jaxinf.models.functional import to_functional


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  """K heads over hidden states of width `hidden_size` and a vocabulary of `vocab_size`."""

  num_heads: int = 4
  hidden_size: int = 64
  vocab_size: int = 259
  num_layers: int = 1   # residual SiLU blocks per head (the paper uses 1)
  init_std: float = 0.02  # for W_2 when no LM head is given to copy

  def __post_init__(self):
    check_fields(self, positive=("init_std",))
    for name in ("num_heads", "hidden_size", "vocab_size", "num_layers"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not self.init_std > 0:
      raise ValueError(f"init_std: expected a positive number, got {self.init_std!r}")


class MedusaHeadsModule(nnx.Module):
  """The K heads with stacked weights: w_res `[K, layers, C, C]`, b_res `[K, layers, C]`,
  w_out `[K, C, V]`."""

  def __init__(self, cfg: MedusaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    k, n, c, v = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    self.w_res = nnx.Param(jnp.zeros((k, n, c, c), jnp.float32))
    self.b_res = nnx.Param(jnp.zeros((k, n, c), jnp.float32))
    self.w_out = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (k, c, v), jnp.float32))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden `[..., C]` -> logits `[..., K, V]` fp32 (eq. 1 for every head at once)."""
    if hidden.shape[-1] != self.cfg.hidden_size:
      raise ValueError(f"hidden: expected last axis {self.cfg.hidden_size}, got {hidden.shape}")
    h = jnp.broadcast_to(hidden.astype(jnp.float32)[..., None, :],
                         (*hidden.shape[:-1], self.cfg.num_heads, self.cfg.hidden_size))
    for layer in range(self.cfg.num_layers):
      r = jnp.einsum("...kc,kcd->...kd", h, self.w_res[...][:, layer]) + self.b_res[...][:, layer]
      h = h + jax.nn.silu(r)
    return jnp.einsum("...kc,kcv->...kv", h, self.w_out[...])


@functools.cache
def _functional(cfg: MedusaConfig) -> Callable[..., Any]:
  abstract = nnx.eval_shape(lambda: MedusaHeadsModule(cfg, rngs=nnx.Rngs(0)))
  return to_functional(abstract)[0]


@dataclasses.dataclass(frozen=True)
class MedusaHeads:
  """The heads as a static, hashable object (a jit static argument, like `TransformerLM`):
  `heads(head_params, hidden [..., C]) -> logits [..., K, V]`."""

  config: MedusaConfig

  def __post_init__(self):
    if not isinstance(self.config, MedusaConfig):
      raise TypeError(f"config: expected a MedusaConfig, got {type(self.config).__name__}")

  @property
  def num_heads(self) -> int:
    return self.config.num_heads

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def init_params(self, seed: int = 0, lm_head: jax.Array | None = None) -> dict:
    """Zero residual blocks; W_2 a copy of `lm_head` `[C, V]` for every head (the paper's
    initialisation) or normal(0, init_std) without one."""
    params = nnx.to_pure_dict(nnx.state(MedusaHeadsModule(self.config, rngs=nnx.Rngs(seed))))
    if lm_head is not None:
      c, v = self.config.hidden_size, self.config.vocab_size
      if tuple(lm_head.shape) != (c, v):
        raise ValueError(f"lm_head: expected shape [{c}, {v}], got {tuple(lm_head.shape)}")
      params["w_out"] = jnp.broadcast_to(jnp.asarray(lm_head, jnp.float32),
                                         (self.config.num_heads, c, v)).copy()
    return params

  def abstract_params(self) -> dict:
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: MedusaHeadsModule(self.config, rngs=nnx.Rngs(0)))))

  def check_params(self, head_params, name: str = "head_params") -> None:
    """The parameter tree has the structure and shapes of this config's heads."""
    expected = self.abstract_params()
    try:
      shapes = jax.tree.map(lambda x: tuple(x.shape), head_params)
    except (AttributeError, TypeError) as e:
      raise TypeError(f"{name}: expected a dict of arrays like init_params()") from e
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    if shapes != want:
      raise ValueError(f"{name}: shapes {shapes} do not match the heads' {want}")

  def __call__(self, head_params: dict, hidden: jax.Array) -> jax.Array:
    return _functional(self.config)(head_params, hidden)


def lm_head_matrix(model, params: dict) -> jax.Array:
  """The target transformer's output projection `[C, V]` (the embedding's transpose if tied)."""
  if model.config.tie_embeddings:
    return jnp.asarray(params["embed_tokens"]["embedding"]).T
  return jnp.asarray(params["lm_head"]["kernel"])


def medusa_heads(model, params: dict | None = None, *, num_heads: int = 4, num_layers: int = 1,
                 seed: int = 0) -> tuple[MedusaHeads, dict]:
  """K heads sized for the target transformer `model`, W_2 initialised from its LM head (random
  if `params` is None). Returns (heads, head_params)."""
  if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
    raise TypeError(f"model: expected a TransformerLM, got {type(model).__name__}")
  heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=model.config.hidden_size,
                                   vocab_size=model.vocab_size, num_layers=num_layers))
  lm_head = None if params is None else lm_head_matrix(model, params)
  return heads, heads.init_params(seed, lm_head)
