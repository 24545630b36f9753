"""Tiny random models of the four families over one small vocabulary, for decoding tests that need
real SequenceModels of every kind as draft or target (built once per process)."""

from __future__ import annotations

import functools

import jax

from jaxinf.models.mamba import MambaConfig, MambaLM
from jaxinf.models.rwkv import RWKV7Config, rwkv7_model
from jaxinf.models.transformer import TransformerConfig, TransformerLM
from jaxinf.models.transnormer import TransNormerConfig, transnormer_model

FAMILIES = ("transformer", "rwkv7", "mamba", "transnormer")


@functools.cache
def tiny_model(family: str, vocab_size: int = 16, seed: int = 0, max_step: int = 8):
  """(model, params) of `family` with random weights at decisive scales."""
  key = jax.random.key(seed)
  if family == "transformer":
    model = TransformerLM(TransformerConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2,
                                            num_heads=4, num_kv_heads=2, mlp_hidden=64,
                                            max_len=128, init_std=0.3))
    return model, model.init_params(seed)
  if family == "mamba":
    model = MambaLM(MambaConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2,
                                state_size=8, init_std=0.5), max_step=max_step)
    return model, model.init_params(seed)
  if family == "rwkv7":
    return rwkv7_model(RWKV7Config(vocab_size=vocab_size, d_model=32, n_layers=2, head_size=16,
                                   d_ffn=48, decay_lora=8, a_lora=8, v_lora=4, gate_lora=8,
                                   max_step=max_step, impl="xla"), key)
  if family == "transnormer":
    return transnormer_model(TransNormerConfig(vocab_size=vocab_size, d_model=32, n_layers=2,
                                               n_heads=4, glu_dim=48, lrpe=(True, False),
                                               scale_embedding=True, max_step=max_step,
                                               impl="xla"), key)
  raise ValueError(f"family: unknown {family!r}")
