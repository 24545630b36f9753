"""Tiny random models of every registered family over one small vocabulary, for decoding tests that
need real SequenceModels of every kind as draft or target (built once per process, through the
family registry)."""

from __future__ import annotations

import functools

from jaxinf.models import families
from jaxinf.models.mamba import MambaConfig
from jaxinf.models.rwkv import RWKV7Config
from jaxinf.models.transformer import TransformerConfig
from jaxinf.models.transnormer import TransNormerConfig

FAMILIES = ("transformer", "rwkv7", "mamba", "transnormer")


@functools.cache
def tiny_model(family: str, vocab_size: int = 16, seed: int = 0, max_step: int = 8):
  """(model, params) of `family` with random weights at decisive scales."""
  configs = {
      "transformer": (TransformerConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2,
                                        num_heads=4, num_kv_heads=2, mlp_hidden=64, max_len=128,
                                        init_std=0.3), {}),
      "mamba": (MambaConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, state_size=8,
                            init_std=0.5), {"max_step": max_step}),
      "rwkv7": (RWKV7Config(vocab_size=vocab_size, d_model=32, n_layers=2, head_size=16, d_ffn=48,
                            decay_lora=8, a_lora=8, v_lora=4, gate_lora=8),
                {"max_step": max_step, "impl": "xla"}),
      "transnormer": (TransNormerConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4,
                                        glu_dim=48, lrpe=(True, False), scale_embedding=True),
                      {"max_step": max_step, "impl": "xla"}),
  }
  if family not in configs:
    raise ValueError(f"family: unknown {family!r}")
  config, options = configs[family]
  return families.build(config, seed=seed, **options)
