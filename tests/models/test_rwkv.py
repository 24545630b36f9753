"""RWKV-7: converter round trip and bad input. The contract checks (`wkv7_step` token by token
against the parallel `wkv7` prefill, exact rollback, ragged batches, `generate`) are shared with
TransNormerLLM in tests/models/test_recurrent_contract.py. Parity with the `rwkv` package is in
tests/parity/test_rwkv_vs_rwkv_package.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf.checkpoints.rwkv import _expected_map, rwkv7_params_from_state_dict
from jaxinf.decoding.generate import generate
from jaxinf.models.rwkv import RWKV7Config, rwkv7_model

CFG = RWKV7Config(vocab_size=40, d_model=32, n_layers=2, head_size=16, d_ffn=48, decay_lora=8,
                  a_lora=8, v_lora=4, gate_lora=8, max_step=4, impl="xla")


@pytest.fixture(scope="module")
def lm():
  model, params = rwkv7_model(CFG, jax.random.key(0))
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


def test_bad_input_raises(lm):
  model, params, _, step, _ = lm
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match=r"tokens: token ids \[40\] outside the vocabulary"):
    model.prefill(params, jnp.array([[1, 40], [1, 2]]), cache, jnp.array([2, 2]))
  with pytest.raises(TypeError, match="tokens: expected integer token ids"):
    model.prefill(params, jnp.zeros((2, 3)), cache, jnp.array([3, 3]))
  with pytest.raises(ValueError, match="lengths: expected values in"):
    model.prefill(params, jnp.ones((2, 3), jnp.int32), cache, jnp.array([3, 4]))
  with pytest.raises(ValueError, match="exceed max_step=4"):
    model.step(params, jnp.ones((2, 5), jnp.int32), cache)
  with pytest.raises(ValueError, match="max_len: the longest prompt"):
    generate(model, params, [[1, 2, 3, 4, 5, 6]], jax.random.key(0), max_new_tokens=4, max_len=8)
  short, _ = rwkv7_model(RWKV7Config(**{**CFG.__dict__, "max_len": 4}), jax.random.key(0))
  with pytest.raises(ValueError, match="exceed the model's context of 4"):
    short.prefill(params, jnp.ones((2, 6), jnp.int32), short.init_cache(2, 4),
                  jnp.array([6, 6]))
  _, stepped = step(params, jnp.ones((2, 2), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= the last step's \[2, 2\]"):
    model.rollback(stepped, jnp.array([3, 0]))
  with pytest.raises(ValueError, match="head_size"):
    RWKV7Config(vocab_size=10, d_model=30, n_layers=1, head_size=16)
