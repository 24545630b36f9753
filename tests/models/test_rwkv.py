"""RWKV-7: converter round trip and config errors. The contract checks (`wkv7_step` token by token
against the parallel `wkv7` prefill, exact rollback, ragged batches, `generate`, bad input) run
for every family in tests/models/test_families.py. Parity with the `rwkv` package is in
tests/parity/test_rwkv_vs_rwkv_package.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinf.checkpoints.rwkv import _expected_map, rwkv7_params_from_state_dict
from jaxinf.models import families
from jaxinf.models.rwkv import RWKV7Config
from sequence_contract import RWKV7_CFG as CFG


@pytest.fixture(scope="module")
def lm():
  model, params = families.build(CFG, max_step=4, impl="xla")
  return model, params, jax.jit(model.prefill), jax.jit(model.step), jax.jit(model.rollback)


def test_converter_round_trip_and_strict_keys(lm):
  model, params, prefill, _, _ = lm
  flat = {}
  for src, (dst, transpose) in _expected_map(CFG).items():
    arr = params
    for part in dst.split("/"):
      arr = arr[int(part) if part.isdigit() else part]
    arr = np.asarray(arr)
    flat[src] = arr.T if transpose else (arr[None, None] if src.split(".")[-1] in (
        "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a") else arr)
  flat["blocks.0.att.v0"] = np.zeros((1, 1, CFG.d_model), np.float32)  # unused in layer 0: dropped
  back = rwkv7_params_from_state_dict(flat, CFG)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  with pytest.raises(ValueError, match=r"missing keys \['head.weight'\]"):
    rwkv7_params_from_state_dict({k: v for k, v in flat.items() if k != "head.weight"}, CFG)
  with pytest.raises(ValueError, match=r"unexpected keys \['blocks.5.att.x_r'\]"):
    rwkv7_params_from_state_dict(dict(flat, **{"blocks.5.att.x_r": flat["blocks.0.att.x_r"]}),
                                 CFG)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="head_size"):
    RWKV7Config(vocab_size=10, d_model=30, n_layers=1, head_size=16)
  with pytest.raises(ValueError, match="decay_lora: expected a positive int"):
    RWKV7Config(vocab_size=10, d_model=32, n_layers=1, head_size=16, decay_lora=0)
